"""Preview frames made off the worker thread, latest first.

A worker hands over a step (its counters and, on a frame step, a copy of the x0 estimate or the latents
of the first image) and goes on with the next step. One renderer thread turns the newest pending step
of each job into a small frame with the existing preview code (``stepdiff.preview``: the model's tiny
decoder, the linear latent-to-RGB table, or the VAE) and publishes the step event. If it falls behind,
older steps are overwritten, never queued: a run is never slowed by its previews, and nothing is
rendered while nobody listens.

A job's ``auto`` previews are paced by its ``StreamBudget``: the whole cost of streaming (drawing, encoding,
serialising and publishing a frame, writing it to every client, and the plain step events between frames) is charged
to it, so that streaming stays within ``PREVIEW_SHARE`` of the job's time whatever the number of clients.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..preview import PREVIEW_SHARE, PreviewBudget, load_tiny_decoder, render_frame, table_for, tiny_decode, tiny_decoder_folder
from .events import EventHub

__all__ = ["EVENT_GAP", "FrameMaker", "Previewer", "StepUpdate", "StreamBudget"]

MAX_FRAME_SIDE = 256
EVENT_GAP = 0.25  # seconds between a job's step events without a frame (the last step's is always sent)


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
    budget: StreamBudget | None = None  # the job's, when "auto" chooses its frame steps: told what streaming costs
    cadence: int | None = None  # steps between frames, as chosen so far (for the step event)
    maker: FrameMaker | None = None  # the job's model's frame maker (serve --models); None: the previewer's
    extra: dict | None = None  # more fields for the step event (the job's steerable values)


class StreamBudget(PreviewBudget):
    """``PreviewBudget``'s rule for a studio job, with the whole cost of streaming counted.

    A frame's cost ``d`` is what the preview thread spends on it (its CPU time drawing, WebP, base64, the JSON and the
    hand-over to the event hub) plus writing it to every client listening (``EventHub.delivery_seconds``), plus the
    contention it causes: the steps that overlap the making of a frame are compared with the quiet ones (the recent
    mean), and the difference (the GIL, a core shared with the denoising thread) is charged too. On a machine with no
    core to spare, CPU time and contention overlap, so the budget errs on the side of fewer frames. Ten clients make
    a frame dearer than one, and the cadence widens. The step events between frames cost something too
    (``overhead``: the preview thread's work, the writes to every client, the worker's hand-over); the projected share
    counts their mean per step, ``o``, for every step left, and the steady cadence is the smallest ``k`` with
    ``(d + k * o) / (k * (s + o) + d) <= share``. The last step gets no frame: the job's image follows it at once.
    """

    def __init__(self, share: float = PREVIEW_SHARE) -> None:
        super().__init__(share)
        self.overhead_spent = 0.0  # streaming seconds outside frames so far
        self.quiet_seconds: list[float] = []  # steps during which no frame was being made
        self.contention = 0.0  # steps overlapping a frame: their time over a quiet step's, summed (signed)
        self._making = 0  # frames the preview thread is making now
        self._changes = 0  # frame starts and ends so far

    def making(self, started: bool) -> None:
        """The preview thread starts (True) or has ended (False) making a frame and handing it over."""
        with self._lock:
            self._making += 1 if started else -1
            self._changes += 1

    def mark(self) -> tuple[int, int]:
        """What the start of a step sees of the frames being made: pass it to ``step_done`` at its end."""
        with self._lock:
            return self._changes, self._making

    def step_done(self, seconds: float, mark: tuple[int, int] | None = None) -> None:
        """A step's time without preview work; ``mark``: ``mark()`` at its start. A step that overlapped the making
        of a frame counts as a quiet step, and its time over that as contention."""
        seconds = max(float(seconds), 0.0)
        with self._lock:
            busy = mark is not None and (mark[1] > 0 or self._making > 0 or self._changes != mark[0])
            if busy and len(self.quiet_seconds) > 1:  # (the first step carries the run's setup: not a quiet step's time)
                quiet = self._estimate(self.quiet_seconds)
                self.contention += seconds - quiet
                seconds = quiet
            elif not busy:
                self.quiet_seconds.append(seconds)
            self.step_seconds.append(seconds)
            self.elapsed += seconds

    def overhead(self, seconds: float) -> None:
        """Streaming time that is no frame (a plain step event, the worker's hand-over)."""
        with self._lock:
            self.overhead_spent += max(float(seconds), 0.0)
            self.spent += max(float(seconds), 0.0)

    def per_step(self) -> float:
        """``o``: the streaming time outside frames per step so far."""
        return self.overhead_spent / len(self.step_seconds) if self.step_seconds else 0.0

    def frame_cost(self) -> float:
        """``d``: a frame's recent CPU and delivery time, plus the contention so far per frame made."""
        if not self.frame_seconds:
            return 0.0
        return self._estimate(self.frame_seconds) + max(self.contention, 0.0) / len(self.frame_seconds)

    @property
    def measured_share(self) -> float:
        spent = self.spent + max(self.contention, 0.0)
        total = self.elapsed + spent
        return spent / total if total > 0 else 0.0

    def projected_share(self, k: int, step_index: int, total_steps: int) -> float:
        d = self.frame_cost()
        s = self._estimate(self.step_seconds) if self.step_seconds else 0.0
        left = total_steps - 1 - step_index
        nxt = max(self.frame_steps[-1] + k, step_index)
        frames = len(range(nxt, total_steps - 1, k))  # the cadence's; none at the last step
        preview = self.spent + max(self.contention, 0.0) + (self._pending + frames) * d + left * self.per_step()
        run = self.elapsed + left * s + preview
        return preview / run if run > 0 else 0.0

    def steady_cadence(self) -> int:
        d = self.frame_cost()
        s = self._estimate(self.step_seconds) if self.step_seconds else 0.0
        room = self.share * s - (1 - self.share) * self.per_step()
        if d <= 0:
            return 1
        if room <= 0:  # the step events alone take the share: no frame but the first
            return 1 << 30
        return max(1, math.ceil(d * (1 - self.share) / room - 1e-9))

    def wants(self, step_index: int, total_steps: int) -> bool:
        if step_index >= total_steps - 1 and self.frame_steps:
            return False  # the job's image follows at once
        return super().wants(step_index, total_steps)


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
        maker = u.maker or self.frames
        # The budget is charged this thread's CPU time: what it takes from the cores the steps run on (its wall time
        # would count the waits for the GIL while the worker runs, which cost the run nothing).
        started, cpu = time.perf_counter(), time.thread_time()
        making = u.tensor is not None and self.hub.listening and isinstance(u.budget, StreamBudget)
        if making:
            u.budget.making(True)  # type: ignore[union-attr]
        try:
            self._render_and_publish(u, maker, started, cpu)
        finally:
            if making:
                u.budget.making(False)  # type: ignore[union-attr]

    def _render_and_publish(self, u: StepUpdate, maker: FrameMaker, started: float, cpu: float) -> None:
        frame, warmup = None, 0.0
        if u.tensor is not None and self.hub.listening:
            try:
                frame = data_url(maker.frame(u.tensor, u.method))
                warmup = min(maker.warmup_seconds, time.thread_time() - cpu)
            except Exception:
                if u.budget is not None:
                    u.budget.frame_skipped(u.frame_step)
                    u.budget.spend(time.thread_time() - cpu)
                raise
            finally:
                self.render_seconds += time.perf_counter() - started
                self.rendered += 1
        elif u.tensor is not None and u.budget is not None:
            u.budget.frame_skipped(u.frame_step)  # nobody watches
        self.hub.publish({
            "type": "step", "job": u.job, "step": u.step, "total": u.total, "timestep": u.timestep, "rows": u.rows,
            "model_rows": u.model_rows, "guidance": u.guidance, "frame": frame,
            "frame_step": u.frame_step if frame is not None else None,
            "frame_method": maker.resolve(u.method), "frame_every": u.cadence, **(u.extra or {}),
        })
        if u.budget is not None:
            self._charge(u.budget, frame is not None, time.thread_time() - cpu, warmup)

    def _charge(self, budget: PreviewBudget, framed: bool, seconds: float, warmup: float) -> None:
        """The whole cost of one step event to the job's budget: the preview thread's ``seconds`` (a first decode at a
        size, ``warmup``, is no frame's typical cost) and the writes to every client (``delivery_seconds``)."""
        delivery = getattr(self.hub, "delivery_seconds", None)
        seconds += delivery(framed) if delivery is not None else 0.0
        if framed:
            budget.frame_done(seconds - warmup)
            budget.spend(warmup)
        elif isinstance(budget, StreamBudget):
            budget.overhead(seconds)
        else:
            budget.spend(seconds)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
