"""The limits on connections that uvicorn lacks: a deadline for a request's headers, and a cap on connections.

uvicorn (0.30 to 0.55 at least) has no timeout for reading a request: its keep-alive timeout starts only after a
response and stops at the first byte received, so a client that sends half a request line, or one byte every few
seconds, holds its connection (and a file descriptor) for ever. Its ``limit_concurrency`` counts those connections
too, so a flood of them turns every real request away with a 503. With a few hundred such connections the process
runs out of file descriptors, and then it accepts nothing at all.

``StudioProtocol`` is uvicorn's HTTP/1.1 protocol (h11) with:

- a deadline for each request's headers (``header_timeout`` seconds from the connection, or from the previous
  response on a kept-alive connection): past it the connection gets a JSON 408 and is closed;
- a cap on open HTTP connections (``max_connections``, under the process's file descriptor limit): a new connection
  past the cap closes the one that has waited longest without sending a whole request (JSON 503), so a flood of
  half-sent requests cannot keep a real one out; only when every connection is busy with a request is the new one
  refused;
- its own malformed-request answer as JSON (uvicorn's is plain text).

The body of a request has its own deadline in the app (``app.Guard``); a WebSocket, once upgraded, has uvicorn's
pings. These hold on any address, with or without a token: they act before a request is read.
"""

from __future__ import annotations

import json
import os
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ACCEPT_BACKLOG", "DEFAULT_MAX_CONNECTIONS", "REQUEST_TIMEOUT", "StudioProtocol", "connection_limit", "protocol_class"]

REQUEST_TIMEOUT = 10.0  # seconds for a request's headers (and, in the app, for its body)
DEFAULT_MAX_CONNECTIONS = 512  # far more than a studio's browsers need
ACCEPT_BACKLOG = 128  # the listen backlog, which is also the most connections asyncio accepts at one go
# File descriptors kept free under the limit: the database, image writes, model files, and one burst of accepted
# connections before the cap closes the excess (a burst that ran into the limit would stop accepting for a second).
_RESERVED_FDS = 64 + ACCEPT_BACKLOG


def connection_limit(wanted: int | None = None) -> int:
    """The most HTTP connections to hold at once: ``wanted`` (default ``DEFAULT_MAX_CONNECTIONS``), and no more than
    the file descriptors this process has left under its limit, less a reserve for its own files."""
    wanted = DEFAULT_MAX_CONNECTIONS if wanted is None else wanted
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    return max(16, min(wanted, soft - in_use - _RESERVED_FDS))


def _closing(protocol: Any) -> bool:
    """Whether a connection (HTTP or WebSocket: both are in uvicorn's set) is on its way out."""
    transport = getattr(protocol, "transport", None)
    return transport is None or transport.is_closing()


def _json_response(status: int, reason: bytes, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body)) + body)


class StudioProtocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (see the module docstring)."""

    header_timeout: float = REQUEST_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    _timer: Any = None
    _waiting_since: float | None = None  # when it began waiting for a request's headers; None while serving one
    _armed_cycle: Any = None

    # ------------------------------------------------------------------ the header deadline

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        if sum(1 for p in self.connections if not _closing(p)) > self.max_connections:
            self._make_room()

    def _arm(self) -> None:
        self._disarm()
        self._waiting_since = self.loop.time()
        self._armed_cycle = self.cycle
        self._timer = self.loop.call_later(self.header_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting_since = None

    def handle_events(self) -> None:
        super().handle_events()
        if self._waiting_since is not None and self.cycle is not self._armed_cycle:
            self._disarm()  # a request's headers are in: it is being served

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._disarm()  # from here the WebSocket protocol owns the connection
        headers = dict(self.headers)
        if not headers.get(b"sec-websocket-key") or headers.get(b"sec-websocket-version") != b"13":
            # the WebSocket library's own answer would be plain text
            self._refuse(400, b"Bad Request", "a WebSocket upgrade needs Sec-WebSocket-Key and Sec-WebSocket-Version: "
                                              "13")
            return
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection has header_timeout seconds too
        super().on_response_complete()  # (a request already received is handled here: handle_events disarms)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self.cycle is not self._armed_cycle:
            return
        if not self.conn.trailing_data[0]:  # idle: nothing of a next request came (as uvicorn's keep-alive timeout)
            self._disarm()
            self.transport.close()
            return
        self._refuse(408, b"Request Timeout", f"no whole request within {self.header_timeout:g} seconds; "
                                              "the connection is closed")

    # ------------------------------------------------------------------ the connection cap

    def _make_room(self) -> None:
        waiting = [p for p in self.connections
                   if p is not self and getattr(p, "_waiting_since", None) is not None and not _closing(p)]
        if waiting:
            oldest = min(waiting, key=lambda p: p._waiting_since)
            oldest._refuse(503, b"Service Unavailable", f"the server is at its limit of {self.max_connections} "
                                                        "connections and this one waited longest without a request")
        else:
            self._refuse(503, b"Service Unavailable", f"the server is at its limit of {self.max_connections} "
                                                      "connections, all serving requests; try again shortly")

    def _refuse(self, status: int, reason: bytes, message: str) -> None:
        """A JSON answer where no response has begun on this connection, then close it."""
        self._disarm()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # (SEND_RESPONSE: a refused WebSocket upgrade)
            self.transport.write(_json_response(status, reason, message))
        self.transport.close()

    # ------------------------------------------------------------------ malformed requests

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (or whose headers are over its size limit), as JSON."""
        self._disarm()
        body = json.dumps({"error": f"{msg.rstrip('.')}: malformed, or its headers are over the size limit"}).encode()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


def protocol_class(header_timeout: float = REQUEST_TIMEOUT, max_connections: int | None = None) -> type:
    """``StudioProtocol`` with these limits, for ``uvicorn.Config(http=...)``."""
    return type("StudioProtocol", (StudioProtocol,), {"header_timeout": float(header_timeout),
                                                      "max_connections": connection_limit(max_connections)})
