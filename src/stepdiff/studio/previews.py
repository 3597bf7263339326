"""Preview frames made off the worker thread, latest first.

A worker hands over a step (its counters and, on a frame step, a copy of the x0 estimate or the latents
of the first image) and goes on with the next step. One renderer thread turns the newest pending step
of each job into a small frame with the existing preview code (``stepdiff.preview``: the model's tiny
decoder, the linear latent-to-RGB table, or the VAE) and publishes the step event. If it falls behind,
older steps are overwritten, never queued: a run is never slowed by its previews, and nothing is
rendered while nobody listens.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..preview import PreviewBudget, load_tiny_decoder, render_frame, table_for, tiny_decode, tiny_decoder_folder
from .events import EventHub

__all__ = ["FrameMaker", "Previewer", "StepUpdate"]

MAX_FRAME_SIDE = 256


@dataclass
class StepUpdate:
    job: str
    step: int  # index of the step just done
    total: int
    timestep: float
    rows: int  # rows computed this step
    model_rows: int  # rows computed so far
    guidance: float
    tensor: torch.Tensor | None = None  # (C, h, w) on a frame step
    method: str = "auto"
    frame_step: int | None = None
    budget: PreviewBudget | None = None  # the job's, when "auto" chooses its frame steps: told what frames cost
    cadence: int | None = None  # steps between frames, as chosen so far (for the step event)
    maker: FrameMaker | None = None  # the job's model's frame maker (serve --models); None: the previewer's
    extra: dict | None = None  # more fields for the step event (the job's steerable values)


class FrameMaker:
    """Frames for one pipeline, with the methods of ``stepdiff.preview``; the tiny decoder loads once, on first use."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self._table = None
        self._tiny = None
        self._tiny_folder = tiny_decoder_folder(pipeline)
        self._lock = threading.Lock()
        self._warm: set[tuple] = set()  # latent sizes the tiny decoder has decoded once
        self.warmup_seconds = 0.0  # of the latest frame: a first decode at its size (not a frame's typical cost)

    def resolve(self, method: str) -> str:
        if method == "auto":
            return "tiny" if self._tiny_folder is not None else "linear"
        return method

    def check(self, method: str) -> None:
        if method == "tiny" and self._tiny_folder is None:
            raise ValueError("this model has no preview_decoder/ folder; use preview method auto, linear or vae")

    @torch.no_grad()
    def frame(self, latents: torch.Tensor, method: str) -> Image.Image:
        method = self.resolve(method)
        if method == "tiny":
            with self._lock:
                if self._tiny is None:
                    self._tiny = load_tiny_decoder(self._tiny_folder, self.pipeline.latent_channels(),
                                                   self.pipeline.vae_scale_factor)
            self.warmup_seconds = 0.0
            key = (tuple(latents.shape), latents.dtype)
            if key not in self._warm:  # a first call at a size costs several frames' time (memory, kernel choice)
                started = time.perf_counter()
                tiny_decode(self._tiny, latents[None])
                self._warm.add(key)
                self.warmup_seconds = time.perf_counter() - started
        else:
            with self._lock:
                if method == "linear" and self._table is None:
                    self._table = table_for(self.pipeline)
        image = render_frame(self.pipeline, latents, method, table=self._table, tiny=self._tiny)
        if max(image.size) > MAX_FRAME_SIDE:
            image.thumbnail((MAX_FRAME_SIDE, MAX_FRAME_SIDE))
        return image


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="WEBP", quality=80)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()


class Previewer:
    def __init__(self, hub: EventHub, frames: FrameMaker) -> None:
        self.hub, self.frames = hub, frames
        self._pending: dict[str, StepUpdate] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.rendered = 0
        self.render_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="stepdiff-previews", daemon=True)
        self._thread.start()

    def offer(self, update: StepUpdate) -> None:
        """From a worker: cheap (a dict assignment under a lock). A pending frame is kept if the newer step has none."""
        with self._cond:
            old = self._pending.get(update.job)
            if update.tensor is None and old is not None and old.tensor is not None:
                update.tensor, update.frame_step, update.method = old.tensor, old.frame_step, old.method
                update.budget = old.budget
            elif old is not None and old.tensor is not None and old.budget is not None:
                old.budget.frame_skipped(old.frame_step)  # replaced by a newer frame before it was made
            self._pending[update.job] = update
            self._cond.notify()

    def flush(self, job: str, timeout: float = 5.0) -> None:
        """Wait until the job's pending step event is out (so that it precedes the job's final event)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (job in self._pending or self._busy == job) and time.monotonic() < deadline:
                self._cond.wait(0.05)

    _busy: str | None = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = next(iter(self._pending))
                update = self._pending.pop(job)
                self._busy = job
            try:
                self._publish(update)
            except Exception as e:  # a frame that cannot be made must not stop the others
                self.hub.publish({"type": "preview_error", "job": update.job, "error": f"{type(e).__name__}: {e}"})
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _publish(self, u: StepUpdate) -> None:
        frame = None
        maker = u.maker or self.frames
        if u.tensor is not None and self.hub.listening:
            started = time.perf_counter()
            try:
                frame = data_url(maker.frame(u.tensor, u.method))
            finally:
                seconds = time.perf_counter() - started
                if u.budget is not None:
                    warmup = min(maker.warmup_seconds, seconds) if frame is not None else 0.0
                    if frame is None:
                        u.budget.frame_skipped(u.frame_step)
                    else:
                        u.budget.frame_done(seconds - warmup)
                    u.budget.spend(warmup if frame is not None else seconds)
            self.render_seconds += seconds
            self.rendered += 1
        elif u.tensor is not None and u.budget is not None:
            u.budget.frame_skipped(u.frame_step)  # nobody watches
        self.hub.publish({
            "type": "step", "job": u.job, "step": u.step, "total": u.total, "timestep": u.timestep, "rows": u.rows,
            "model_rows": u.model_rows, "guidance": u.guidance, "frame": frame,
            "frame_step": u.frame_step if frame is not None else None,
            "frame_method": maker.resolve(u.method), "frame_every": u.cadence, **(u.extra or {}),
        })

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
