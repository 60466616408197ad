"""The REST server's connections: how many may be open, and how long one may sit idle.

aiohttp keeps a connection for as long as its client holds it (an hour-long keep-alive, and
no limit on a request that never completes), and serves as many as arrive. The protocol
factory here sits in front of aiohttp's: at most ``limit`` connections reach it (one more is
answered 503 and closed), and a connection on which no request is served or begins for
:data:`IDLE_S` is closed, so silent or trickling clients cannot hold the bound.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

__all__ = ["IDLE_S", "REFUSED_LINGER_S", "ConnectionGate"]


class ConnectionGate:
    """The REST server's protocol factory: at most ``limit`` open connections reach aiohttp.

    Counted from ``connection_made`` (after any TLS handshake) to ``connection_lost``, one
    callback at a time, so the count is exact. A connection over the bound is answered 503
    with ``Connection: close``, its input read and dropped until the client closes it or
    :data:`REFUSED_LINGER_S` pass (closing with unread input would reset the connection and
    could lose the answer); past ``limit`` such connections, more are closed at once.
    """

    def __init__(self, server: web.Server, limit: int) -> None:
        self.server = server
        self.limit = limit
        self.open = 0
        self.refusing = 0
        body = json.dumps({"error": (
            f"the worker holds {limit} REST connections (WORKER_REST__MAX_CONNECTIONS); "
            "connect again later"
        )}).encode()  # fmt: skip
        self.refusal = (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\nRetry-After: 1\r\n\r\n%s"
            % (len(body), body)
        )

    def __call__(self) -> asyncio.Protocol:
        """A new connection's protocol (``loop.create_server`` calls this)."""
        return _Gated(self)


REFUSED_LINGER_S = 1.0
"""How long a connection refused for the connection bound is kept to deliver its 503."""
IDLE_S = 15.0
"""How long an admitted connection may go without a request being served or starting:
silent and trickling clients cannot hold the connection bound (keep-alive included)."""
IDLE_CHECK_S = 1.0


class _Gated(asyncio.Protocol):
    """One connection: aiohttp's own protocol when admitted, else the 503 and the close."""

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._inner: asyncio.Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._busy_at = 0.0
        """When a request was last seen starting or in progress (``loop.time()``)."""
        self._requests = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self._gate
        if gate.open < gate.limit:
            gate.open += 1
            self._inner = gate.server()
            self._inner.connection_made(transport)
            self._transport = transport
            loop = asyncio.get_running_loop()
            self._busy_at = loop.time()
            self._timer = loop.call_later(IDLE_CHECK_S, self._close_if_idle)
            return
        assert isinstance(transport, asyncio.WriteTransport)
        gate.refusing += 1
        transport.write(gate.refusal)
        if gate.refusing > gate.limit:  # a flood: no lingering for these
            transport.close()
            return
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def _close_if_idle(self) -> None:
        """Close an admitted connection that served or began no request for :data:`IDLE_S`.

        aiohttp keeps its request count and an in-progress flag on its protocol (not public:
        if they are ever missing, the connection counts as busy and is never closed here).
        """
        loop = asyncio.get_running_loop()
        requests = getattr(self._inner, "_request_count", None)
        if getattr(self._inner, "_request_in_progress", True) or requests != self._requests:
            self._requests, self._busy_at = requests or 0, loop.time()
        elif loop.time() - self._busy_at >= IDLE_S:
            assert self._transport is not None
            self._transport.close()
            return
        self._timer = loop.call_later(IDLE_CHECK_S, self._close_if_idle)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        return None  # the transport closes itself

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._gate.open -= 1
            if self._timer is not None:
                self._timer.cancel()
            self._inner.connection_lost(exc)
            return
        self._gate.refusing -= 1
        if self._timer is not None:
            self._timer.cancel()
