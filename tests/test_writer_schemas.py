"""Writer schemas from a registry are vetted before a record is read with them.

An ``array<null>`` field let a 16-byte registry-framed record claim 2^62 items, which the Avro
decoder skipped one by one: the event loop was held for years and the group rebalanced the
record onto the next worker.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from typing import Any

import fastavro
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.codec import schema_dir, schema_text
from worker.repository import ModelRepository
from worker.settings import Settings
from worker.writer_schemas import MAX_SCHEMA_DEPTH, writer_problem

from .conftest import changed, reply_reader, running_worker, wait_for
from .test_formats_kafka import deserialize_framed, private_registry, request_dict, serialize
from .test_reliability import publish

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]

REQUEST = json.loads(schema_text("inference_request"))


def with_field(field_type: Any) -> dict[str, Any]:
    """Our request schema with one more field of ``field_type`` (default: empty/none)."""
    default: Any = [] if isinstance(field_type, dict) and field_type.get("type") == "array" else {}
    extra = {"name": "pad", "type": field_type, "default": default}
    return {**REQUEST, "fields": [*REQUEST["fields"], extra]}


def nested(depth: int) -> dict[str, Any]:
    """An array of arrays ... of int, ``depth`` levels deep."""
    schema: Any = "int"
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema  # type: ignore[no-any-return]


EMPTY = {"type": "record", "name": "Empty", "fields": []}
REFUSED = {
    "array<null>": with_field({"type": "array", "items": "null"}),
    "map of empty records": {"type": "map", "values": EMPTY},
    "array of fixed(0)": {"type": "array", "items": {"type": "fixed", "name": "Z", "size": 0}},
    "array of a named empty record": {
        "type": "record",
        "name": "A",
        "namespace": "n",
        "fields": [
            {"name": "e", "type": EMPTY},
            {"name": "l", "type": {"type": "array", "items": "n.Empty"}},
        ],
    },
    "array of arrays of null": {"type": "array", "items": {"type": "array", "items": "null"}},
    "nesting of 33": nested(MAX_SCHEMA_DEPTH + 1),
    "nesting of 100,000": nested(100_000),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hostile_writer_schemas_are_refused_saying_why(case: str) -> None:
    """Zero-byte array items or map values, and deep nesting: a problem, never an exception."""
    problem = writer_problem(REFUSED[case])
    assert problem is not None
    assert "no bytes" in problem or "deeper than" in problem


def test_every_schema_of_ours_and_its_history_is_accepted() -> None:
    """Our schemas, every earlier version, and arrays of unions (a union takes a byte)."""
    paths = [*schema_dir().glob("*.avsc"), *(schema_dir() / "history").glob("*.avsc")]
    assert len(paths) >= 5
    for path in paths:
        assert writer_problem(json.loads(path.read_text())) is None, path.name
    assert writer_problem({"type": "array", "items": ["null", "int"]}) is None
    assert writer_problem(nested(MAX_SCHEMA_DEPTH - 1)) is None


PRIMITIVES = st.sampled_from(["null", "boolean", "int", "long", "float", "double", "string"])


def schemas() -> st.SearchStrategy[Any]:
    """Avro schemas of arrays, maps, records, unions and fixed, nested a few levels."""
    names = iter(range(10**9))

    def compound(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.builds(lambda t: {"type": "array", "items": t}, inner),
            st.builds(lambda t: {"type": "map", "values": t}, inner),
            st.builds(
                lambda ts: {
                    "type": "record",
                    "name": f"R{next(names)}",
                    "fields": [{"name": f"f{i}", "type": t} for i, t in enumerate(ts)],
                },
                st.lists(inner, max_size=3),
            ),
            st.builds(lambda t: ["null", t], inner.filter(lambda t: t != "null")),
            st.builds(
                lambda n: {"type": "fixed", "name": f"F{next(names)}", "size": n}, st.integers(0, 2)
            ),
        )

    return st.recursive(PRIMITIVES, compound, max_leaves=8)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(schemas(), st.binary(max_size=64))
def test_a_vetted_schema_decodes_any_short_record_quickly(schema: Any, data: bytes) -> None:
    """Accepted: any 64 bytes decode (or fail) at once. Refused: a zero-byte item exists."""
    problem = writer_problem(schema)
    if problem is not None:
        assert "no bytes" in problem
        return
    parsed = fastavro.parse_schema(schema)
    started = time.perf_counter()
    with contextlib.suppress(Exception):  # garbage may fail to decode; only the time matters
        fastavro.schemaless_reader(io.BytesIO(data), parsed, None)
    assert time.perf_counter() - started < 1.0, "a few bytes never take a second"


def smallest(schema: Any) -> Any:
    """The value of ``schema`` that encodes in the fewest bytes (schemas() makes no names)."""
    if isinstance(schema, list):
        return smallest(schema[0])
    if isinstance(schema, str):
        return {"null": None, "boolean": False, "string": "", "bytes": b"",
                "float": 0.0, "double": 0.0}.get(schema, 0)  # fmt: skip
    kind = schema["type"]
    if kind == "fixed":
        return b"\0" * schema["size"]
    if kind == "record":
        return {f["name"]: smallest(f["type"]) for f in schema["fields"]}
    return [] if kind == "array" else {}


def zero_byte_items(schema: Any) -> bool:
    """Oracle: True if an array or map of ``schema`` holds items fastavro writes in no bytes."""
    inner: list[Any] = []
    if isinstance(schema, list):
        inner = schema
    elif isinstance(schema, dict) and schema["type"] in ("array", "map"):
        items = schema["items" if schema["type"] == "array" else "values"]
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, fastavro.parse_schema(items), smallest(items))
        if not buf.getvalue():
            return True
        inner = [items]
    elif isinstance(schema, dict) and schema["type"] == "record":
        inner = [f["type"] for f in schema["fields"]]
    return any(zero_byte_items(i) for i in inner)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(schemas())
def test_a_schema_is_refused_exactly_when_fastavro_writes_an_item_in_no_bytes(schema: Any) -> None:
    """Checked against fastavro's own encoding of each array's or map's smallest item."""
    assert (writer_problem(schema) is not None) == zero_byte_items(schema)


def test_the_depth_bound_is_exact_and_the_message_names_array_or_map() -> None:
    """Nesting of MAX_SCHEMA_DEPTH is accepted, one more refused; arrays and maps named."""
    assert writer_problem(nested(MAX_SCHEMA_DEPTH)) is None
    assert writer_problem(nested(MAX_SCHEMA_DEPTH + 1)) == "nests deeper than 32 levels"

    def in_record(depth: int) -> dict[str, Any]:
        return {"type": "record", "name": "R", "fields": [{"name": "f", "type": nested(depth)}]}

    for wrap in (in_record, lambda d: ["null", nested(d)], lambda d: {"type": nested(d)}):
        assert writer_problem(wrap(MAX_SCHEMA_DEPTH - 1)) is None  # one level for the wrapper
        assert writer_problem(wrap(MAX_SCHEMA_DEPTH)) is not None
    assert "an array whose items" in str(writer_problem({"type": "array", "items": "null"}))
    assert "a map whose values" in str(writer_problem({"type": "map", "values": "null"}))


def test_named_types_count_as_their_definition() -> None:
    """A fixed(1), an enum or a non-empty record take bytes; an empty error type takes none."""
    fixed_one = {"type": "fixed", "name": "One", "size": 1}
    assert writer_problem({"type": "array", "items": fixed_one}) is None
    enum = {"type": "enum", "name": "E", "symbols": ["A"]}
    assert writer_problem({"type": "map", "values": enum}) is None
    error = {"type": "error", "name": "Oops", "fields": []}
    assert writer_problem({"type": "array", "items": error}) is not None
    short_name = {
        "type": "record", "name": "Outer", "namespace": "n",
        "fields": [{"name": "e", "type": {"type": "record", "name": "In", "fields": []}},
                   {"name": "l", "type": {"type": "array", "items": "In"}}],
    }  # fmt: skip
    assert writer_problem(short_name) is not None
    full_name = {
        "type": "record", "name": "n.Outer",
        "fields": [{"name": "e", "type": {"type": "record", "name": "n.In", "fields": [
            {"name": "x", "type": "int"}]}}, {"name": "l", "type": {"type": "array",
                                                                    "items": "n.In"}}],
    }  # fmt: skip
    assert writer_problem(full_name) is None
    by_namespace = {
        "type": "record", "name": "Outer",
        "fields": [{"name": "e", "type": {"type": "record", "name": "In", "namespace": "n",
                                          "fields": []}},
                   {"name": "l", "type": {"type": "array", "items": "n.In"}}],
    }  # fmt: skip
    assert writer_problem(by_namespace) is not None
    by_short_name = {
        "type": "record", "name": "n.Outer",
        "fields": [{"name": "e", "type": {"type": "record", "name": "n.In", "fields": []}},
                   {"name": "l", "type": {"type": "array", "items": "In"}}],
    }  # fmt: skip
    assert writer_problem(by_short_name) is not None


def claiming(value: bytes, items: int) -> bytes:
    """A framed record whose trailing empty array (``00``) claims ``items`` items instead."""
    assert value.endswith(b"\x00")
    zigzag = items << 1
    varint = bytearray()
    while zigzag >= 0x80:
        varint.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    varint.append(zigzag)
    return value[:-1] + bytes(varint) + b"\x00"


async def test_a_record_claiming_2_62_null_items_is_refused_and_its_neighbours_served(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """Real registry, confluent-kafka's serializer: INVALID_ARGUMENT and a dead-letter copy."""
    pixels = testset[0][:3]
    kafka = settings.kafka
    hostile = json.dumps(with_field({"type": "array", "items": "null"}))
    with private_registry() as (url, _):
        settings = changed(settings, "schema_registry", url=url)
        [padded] = serialize(url, kafka.requests_topic, hostile,
                             [{**request_dict("poison", pixels[0]), "pad": []}])  # fmt: skip
        good = serialize(url, kafka.requests_topic, schema_text("inference_request"),
                         [request_dict(f"g-{i}", pixels[i]) for i in (1, 2)])  # fmt: skip
        records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
            (None, good[0], [("correlation_id", b"g-1")]),
            (None, claiming(padded, 2**62), [("correlation_id", b"poison")]),
            (None, good[1], [("correlation_id", b"g-2")]),
        ]
        async with (
            running_worker(settings, repository),
            reply_reader(settings) as replies,
            reply_reader(settings, kafka.dead_letter_topic) as dead,
        ):
            await publish(settings, records)
            await wait_for(lambda: len(replies) == 3 and len(dead) == 1, timeout=60,
                           what="three replies and a dead-letter copy")  # fmt: skip
    answers = deserialize_framed({r.headers["correlation_id"]: r for r in replies})
    assert answers[b"g-1"]["error"] is None
    assert answers[b"g-2"]["error"] is None
    refused = answers[b"poison"]["error"]
    assert refused["code"] == "INVALID_ARGUMENT"
    assert "no bytes" in refused["message"]
    assert dead[0].headers["correlation_id"] == b"poison"
