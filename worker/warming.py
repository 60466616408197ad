"""What a version's warm-up runs: the shapes serving will use, as dummy batches.

On a GPU the first batch of a shape pays for kernel selection and for growing the caching
allocator's pool, and each thread pays for its own cuBLAS handle and streams. So each instance
thread (:class:`~worker.instances.Instances`) runs :meth:`~worker.model.LoadedModel.warm_up`
before it serves, with the bounds its lane batches by (:mod:`worker.lanes`):

- batches of 1, 2, 4 ... rows up to ``max_batch_size`` (within the token budget), of the
  dummy request (one row of zeros, or one short string);
- for a ``[tokenizer]`` model also every power-of-two length above the dummy's up to the
  tokenizer's ``max_length`` (and that length itself), each with as many rows as serving puts
  in a batch of that length: ``max_batch_tokens // length`` (at most ``max_batch_size``), so
  the largest batches serving runs, and their memory, are met before the first request.

A sequence model without a tokenizer declares no longest length, and an index beyond its
positions would be a device-side assert on a GPU: it warms up at the dummy's length only.

Plain numpy: no torch, no Kafka.
"""

from __future__ import annotations

import numpy as np

from worker.prepared import Prepared

__all__ = ["warm_up_batch", "warm_up_shapes"]


def warm_up_shapes(
    largest: int,
    *,
    length: int = 1,
    max_length: int | None = None,
    max_batch_tokens: int | None = None,
) -> list[tuple[int, int]]:
    """(rows, length) of each warm-up batch, in order; no shape twice.

    ``largest``: the lane's ``max_batch_size``; ``length``: the dummy request's;
    ``max_length``: the longest a request can be (a tokenizer's ``max_length``), None if
    unknown; ``max_batch_tokens``: the lane's token budget (rows x length), if any.
    """

    def rows_within(want: int, at: int) -> int:
        return max(1, min(want, max_batch_tokens // at)) if max_batch_tokens else want

    top = rows_within(largest, length)
    shapes = [(rows, length) for rows in _ladder(top)]
    if max_length is not None and max_length > length:
        shapes += [(rows_within(largest, at), at) for at in _ladder(max_length) if at > length]
    return list(dict.fromkeys(shapes))


def _ladder(top: int) -> list[int]:
    """1, 2, 4 ... below ``top``, then ``top``."""
    return [1 << i for i in range(top.bit_length()) if 1 << i < top] + [top]


def warm_up_batch(dummy: Prepared, rows: int, length: int) -> Prepared:
    """``rows`` rows of the one-row ``dummy``; its sequences repeated to ``length`` if longer.

    A tokenised dummy repeats its real token ids (special tokens included), so every id is
    one the tokenizer makes.
    """
    arrays = list(dummy.arrays)
    if length != dummy.length:
        positions = np.arange(length) % dummy.length
        arrays = [np.take(a, positions, axis=1) for a in arrays]
    return Prepared(
        [np.repeat(a[:1], rows, axis=0) for a in arrays],
        rows=rows,
        length=length,
        tokens=rows * length,
    )
