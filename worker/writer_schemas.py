"""Vetting a writer schema from a schema registry before any record is read with it.

Any producer can register a schema (Confluent's serializers do it by default), and the worker
reads registry-framed records with whatever writer schema their id names, resolving it to ours.
Avro decoding cost is linear in the record's bytes except where an item takes no bytes: an
``array<null>`` (or a map of them, or of empty records) lets a 16-byte record claim 2^62 items,
which the decoder then skips one by one for years. Deep nesting costs the decoder's recursion.

:func:`writer_problem` finds both before the schema is used; a schema with a problem is refused
(its records answered INVALID_ARGUMENT and dead-lettered, the refusal remembered like any
unusable schema id)::

    array / map of a type that can be 0 bytes  -> refused
    nesting deeper than MAX_SCHEMA_DEPTH        -> refused
    anything else (names, unions, recursion)    -> accepted (fastavro parses it next)
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_SCHEMA_DEPTH", "writer_problem"]

MAX_SCHEMA_DEPTH = 32
"""Deepest nesting of types a writer schema may have (our request schema has 5)."""

_FIXED_SIZE = {"boolean": 1, "int": 1, "long": 1, "float": 4, "double": 8, "bytes": 1}
"""Fewest bytes a value of each primitive takes (a varint or a length is at least one)."""


class _Refused(Exception):  # noqa: N818 - internal signal, never leaves this module
    """The schema has a problem (its message)."""


def writer_problem(schema: Any) -> str | None:
    """Why a writer schema (parsed JSON) must not be used, or None if it may."""
    try:
        _Walk().min_bytes(schema, 0)
    except _Refused as exc:
        return str(exc)
    except RecursionError:
        return f"nests deeper than {MAX_SCHEMA_DEPTH} levels"
    return None


class _Walk:
    """One pass over a schema: the fewest bytes each type's value takes, refusing as it goes."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        """Named types seen so far, by full and by short name."""

    def min_bytes(self, schema: Any, depth: int) -> int:  # noqa: PLR0911 - one case per kind
        """The fewest bytes a value of ``schema`` is written in."""
        if depth > MAX_SCHEMA_DEPTH:
            raise _Refused(f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(schema, list):  # a union: the branch index is at least one byte
            for branch in schema:
                self.min_bytes(branch, depth + 1)
            return 1
        if isinstance(schema, str):
            return self._named_or_primitive(schema)
        if not isinstance(schema, dict):
            return 1  # not a schema at all: fastavro's parser will say so
        kind = schema.get("type")
        if isinstance(kind, list | dict):
            return self.min_bytes(kind, depth + 1)
        if kind in ("array", "map"):
            what = "an array whose items" if kind == "array" else "a map whose values"
            if self.min_bytes(schema.get("items" if kind == "array" else "values"), depth + 1) == 0:
                raise _Refused(
                    f"has {what} can take no bytes: a short record could claim billions of them"
                )
            return 1  # the block count
        if kind in ("record", "error", "enum", "fixed"):
            return self._named(schema, kind, depth)
        return self._named_or_primitive(str(kind))

    def _named(self, schema: dict[str, Any], kind: str, depth: int) -> int:
        name = str(schema.get("name", ""))
        names = {name, name.rpartition(".")[2], f"{schema.get('namespace', '')}.{name}"}
        self.sizes.update(dict.fromkeys(names, 1))  # a recursive use meanwhile: 1 byte at least
        if kind == "enum":
            size = 1
        elif kind == "fixed":
            given = schema.get("size")
            size = given if isinstance(given, int) and given >= 0 else 1
        else:
            fields = schema.get("fields")
            size = sum(
                self.min_bytes(f.get("type"), depth + 1) if isinstance(f, dict) else 1
                for f in (fields if isinstance(fields, list) else [])
            )
        self.sizes.update(dict.fromkeys(names, size))
        return size

    def _named_or_primitive(self, name: str) -> int:
        if name == "null":
            return 0
        if name == "string":
            return 1
        if name in _FIXED_SIZE:
            return _FIXED_SIZE[name]
        return self.sizes.get(name, self.sizes.get(name.rpartition(".")[2], 1))
