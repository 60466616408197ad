"""Message headers as every transport carries them: ``(name, bytes)`` pairs, in order.

Kafka records, REST calls and gRPC calls all bring headers in this shape, so the request path
reads them the same way whatever the origin.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Headers", "header"]

Headers = Sequence[tuple[str, bytes]]
"""Headers in arrival order; a name may repeat (the last value wins in :func:`header`)."""


def header(headers: Headers | None, name: str) -> bytes | None:
    """The last value of header ``name``, or None."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = value
    return found
