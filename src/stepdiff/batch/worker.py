"""One pipeline that makes chunks of rows and writes their images: the embedded run and each Ray actor
use this same class, so where a chunk runs cannot change its images.

A chunk is rows of one group (same steps, size, guidance, guidance shaping, scheduler, step caching); only prompt,
negative prompt and seed differ, and each row gets its own ``torch.Generator`` seeded with its seed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .rows import BatchRow

__all__ = ["ChunkWorker", "WorkerConfig"]


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker loads its pipeline and where it writes (plain values: it travels to Ray actors)."""

    model: str
    out: str
    dtype: str = "float32"
    device: str = "cpu"
    allow_pickle: bool = False
    threads: int = 1  # torch CPU threads: the same count everywhere gives the same bits


class ChunkWorker:
    """Loads the pipeline once; :meth:`run` makes a chunk's images, writes each atomically, returns entries."""

    def __init__(self, config: WorkerConfig, label: str) -> None:
        import torch

        from ..loading import load_pipeline

        self.config = config
        self.label = label
        torch.set_num_threads(config.threads)
        started = time.perf_counter()
        self.pipe = load_pipeline(Path(config.model), config.dtype, config.allow_pickle)
        self.pipe.to(config.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - started
        self._base_scheduler = self.pipe.scheduler
        self._schedulers: dict[tuple[str, bool], Any] = {}

    def _scheduler(self, name: str, karras: bool):
        from ..schedulers import make_scheduler

        base = self._base_scheduler
        if name == type(base).__name__ and not karras:
            return base
        if (name, karras) not in self._schedulers:
            self._schedulers[(name, karras)] = make_scheduler(name, base.config, karras=karras)
        return self._schedulers[(name, karras)]

    def run(self, rows: list[BatchRow], todo: set[str] | None = None) -> list[dict[str, Any]]:
        """Make ``rows`` (one group) in one pipeline call and write those whose key is in ``todo`` (default:
        all); one manifest entry for each. A failure of the call (bad numbers, a value the pipeline
        refuses) comes back as one error entry per row, so the other chunks go on."""
        import torch

        from ..cache_options import cache_policies
        from ..caching import describe

        first = rows[0]
        assert all(r.group() == first.group() for r in rows), "a chunk holds rows of one group"
        callbacks: list[Any] = first.request().guidance_callbacks()  # the group's cutoff or interval
        policies = cache_policies(first.fast, first.cache, first.steps, "cache")  # new objects: per-run state
        callbacks += policies
        cache = describe(policies) or None
        scheduler = self._scheduler(first.scheduler, first.karras)  # this call's only: the pipeline's stays
        negatives = [r.negative_prompt for r in rows]
        device = self.config.device
        try:
            out = self.pipe.steps(
                scheduler=scheduler, prompt=[r.prompt for r in rows],
                negative_prompt=None if all(n is None for n in negatives) else [n or "" for n in negatives],
                num_inference_steps=first.steps, guidance_scale=first.guidance_scale,
                width=first.width, height=first.height,
                generator=[torch.Generator(device).manual_seed(r.seed) for r in rows],  # seeds belong to rows
                callback_on_step_end=callbacks or None,
            ).run()
        except (ValueError, TypeError, FloatingPointError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            return [{"key": r.key, "line": r.line, "error": f"{type(e).__name__}: {message}", "worker": self.label}
                    for r in rows if todo is None or r.key in todo]
        return [self._write(row, image, out, scheduler, len(rows), cache) for row, image in zip(rows, out.images)
                if todo is None or row.key in todo]

    def _write(self, row: BatchRow, image, out, scheduler, batch_rows: int, cache: str | None = None) -> dict[str, Any]:
        from .. import __version__
        from ..metadata import write_image

        path = Path(self.config.out) / row.file_name
        settings = row.request().image_settings(self.config.model, cache=cache)
        # The file is a function of the row and the model alone: who made it and how long it took (the worker, the
        # wall time) go to the manifest entry, never into the image, so a resumed or Ray-made image has the same bytes.
        record = out.record.to_dict()
        record.pop("wall_seconds", None)
        extra = {"key": row.key, "guidance_interval": row.params()["guidance_interval"], "record": record}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_image(path, settings, image, scheduler, out, extra=extra)
        data = path.read_bytes()
        return {
            "key": row.key, "file": row.file_name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "line": row.line, "index": row.index, **row.params(), "cache": row.cache, "fast": row.fast,
            "cache_policies": cache, "model": self.config.model, "dtype": self.config.dtype,
            "record": out.record.to_dict(), "batch_rows": batch_rows, "worker": self.label,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stepdiff_version": __version__,
        }


def embedded_label() -> str:
    return f"embedded:{socket.gethostname()}:{os.getpid()}"
