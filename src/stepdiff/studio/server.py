"""``stepdiff serve``: load the model, open the store, listen, print the URL; Ctrl-C stops cleanly."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from .jobs import Studio, lock_data_folder
from .spec import Limits

__all__ = ["LOOPBACK_NAMES", "is_loopback", "load_studio", "serve"]

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def limits_for(folder: Path, max_steps: int) -> Limits:
    from ..limits import ModelShape
    from ..loading import default_guidance

    shape = ModelShape.from_folder(folder)
    guidance = default_guidance(folder)
    return Limits(native_size=shape.native_size, size_multiple=shape.size_multiple, min_size=shape.min_size,
                  max_size=min(4 * shape.native_size, 2048), max_steps=max_steps, default_guidance=guidance)


def load_studio(model: Path, data: Path, *, workers: int = 1, queue_size: int = 100, max_steps: int = 500,
                device: str = "cpu", dtype: str = "float32", loader: Any = None) -> Studio:
    """A Studio on the model folder ``model``, its history in ``data`` (created if missing). A ``data`` folder that
    another server holds is refused before the model loads."""
    if loader is None:
        from ..loading import load_pipeline as loader
    data.mkdir(parents=True, exist_ok=True)
    with lock_data_folder(data):  # in use: refused now, not after the model has loaded (the Studio locks it again)
        pass
    pipe = loader(model, dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return Studio(pipe, model, data, workers=workers, queue_size=queue_size, limits=limits_for(model, max_steps))


def serve(studio: Studio, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
          out: Any = sys.stdout, request_timeout: float | None = None, max_connections: int | None = None) -> None:
    """Listen until Ctrl-C (or SIGTERM); then running jobs stop, are written and marked interrupted.

    ``request_timeout``: seconds for a request's headers and, apart, for its body (default ``REQUEST_TIMEOUT``);
    ``max_connections``: HTTP connections held at once (default: ``DEFAULT_MAX_CONNECTIONS``, fewer if the file
    descriptor limit is lower); see ``connections``."""
    import uvicorn

    from .app import create_app
    from .connections import ACCEPT_BACKLOG, REQUEST_TIMEOUT, protocol_class

    timeout = REQUEST_TIMEOUT if request_timeout is None else request_timeout
    loopback = is_loopback(host)
    if not loopback and token is None:
        token = secrets.token_urlsafe(24)
    trusted = LOOPBACK_NAMES if loopback else None
    app = create_app(studio, token=token, trusted_hosts=trusted, body_timeout=timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        studio.close()
        raise OSError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.listen(ACCEPT_BACKLOG)  # before the URL is printed: a client that connects at once waits, not refused
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/" + (f"?token={token}" if token else "")
    for row in studio.recovered_interrupted:
        print(f"stepdiff serve: job {row['id']} was running when the server stopped; marked interrupted", file=out)
    for row in studio.recovered_failed:
        print(f"stepdiff serve: queued job {row['id']} cannot run here; marked failed (GET /api/jobs/{row['id']} "
              "says why)", file=out)
    if studio.removed_temp_files:
        print(f"stepdiff serve: removed {len(studio.removed_temp_files)} half-written image file(s) left by a killed "
              f"write in {studio.images}", file=out)
    print(f"stepdiff studio: {url}", file=out, flush=True)
    if token:
        print(f"stepdiff serve: token {token} (needed on every API call: Authorization: Bearer TOKEN)", file=out,
              flush=True)
    protocol = protocol_class(timeout, max_connections)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, ws_ping_interval=20,
                            lifespan="on", ws_max_size=1024 * 1024, http=protocol,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=16 * 1024, backlog=ACCEPT_BACKLOG)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        studio.close()  # no-op when the app's shutdown already closed it
        sock.close()
        print("stepdiff serve: stopped", file=out, flush=True)
