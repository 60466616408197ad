"""A version's response cache: a request's outputs kept by a hash of its inputs, LRU in bytes.

Opt-in per model in its ``config.toml`` (``[cache] max_bytes``, :mod:`worker.config_parsing`);
each served version has its own :class:`ResponseCache` (:class:`worker.model.LoadedModel`
makes it). The pipeline looks a request up once it is admitted (:mod:`worker.pipeline`: a hit
is answered at once, no batch, no shadow copy) and a miss's successful answer is stored when
its batch is answered (:mod:`worker.answering`).

The key (:func:`cache_key`) is a 32-byte BLAKE2b digest of the request's inputs in a canonical
form: their count, then each input (sorted by name: a model takes its inputs by name, so
their order in the request does not change the answer) as its name, datatype, shape and raw
bytes, every field length-prefixed, so that no two different sets of inputs are one stream of
bytes. Nothing else of a request changes its outputs: the model and version are the cache's
own, its parameters (``priority``, ...) do not reach the model, and the outputs a REST caller
selects are cut from the full reply by the endpoint afterwards. Text models are keyed by their
strings, before tokenisation.

An entry's size is its real size: the outputs' bytes, names and datatypes, the key, and a
fixed overhead per entry and per tensor for the Python objects that hold them
(:data:`ENTRY_OVERHEAD`, :data:`TENSOR_OVERHEAD`, measured). The cache never holds more than
``max_bytes``; an entry larger than that on its own is never stored.

Not thread-safe, and needs not be: the event loop is its only user (admission, answering and
reloads all run there).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from worker.domain import Tensor

__all__ = [
    "ENTRY_OVERHEAD",
    "KEY_BYTES",
    "TENSOR_OVERHEAD",
    "ResponseCache",
    "cache_key",
    "entry_size",
]

KEY_BYTES = 32
"""Length of a key: a BLAKE2b-256 digest."""
ENTRY_OVERHEAD = 256
"""Bytes counted per entry besides its tensors: the ordered dict's node, the key's ``bytes``
object, the tuple of outputs (measured with tracemalloc: under 200)."""
TENSOR_OVERHEAD = 256
"""Bytes counted per output tensor besides its data, name and datatype: the ``Tensor`` object,
its shape tuple, the headers of its strings and bytes (measured: under 250)."""
_PERSON = b"kiw-response-1"
"""Personalisation of the digest: a key of this cache is no other BLAKE2b hash."""


def _field(digest: hashlib.blake2b, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def cache_key(inputs: Sequence[Tensor]) -> bytes:
    """The key of a request's ``inputs`` (see the module docstring): O(their bytes)."""
    digest = hashlib.blake2b(digest_size=KEY_BYTES, person=_PERSON)
    digest.update(len(inputs).to_bytes(8, "little"))
    for tensor in sorted(inputs, key=lambda t: t.name):
        _field(digest, tensor.name.encode("utf-8", "surrogatepass"))
        _field(digest, tensor.datatype.encode("utf-8", "surrogatepass"))
        _field(digest, ",".join(str(int(d)) for d in tensor.shape).encode())
        _field(digest, tensor.data)
    return digest.digest()


def entry_size(key: bytes, outputs: Sequence[Tensor]) -> int:
    """The bytes an entry of ``outputs`` under ``key`` is counted for."""
    size = ENTRY_OVERHEAD + len(key)
    for tensor in outputs:
        size += TENSOR_OVERHEAD + len(tensor.data) + len(tensor.name) + len(tensor.datatype)
        size += 8 * len(tensor.shape)
    return size


class ResponseCache:
    """Outputs by :func:`cache_key`, least recently used first out, at most ``max_bytes``.

    Counts its hits, misses and evictions (plain integers; :mod:`worker.metrics` exports
    them by model and version). :meth:`close` empties it for good: a version reloaded or no
    longer served drops its cache, and a job of the old version answered later stores nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        """The sizes (:func:`entry_size`) of the entries held now; never over ``max_bytes``."""
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.closed = False
        self._entries: OrderedDict[bytes, tuple[tuple[Tensor, ...], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> list[Tensor] | None:
        """The outputs stored under ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return list(entry[0])

    def put(self, key: bytes, outputs: Sequence[Tensor]) -> int:
        """Store ``outputs`` under ``key``, evicting the least recently used to make room.

        Returns how many entries were evicted. An entry larger than ``max_bytes`` on its own
        is not stored (nothing is evicted for it); a closed cache stores nothing.
        """
        size = entry_size(key, outputs)
        if self.closed or size > self.max_bytes:
            return 0
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        evicted = 0
        while self.bytes + size > self.max_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.bytes -= freed
            evicted += 1
        self._entries[key] = (tuple(outputs), size)
        self.bytes += size
        self.evictions += evicted
        return evicted

    def keys(self) -> list[bytes]:
        """The keys held, least recently used first (for tests and probes)."""
        return list(self._entries)

    def close(self) -> None:
        """Drop every entry; from now on nothing is stored."""
        self.closed = True
        self._entries.clear()
        self.bytes = 0
