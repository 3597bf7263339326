"""``stepdiff serve``: the live studio in the browser on one model."""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
from pathlib import Path
from typing import Any

from ..limits import MAX_STEPS
from .common import _at_least, _check_device, _check_writable_dir, _folder, _resolve_model
from .interrupts import Terminated
from .parser import DTYPES


def add_parser(sub) -> argparse.ArgumentParser:
    v = sub.add_parser("serve", help="a live studio in the browser: queue, previews, stop, steer guidance, history",
                       description="Serve the studio (page, HTTP API, WebSocket events) on one model; prints the URL.")
    v.add_argument("--model", type=Path, default=None,
                   help="model folder, single-file .safetensors checkpoint or hub id (default: the shipped shapes model)")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other address requires a token)")
    v.add_argument("--port", type=int, default=7860, help="port, 0 for any free one (default 7860)")
    v.add_argument("--data", type=Path, default=Path("stepdiff-studio"),
                   help="folder for the job history (SQLite) and images (default ./stepdiff-studio)")
    v.add_argument("--token", default=None,
                   help="token every API call must carry (default: none on 127.0.0.1, generated and printed elsewhere)")
    v.add_argument("--workers", type=int, default=1, help="jobs run at once on the one loaded model (default 1)")
    v.add_argument("--queue-size", type=int, default=100, help="jobs that may wait; more get HTTP 429 (default 100)")
    v.add_argument("--max-steps", type=int, default=500, help="the most steps a job may ask for (default 500)")
    v.add_argument("--request-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="seconds a client has to send a request's headers, and then its body (default 10); slower "
                        "connections are closed")
    v.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="HTTP connections held at once (default 512, fewer under a low open-file limit); past it the "
                        "connection that waited longest without a request is closed")
    v.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    v.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps or xpu (default cpu)")
    v.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
    v.add_argument("--models", type=Path, default=None, metavar="DIR",
                   help="serve every model folder in DIR (a job's 'model' picks one; default: --model, else the first)")
    v.add_argument("--max-loaded", type=int, default=2, metavar="N",
                   help="with --models: at most N pipelines in memory, the least recently used unloaded (default 2)")
    v.add_argument("--loras", type=Path, default=None, metavar="DIR",
                   help="offer the LoRAs in DIR (.safetensors files, or folders with pytorch_lora_weights.safetensors)")
    v.add_argument("--controlnet", type=Path, default=None, metavar="DIR",
                   help="the ControlNet of control jobs (default: the shipped one, for the shipped model)")
    v.add_argument("--ip-adapter", type=Path, default=None, metavar="DIR",
                   help="an IP-Adapter for jobs with an ip_adapter_image (DIR: ip-adapter.safetensors and image_encoder/; "
                        "UNet models); loaded while such jobs run")
    r = v.add_argument_group("Ray (jobs on Ray actors; the page, queue and history stay in this process)")
    r.add_argument("--ray", action="store_true", help="run the jobs on the actors of a local Ray started for the server")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="run the jobs on the Ray cluster at ADDR (HEAD:6379, ray://HEAD:10001 or auto); the model "
                        "folders must be at the same path on every node")
    r.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="Ray actors, one pipeline and one job at a time each (default: one per GPU of the cluster, "
                        "else 2)")

    return v


# base dependencies declare them
STUDIO_REQUIREMENTS = {"starlette": "starlette>=0.40", "uvicorn": "uvicorn>=0.30", "websockets": "websockets>=12"}


def _check_studio_modules() -> None:
    """Base dependencies since the studio's extra was folded in; an environment without them (an older install, a
    --no-deps install) gets one line saying what to install, before the model loads."""
    import importlib

    missing = []
    for name in STUDIO_REQUIREMENTS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        wanted = " ".join(f"'{STUDIO_REQUIREMENTS[name]}'" for name in STUDIO_REQUIREMENTS)
        raise ValueError(f"serve needs {', '.join(missing)}, missing here (stepdiff depends on it; an older or a --no-deps "
                         f"install may lack it): pip install {wanted}")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.model is not None:
        args.model = _resolve_model("--model", args.model, getattr(args, "allow_pickle", False))
    folder = _folder(args)
    _check_serve_flags(args)
    uses_ray = _check_ray_flags(args)
    _check_studio_modules()
    from ..studio.server import load_studio, serve

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if any(v is not None for v in (args.models, args.loras, args.controlnet, args.ip_adapter)) or uses_ray:
        studio = _catalog_studio(args, folder, uses_ray)
    else:
        studio = load_studio(folder, args.data, workers=args.workers, queue_size=args.queue_size,
                             max_steps=args.max_steps, device=args.device, dtype=args.dtype)
    with contextlib.suppress(KeyboardInterrupt, Terminated):  # Ctrl-C and SIGTERM are how a server stops
        serve(studio, host=args.host, port=args.port, token=args.token, request_timeout=args.request_timeout,
              max_connections=args.max_connections)
    return 0


def _check_serve_flags(args: argparse.Namespace) -> None:
    """The server's own flags, each checked before anything loads."""
    _at_least("--port", args.port, 0, 65535)
    _at_least("--workers", args.workers, 1, 64)
    _at_least("--queue-size", args.queue_size, 1, 100_000)
    _at_least("--max-steps", args.max_steps, 1, MAX_STEPS)
    if args.threads is not None:
        _at_least("--threads", args.threads, 1, 1024)
    if not 0.1 <= args.request_timeout <= 3600:  # also refuses nan
        raise ValueError(f"--request-timeout must be a number of seconds in [0.1, 3600], got {args.request_timeout}")
    if args.max_connections is not None:
        _at_least("--max-connections", args.max_connections, 8, 100_000)
    if args.token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{8,256}", args.token):
        raise ValueError("--token must be 8 to 256 characters from A-Z a-z 0-9 . _ ~ -, got "
                         f"{len(args.token)} characters")
    if args.data.exists() and not args.data.is_dir():
        raise NotADirectoryError(f"--data {str(args.data)!r} is a file, not a folder")
    _check_writable_dir("--data", args.data if args.data.is_dir() else args.data.parent)
    _check_device(args.device)
    _at_least("--max-loaded", args.max_loaded, 1, 64)


def _catalog_studio(args: argparse.Namespace, folder: Any, uses_ray: bool) -> Any:
    """The studio over ``--models`` / ``--loras`` / ``--controlnet`` / ``--ip-adapter`` (a pool of pipelines), its
    jobs on Ray actors with ``--ray`` / ``--ray-address`` (they load while this process does)."""
    from ..studio.catalog import open_catalog
    from ..studio.jobs import Studio, lock_data_folder

    args.data.mkdir(parents=True, exist_ok=True)
    with lock_data_folder(args.data):  # in use: refused before any model loads
        pass
    workers = _start_ray_workers(args, folder) if uses_ray else None
    try:
        pipe, pool, limits = open_catalog(folder, models=args.models, loras=args.loras, controlnet=args.controlnet,
                                          ip_adapter=args.ip_adapter, max_loaded=args.max_loaded, device=args.device,
                                          dtype=args.dtype, max_steps=args.max_steps)
        if workers is not None:
            try:
                workers.wait_ready()
            except RuntimeError as e:
                flag = f"--ray-address {args.ray_address}" if args.ray_address else "--ray"
                raise ValueError(f"{flag}: {e}") from None
        return Studio(pipe, pool.folders[pool.default], args.data, queue_size=args.queue_size, limits=limits,
                      pool=pool, workers=args.workers if workers is None else workers.size, ray=workers)
    except BaseException:
        if workers is not None:
            workers.close()
        raise


def _check_ray_flags(args: argparse.Namespace) -> bool:
    """Whether the jobs run on Ray; the Ray flags checked before anything loads (a ``--ray-address`` must answer)."""
    uses_ray = args.ray or args.ray_address is not None
    if args.ray and args.ray_address is not None:
        raise ValueError("give --ray (start a local Ray) or --ray-address ADDR (join a cluster), not both")
    if args.ray_workers is not None:
        if not uses_ray:
            raise ValueError(f"--ray-workers {args.ray_workers} needs --ray or --ray-address (without them the jobs "
                             "run in this process: --workers)")
        _at_least("--ray-workers", args.ray_workers, 1, 256)
    if uses_ray and args.workers != 1:
        raise ValueError(f"--workers {args.workers}: with --ray the jobs run on Ray actors, one at a time each; give "
                         "--ray-workers N instead")
    if args.ray_address is not None:
        check_ray_address(args.ray_address)
    return uses_ray


def _start_ray_workers(args: argparse.Namespace, folder: Path):
    """Ray started (local) or joined (``--ray-address``), and its actors created: they load the model meanwhile."""
    from ..studio.ray_workers import ActorConfig, RayWorkers

    def where(p: Path | None) -> str | None:  # as every node sees it: absolute
        return None if p is None else str(p.resolve() if p.exists() else p)

    threads = args.threads or 1
    local = args.ray_address is None
    sized = args.ray_workers
    if sized is None and local:  # a local Ray: one actor per GPU here, else 2
        import torch

        sized = torch.cuda.device_count() or 2
    ray, started = start_ray(args.ray_address, sized or 2, threads)
    config = ActorConfig(model=where(Path(folder)), models=where(args.models), loras=where(args.loras),
                         controlnet=where(args.controlnet), ip_adapter=where(args.ip_adapter),
                         max_loaded=args.max_loaded, dtype=args.dtype,
                         threads=threads)
    try:
        return RayWorkers(ray, config, workers=args.ray_workers, cpus=threads, started_here=started, wait=False,
                          strict=local)
    except BaseException:
        if started:
            ray.shutdown()
        raise


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """A ``--ray-address`` that names a head (``HOST:PORT`` or ``ray://HOST:PORT``) must answer on that port now:
    ``ray.init`` itself would retry for minutes. ``auto`` (the cluster this machine is in) is left to Ray."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--ray-address {address!r} is not an address; give HOST:PORT (the head's GCS port, "
                         "6379 by default: HEAD:6379), ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ValueError(f"--ray-address {address!r}: nothing answers there ({e.strerror or e}); start the cluster's "
                         "head with `ray start --head` on that machine, or give its address (HEAD:6379)") from None


def start_ray(address: str | None, workers: int, cpus: float) -> tuple[Any, bool]:
    """``(ray, started_here)``: join the cluster at ``address``, or start a local Ray for ``workers`` actors of
    ``cpus`` CPUs each (GPUs are found by Ray). SIGINT/SIGTERM handlers are put back as they were: the server
    handles them."""
    import signal

    from ..studio.ray_workers import ray_message

    try:
        import ray
    except ImportError as e:
        raise ValueError(f"--ray needs Ray, which is not installed here ({e}); install it with pip install "
                         "'stepdiff[ray]' (or: pip install ray)") from None
    if ray.is_initialized():
        return ray, False
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if address is not None:
            check_ray_address(address)
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, RuntimeError) as e:
                raise ValueError(f"--ray-address {address!r}: Ray could not join the cluster there ({ray_message(e)}); a "
                                 "cluster with token authentication (Ray's default) needs RAY_AUTH_MODE=token and its "
                                 "token here (~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
        else:
            from ..batch.ray_runner import local_ray_options

            ray.init(**local_ray_options(workers, cpus, 0.5), log_to_driver=False)
    finally:
        for s, handler in saved.items():
            if handler is not None:
                signal.signal(s, handler)
    return ray, True
