"""The studio's ASGI guard and its JSON answers: host names, same origin, token, body size and deadline, and the
security headers on every response (``Guard``); a JSON response that cannot fail; ``HTTPError``."""

from __future__ import annotations

import asyncio
import json
import math
import secrets
from typing import Any
from urllib.parse import parse_qs

from starlette.responses import JSONResponse as _JSONResponse

__all__ = ["Guard", "HTTPError", "JSONResponse"]

BODY_TIMEOUT = 10.0  # seconds a request body may take to arrive, whole
UPLOAD_PATH = "/api/uploads"  # the one route whose body may be a picture, up to Guard's max_upload bytes

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class JSONResponse(_JSONResponse):
    """Starlette's JSONResponse that cannot fail: text with a lone surrogate (valid JSON, no UTF-8) is written
    escaped (\\ud800) and a float that is not finite (a hand-edited row) as null, instead of a 500."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except (UnicodeEncodeError, ValueError):
            return json.dumps(_finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class HTTPError(Exception):
    def __init__(self, status: int, message: str, _close: bool = False, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.body, self.close = status, {"error": message, **extra}, _close


def _error(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


class Guard:
    """ASGI middleware: host names, same origin, token, body size; the security headers on every response."""

    def __init__(self, app: Any, token: str | None, trusted_hosts: set[str] | None, max_body: int,
                 body_timeout: float = BODY_TIMEOUT, max_upload: int | None = None) -> None:
        self.app, self.token, self.trusted_hosts, self.max_body = app, token, trusted_hosts, max_body
        self.body_timeout = body_timeout
        self.max_upload = max_body if max_upload is None else max_upload

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        problem = self._check(scope)
        if problem is not None:
            status, message = problem
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
                return
            await _error(status, {"error": message})(scope, receive, send)
            return

        if scope["type"] == "http":
            receive = self._timed(receive)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(_SECURITY_HEADERS)
                if scope["path"] == "/":
                    headers.append((b"content-security-policy", _CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _timed(self, receive: Any) -> Any:
        """``receive`` with a deadline: the whole body within ``body_timeout`` seconds of the first read, else a 408
        (a client that sends its body a byte at a time holds no connection for long). Once the body is in, reads
        (a response waiting for the client to go away) have no deadline."""
        deadline: float | None = None
        body_done = False

        async def timed() -> dict:
            nonlocal deadline, body_done
            if body_done:
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.body_timeout
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPError(408, f"the request body did not arrive within {self.body_timeout:g} seconds",
                                _close=True) from None
            body_done = message.get("type") != "http.request" or not message.get("more_body", False)
            return message

        return timed

    def _check(self, scope: dict) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.trusted_hosts is not None and _hostname(host) not in self.trusted_hosts:
            return 403, f"host {host!r} is not served here (allowed: {', '.join(sorted(self.trusted_hosts))})"
        origin = headers.get("origin")
        if origin is not None:
            scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
            if origin != f"{scheme}://{host}":
                return 403, f"cross-origin request refused: Origin {origin!r} is not this server ({scheme}://{host})"
        if headers.get("sec-fetch-site") == "cross-site":
            return 403, "cross-origin request refused (Sec-Fetch-Site: cross-site)"
        path = scope["path"]
        if self.token is not None and path.startswith("/api/"):
            given = None
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            given = given or headers.get("x-stepdiff-token")
            if given is None:
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                given = (query.get("token") or [None])[0]
            if given is None:
                return 401, "this server needs its token: send 'Authorization: Bearer TOKEN' (or ?token=TOKEN)"
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                return 401, "wrong token"
        length = headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                return 400, f"Content-Length must be a number of bytes, got {length!r}"
            limit = self.max_upload if path == UPLOAD_PATH else self.max_body
            if int(length) > limit:
                return 413, f"request body is {int(length)} bytes; the limit is {limit}"
        return None


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
