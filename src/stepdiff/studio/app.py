"""The studio's HTTP API, WebSocket and page: a Starlette app around a ``Studio``.

Routes (JSON unless said otherwise; every /api route needs the token when the server has one):

    GET  /                         the page (no build step, nothing loaded from elsewhere)
    GET  /api/info                 model, limits, schedulers, queue size
    POST /api/jobs                 submit a job -> 201 {id, state, ...}; 422 naming a bad field; 429 queue full.
                                   Fields: prompt, negative_prompt, seed, steps, size or width/height, guidance,
                                   scheduler, cfg_cutoff or guidance_interval, fast (true: the --fast step caching
                                   preset) or cache (a --cache spec, e.g. "deepcache:3,tgate:10"), preview
    GET  /api/jobs?limit=&before=&state=   history, newest first; ``next`` is the ``before`` of the next page
    GET  /api/jobs/{id}            one job: state, step, parameters, run record, image URL
    POST /api/jobs/{id}/cancel     a queued job leaves the queue; a running one stops before its next model call
                                   and its picture is finished in up to 3 more steps (interrupt_output="finish")
    POST /api/jobs/{id}/steer      {"guidance": 3.0, "cfg_cutoff": 0.5 | null, "cache_interval": 1, ...}: from the next
                                   step on (steering.STEER_FIELDS)
    GET  /api/images/{id}.png      a job's image (PNG with the same metadata as ``stepdiff generate``)
    WS   /api/events               queued, started, step (with a preview frame), steered, finished, cancelled,
                                   failed, interrupted; starts with a ``hello`` snapshot of the live jobs

Safe by default: cross-origin requests (an ``Origin`` that is not this server) are refused, a request
body is at most ``MAX_BODY`` bytes and must arrive within ``body_timeout`` seconds, image names are checked before
any file is touched, and on a loopback address only loopback host names are served (no DNS rebinding).

Every answer is JSON, errors too (``{"error": ..., "field": ..., "value": ..., "allowed": ...}`` for a bad field):
a job's text that JSON can carry but UTF-8 cannot (a lone surrogate) is escaped, never a 500; a storage failure is
a 503 naming the file; anything unexpected is a 500 with a JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..schedulers import scheduler_names
from .events import is_framed_step
from .guard import BODY_TIMEOUT, UPLOAD_PATH, Guard, HTTPError, JSONResponse, _error
from .jobs import JobNotFound, QueueFull, Studio, WrongState
from .spec import MAX_PROMPT_CHARS, FieldError, parse_job
from .steering import parse_steer
from .store import STATES, StoreError
from .uploads import MAX_UPLOAD_BYTES, UploadError, image_from_multipart

__all__ = ["BODY_TIMEOUT", "MAX_BODY", "JSONResponse", "create_app"]

MAX_BODY = 64 * 1024
MAX_EVENT_CLIENTS = 100  # WebSocket subscribers at once (each holds a connection the connection cap cannot close)
STATIC = Path(__file__).parent / "static"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_IMAGE = re.compile(r"^[0-9a-f]{32}(-[2-8])?\.png$")
_UPLOAD = re.compile(r"^[0-9a-f]{32}\.png$")
async def _json(request: Request) -> Any:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPError(413, f"request body is over the limit of {MAX_BODY} bytes")
    if not body:
        raise HTTPError(400, "the request body must be a JSON object; it is empty")
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise HTTPError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise HTTPError(400, "the request body is JSON nested too deeply (a job is an object of a few levels)") \
            from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _job_id(request: Request) -> str:
    job_id = request.path_params["job_id"]
    if not _JOB_ID.match(job_id):
        raise FieldError("id", job_id, "a job id: 32 hexadecimal characters")
    return job_id


def _query_int(request: Request, name: str, low: int, high: int, default: int | None) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not re.fullmatch(r"\d{1,18}", value) or not low <= int(value) <= high:
        raise FieldError(name, value, f"an integer in [{low}, {high}]")
    return int(value)


def create_app(studio: Studio, *, token: str | None = None, trusted_hosts: set[str] | None = None,
               body_timeout: float = BODY_TIMEOUT) -> Starlette:
    """The ASGI app. ``token``: required on every /api call and the WebSocket; ``trusted_hosts``: the Host names
    served (None: any, for tests behind a test client); ``body_timeout``: seconds a request body may take."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await run_in_threadpool(studio.close)

    routes = [
        Route("/", _index),
        *_info_routes(studio),
        *_job_routes(studio),
        *_picture_routes(studio),
        WebSocketRoute("/api/events", _events(studio)),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(routes=routes, exception_handlers=_HANDLERS, lifespan=lifespan)
    app.state.studio = studio
    return Guard(app, token, trusted_hosts, MAX_BODY, body_timeout, MAX_UPLOAD_BYTES)  # type: ignore[return-value]


async def _index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})


def _info_routes(studio: Studio) -> list[Route]:
    """What the server offers: its model and limits, the models and LoRAs, the words the model knows."""

    async def info(request: Request) -> Response:
        lim = studio.limits
        return JSONResponse({
            "model": studio.model.name, "workers": studio.workers, "queue_size": studio.queue_size,
            "schedulers": scheduler_names(), "max_prompt_chars": MAX_PROMPT_CHARS,
            "preview_methods": ["auto", "linear", "vae"] + (["tiny"] if studio.frames.resolve("auto") == "tiny" else []),
            "problem": studio.problem, "ip_adapter": getattr(studio.pool, "ip_adapter_folder", None) is not None,
            "limits": {"native_size": lim.native_size, "size_multiple": lim.size_multiple, "min_size": lim.min_size,
                       "max_size": lim.max_size, "max_steps": lim.max_steps},
            "defaults": {"steps": lim.default_steps, "guidance": lim.default_guidance,
                         "size": f"{lim.native_size}x{lim.native_size}"},
            "stats": await run_in_threadpool(studio.stats),
        })

    async def words(request: Request) -> Response:
        prompt = request.query_params.get("prompt", "")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise FieldError("prompt", f"{len(prompt)} characters", f"at most {MAX_PROMPT_CHARS} characters")
        return JSONResponse(await run_in_threadpool(studio.words, prompt))

    async def models(request: Request) -> Response:
        pool = studio.pool
        return JSONResponse({"models": [{"name": n, "default": n == pool.default, "loaded": n in pool.loaded()}
                                        for n in pool.names], "max_loaded": pool.max_loaded})

    async def loras(request: Request) -> Response:
        return JSONResponse({"loras": [{"name": n} for n in studio.pool.loras]})

    return [Route("/api/info", info), Route("/api/words", words), Route("/api/models", models),
            Route("/api/loras", loras)]


def _job_routes(studio: Studio) -> list[Route]:
    """Submit, list, read, cancel, steer and delete jobs."""

    async def submit(request: Request) -> Response:
        body = await _json(request)
        spec = parse_job(body, studio.limits)
        job = await run_in_threadpool(studio.submit, spec, isinstance(body, dict) and body.get("seed") is not None)
        return JSONResponse(job, status_code=201)

    async def history(request: Request) -> Response:
        limit = _query_int(request, "limit", 1, 100, 20)
        before = _query_int(request, "before", 0, 2**62, None)
        state = request.query_params.get("state")
        if state is not None and state not in STATES:
            raise FieldError("state", state, f"one of {', '.join(STATES)}")
        return JSONResponse(await run_in_threadpool(studio.history, limit, before, state))

    async def get_job(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(studio.get, _job_id(request)))

    async def cancel(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(studio.cancel, _job_id(request)))

    async def steer(request: Request) -> Response:
        job_id = _job_id(request)
        changes = parse_steer(await _json(request))
        return JSONResponse(await run_in_threadpool(studio.steer, job_id, changes))

    async def delete_job(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(studio.delete, _job_id(request)))

    return [
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs", history, methods=["GET"]),
        Route("/api/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/jobs/{job_id}", delete_job, methods=["DELETE"]),
        Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{job_id}/steer", steer, methods=["POST"]),
    ]


def _picture_routes(studio: Studio) -> list[Route]:
    """Uploads in and back, and the jobs' images."""

    async def upload(request: Request) -> Response:
        kind = request.headers.get("content-type", "")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD_BYTES:
                raise HTTPError(413, f"an upload is at most {MAX_UPLOAD_BYTES} bytes", _close=True)
        base = kind.split(";")[0].strip().lower()
        if base == "multipart/form-data":
            data = image_from_multipart(kind, bytes(body))
        elif base.startswith("image/") or base in ("application/octet-stream", ""):
            data = bytes(body)
        else:
            raise HTTPError(415, f"an upload is a picture: send it as the body with an image/* Content-Type, or as "
                                 f"one multipart/form-data file part; got Content-Type {kind[:80]!r}")
        return JSONResponse(await run_in_threadpool(studio.upload, data), status_code=201)

    async def upload_file(request: Request) -> Response:
        name = request.path_params["name"]
        if not _UPLOAD.match(name):
            raise FieldError("upload", name, "an upload's name: 32 hexadecimal characters and .png")
        path = studio.uploads.path(name[:-4])
        if path is None:
            raise HTTPError(404, f"no upload {name!r}")
        return FileResponse(path, media_type="image/png", headers={"cache-control": "private, max-age=31536000"})

    async def image(request: Request) -> Response:
        name = request.path_params["name"]
        if not _IMAGE.match(name):
            raise FieldError("image", name, "a job's image name: 32 hexadecimal characters and .png")
        root = studio.images.resolve()
        path = (root / name).resolve()
        if path.parent != root or not path.is_file():
            raise HTTPError(404, f"no image {name!r}")
        return FileResponse(path, media_type="image/png", headers={"cache-control": "private, max-age=31536000"})

    return [Route(UPLOAD_PATH, upload, methods=["POST"]), Route("/api/uploads/{name}", upload_file),
            Route("/api/images/{name}", image)]


def _events(studio: Studio) -> Any:
    """The WebSocket of ``/api/events``: a ``hello`` snapshot, then the hub's events; what writing each step event
    took is reported to the hub (``EventHub.sent``), which charges it to the job's preview budget."""

    async def events(ws: WebSocket) -> None:
        await ws.accept()
        if studio.hub.count >= MAX_EVENT_CLIENTS:
            await ws.close(code=1013, reason=f"too many event clients ({MAX_EVENT_CLIENTS}); try again later")
            return
        sub = studio.hub.subscribe(asyncio.get_running_loop())
        listener = asyncio.ensure_future(_drain(ws))
        try:
            await ws.send_text(json.dumps(await run_in_threadpool(studio.snapshot)))
            while True:
                waiter = asyncio.ensure_future(sub.wake.wait())
                done, _ = await asyncio.wait({waiter, listener}, return_when=asyncio.FIRST_COMPLETED)
                if listener in done:
                    waiter.cancel()
                    return
                if sub.overflowed:
                    await ws.close(code=1013, reason="too far behind; reload the jobs from /api/jobs")
                    return
                for text in sub.take(studio.hub.lock):
                    started = time.thread_time()  # CPU: a wait for the GIL while the worker runs costs it nothing
                    await ws.send_text(text)  # (no yield to the loop unless the socket's buffer is full)
                    step, framed = is_framed_step(text)
                    if step:
                        studio.hub.sent(time.thread_time() - started, framed)
        except StoreError as e:
            with contextlib.suppress(Exception):
                await ws.close(code=1011, reason=str(e)[:120])
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        finally:
            studio.hub.unsubscribe(sub)
            listener.cancel()

    return events


# ------------------------------------------------------------------ errors: every answer is JSON


async def _not_found(request: Request, exc: Exception) -> Response:
    path = request.url.path
    return _error(404, {"error": f"no route {request.method} {path if len(path) <= 200 else path[:200] + '...'}"})


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return _error(405, {"error": f"method {request.method} is not allowed on {request.url.path}"})


async def _http_error(request: Request, exc: HTTPError) -> Response:
    response = _error(exc.status, exc.body)
    if exc.close:  # the rest of the body is not read: the connection cannot serve another request
        response.headers["connection"] = "close"
    return response


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error(500, {"error": f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"[:500]})


async def _job_not_found(request: Request, exc: JobNotFound) -> Response:
    return _error(404, {"error": f"no job {exc.args[0]}", "field": "id", "value": exc.args[0]})


def _answer(status: int, field: str | None = None) -> Any:
    """A handler answering ``status`` with the exception's message (and ``field``)."""

    async def handler(request: Request, exc: Exception) -> Response:
        return _error(status, {"error": str(exc), **({"field": field} if field else {})})

    return handler


async def _upload_error(request: Request, exc: UploadError) -> Response:
    return _error(exc.status, {"error": str(exc), "field": "upload"})


async def _field_error(request: Request, exc: FieldError) -> Response:
    return _error(422, exc.to_dict())


_HANDLERS = {404: _not_found, 405: _method_not_allowed, FieldError: _field_error, HTTPError: _http_error,
             JobNotFound: _job_not_found, WrongState: _answer(409), QueueFull: _answer(429),
             UploadError: _upload_error, StoreError: _answer(503), Exception: _server_error}


async def _drain(ws: WebSocket) -> None:
    """Read (and ignore) what the client sends, until it goes away."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
