"""Rows checked against the model before any weights load: sizes, the steps its scheduler can take, the step caching
it supports; the model's defaults filled in and each row's content key set (the hash of its parameters and
the model's identity)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from ..limits import SIZE_LIMIT_RATIO
from ..request import FieldError, SizeRule, check_side
from .row_types import BatchRow, RowError

__all__ = ["check_rows", "model_identity"]


def model_identity(folder: str | Path, dtype: str = "float32") -> str:
    """A fingerprint of a model folder (or single-file checkpoint): every config file's bytes and each weight file's
    name, size and first and last MiB (hashing whole multi-GB weights on every run would cost more than it protects)."""
    folder = Path(folder)
    h = hashlib.sha256(f"dtype={dtype}\n".encode())
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        rel = path.name if path == folder else path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as f:
            if path.suffix in (".json", ".txt") or size <= 2 * 2**20:
                h.update(f.read())
            else:
                h.update(f.read(2**20))
                f.seek(size - 2**20)
                h.update(f.read())
    return h.hexdigest()


def check_rows(rows: list[BatchRow], folder: str | Path, dtype: str, strict: bool, source: str = "INPUT",
               size_limit: bool = True) -> tuple[list[BatchRow], list[RowError]]:
    """Rows checked against the model (sizes, steps its scheduler can take), with the model's defaults
    filled in (size, guidance, scheduler) and each row's content key set. Reads configs only, no weights."""
    from ..cache_options import has_unet
    from ..limits import ModelShape
    from ..loading import default_guidance, scheduler_config
    from ..schedulers import karras_schedulers, make_scheduler, supports_karras

    folder = Path(folder)
    shape = ModelShape.from_folder(folder)
    config = scheduler_config(folder)
    guidance = default_guidance(folder)
    identity = model_identity(folder, dtype)
    unet = has_unet(folder)
    checked: dict[tuple, str | None] = {}
    cache_checked: dict[tuple, str | None] = {}
    out: list[BatchRow] = []
    errors: list[RowError] = []
    for row in rows:
        try:
            row = replace(
                row, width=shape.native_size if row.width is None else row.width,
                height=shape.native_size if row.height is None else row.height,
                guidance_scale=guidance if row.guidance_scale is None else row.guidance_scale,
                scheduler=row.scheduler or config.get("_class_name", "default"),
            )
            for name, v in (("width", row.width), ("height", row.height)):
                try:
                    check_side(v, name, SizeRule.of(shape))
                except FieldError as e:
                    raise RowError(source, row.line, str(e)) from None
                if size_limit and v > SIZE_LIMIT_RATIO * shape.native_size:
                    raise RowError(source, row.line, f"{name} {v} is more than {SIZE_LIMIT_RATIO} times the model's "
                                   f"native {shape.native_size} (the run would be slow and need a lot of memory)")
            sched = (row.scheduler, row.karras, row.steps)
            if sched not in checked:
                checked[sched] = _scheduler_problem(make_scheduler, supports_karras, karras_schedulers, config, *sched)
            if checked[sched] is not None:
                raise RowError(source, row.line, checked[sched])
            if row.cache is not None or row.fast:
                caching = (row.cache, row.fast)
                if caching not in cache_checked:
                    cache_checked[caching] = _cache_problem(row, unet)
                if cache_checked[caching] is not None:
                    raise RowError(source, row.line, cache_checked[caching])
        except RowError as e:
            if strict:
                raise
            errors.append(e)
            continue
        key = hashlib.sha256(json.dumps({"params": row.params(), "model": identity}, sort_keys=True).encode()).hexdigest()
        out.append(replace(row, key=key))
    return out, errors


def _cache_problem(row: BatchRow, unet: bool) -> str | None:
    """What this model refuses of a row's step caching (DeepCache and T-GATE need a UNet), or None."""
    from ..cache_options import cache_policies, check_policies

    name = "fast" if row.fast else "cache"
    try:
        check_policies(cache_policies(row.fast, row.cache, row.steps, name), name, unet)
    except ValueError as e:
        return " ".join(str(e).split())
    return None


def _scheduler_problem(make_scheduler, supports_karras, karras_schedulers, config: dict, name: str, karras: bool,
                       steps: int) -> str | None:
    import warnings

    if karras:
        try:
            if not supports_karras(name):
                return f"scheduler {name!r} has no Karras sigmas; use one of: {', '.join(karras_schedulers())}"
        except ValueError:
            pass
    train = int(config.get("num_train_timesteps", 1000))
    if steps <= train:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_scheduler(name, config, karras=karras).set_timesteps(steps)
    except ValueError as e:
        if "num_inference_steps" in str(e):
            return f"steps must be in [1, {train}] with scheduler {name!r} (trained with {train} steps), got {steps}"
    except Exception:
        return None
    return None
