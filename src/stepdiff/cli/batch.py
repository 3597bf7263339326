"""``stepdiff batch``: one image per row of a prompt file; resumable; here or on Ray."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..request import GenerationRequest
from .common import _at_least, _check_cache, _check_common, _check_memory, _warn
from .interrupts import _two_step_ctrl_c
from .parser import _add_cache_flags, _add_model_flags, _ratio, _size


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("batch", help="make one image per row of a prompt file; resumable; here or on Ray",
                       description="Make one PNG per row of INPUT (a text file with one prompt a line, JSONL or CSV) "
                                   "into --out, with a manifest (manifest.jsonl). Run it again to resume: rows already "
                                   "made are skipped, changed rows are redone. Flags give the rows' defaults.")
    b.add_argument("input", type=Path, metavar="INPUT", help="prompts: .txt (one a line), .jsonl or .csv")
    b.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created if missing)")
    b.add_argument("--format", choices=("text", "jsonl", "csv"), default=None, help="INPUT's format (default: from its name)")
    _add_model_flags(b)
    b.add_argument("--guidance", type=float, default=None, help="default guidance scale (default: the model's)")
    b.add_argument("--negative", default=None, help="default negative prompt")
    b.add_argument("--seed", type=int, default=0, help="a row without a seed gets SEED + its row number, from 0 (default 0)")
    b.add_argument("--size", type=_size, default=None, help="default WIDTHxHEIGHT (default: the model's)")
    bcut = b.add_mutually_exclusive_group()
    bcut.add_argument("--cfg-cutoff", type=_ratio, default=None, metavar="RATIO", help="default CFG cutoff ratio")
    bcut.add_argument("--cfg-cutoff-step", type=int, default=None, metavar="N", help="default CFG cutoff step")
    bcut.add_argument("--guidance-interval", default=None, metavar="START,END",
                      help="default guidance interval, as ratios of the steps, e.g. 0.2,0.8")
    _add_cache_flags(b, "; the rows' default: a row's own fast or cache replaces it")
    b.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="rows per pipeline call, among rows with the same settings (default 1)")
    b.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads per pipeline (here, or each Ray worker; default 1). The same count "
                        "gives the same image bytes")
    b.add_argument("--strict", action="store_true", help="a bad row fails the run (default: reported and skipped)")
    b.add_argument("--verify", action="store_true",
                   help="on resume, check each done image's SHA-256 against the manifest (default: its size)")
    r = b.add_argument_group("Ray (pip install 'stepdiff[ray]')")
    r.add_argument("--ray", action="store_true", help="run on a local Ray started for this run")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="run on this Ray cluster (auto: the one this machine is in); --out must be a folder every "
                        "node sees")
    r.add_argument("--workers", type=int, default=1, metavar="N", help="Ray actors, one pipeline each (default 1)")
    r.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per worker (default: 1 where the cluster has GPUs, else 0)")

    return b


FLAGS = {"negative_prompt": "--negative", "seed": "--seed", "guidance_scale": "--guidance", "cfg_cutoff": "--cfg-cutoff",
         "cfg_cutoff_step": "--cfg-cutoff-step", "guidance_interval": "--guidance-interval"}


def cmd_batch(args: argparse.Namespace) -> int:
    import threading

    from ..batch import BatchConfig, BatchDefaults, run_batch

    folder = _check_common(args)
    # the rows' defaults, checked as a request (stepdiff.request) with the flags' names
    given = GenerationRequest(
        prompt="", negative_prompt=args.negative, seed=args.seed, guidance_scale=args.guidance,
        cfg_cutoff=args.cfg_cutoff, cfg_cutoff_step=args.cfg_cutoff_step, guidance_interval=args.guidance_interval,
    ).validate(FLAGS, allow_empty_prompt=True)
    interval = given.guidance_interval
    cache = None
    if args.cache is not None or args.fast:
        from ..cache_options import normalize_spec

        _check_cache(args, folder, args.steps)
        cache = None if args.cache is None else normalize_spec(args.cache)
    _at_least("--batch-size", args.batch_size, 1, 4096)
    _at_least("--threads", args.threads, 1, 1024)
    _at_least("--workers", args.workers, 1, 100_000)
    width, height = args.size if args.size is not None else (None, None)
    defaults = BatchDefaults(
        negative_prompt=args.negative, seed=args.seed, steps=args.steps, width=width, height=height,
        guidance_scale=args.guidance, cfg_cutoff=args.cfg_cutoff, cfg_cutoff_step=args.cfg_cutoff_step,
        guidance_interval=interval, scheduler=args.scheduler, karras=args.karras, cache=cache, fast=args.fast,
    )
    config = BatchConfig(
        input=args.input, out=args.out, model=folder, defaults=defaults, format=args.format, dtype=args.dtype,
        device=args.device, allow_pickle=args.allow_pickle, threads=args.threads, batch_size=args.batch_size,
        strict=args.strict, verify=args.verify, ray=args.ray, ray_address=args.ray_address, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
    )
    if not config.uses_ray:
        from ..limits import ModelShape

        shape = ModelShape.from_folder(folder)
        w, h = width or shape.native_size, height or shape.native_size
        _check_memory(args, shape, w, h, args.batch_size, f"--batch-size {args.batch_size} images of {w}x{h}")
    stop = threading.Event()
    try:
        with _stop_on_interrupt(stop):
            result = run_batch(config, stop=stop, on_event=_warn)
    except ImportError as e:  # Ray missing: a flag this installation cannot serve
        raise ValueError(str(e)) from None
    print(result.summary())
    return 130 if result.stopped else 0


def _stop_on_interrupt(stop):
    """First Ctrl-C: finish the images in flight, record them, stop. Second: abort at once."""
    return _two_step_ctrl_c(stop.is_set, stop.set, "stopping after the images in flight")


# What `stepdiff serve` imports (websockets: uvicorn's WebSocket protocol, which it picks at run time), as pyproject.toml's
