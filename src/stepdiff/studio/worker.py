"""The studio's workers: threads that take jobs from the queue, run them (here, or on Ray actors) and write what
they made. Nothing a job raises ends a worker; a write to the data folder that fails for want of room or rights is
tried again until it succeeds (``_keep_trying``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from ..images import save_image
from ..preview import frame_latents
from .execute import SHUTDOWN_REASON, JobInputs, JobResult, execute, image_names, make_plan
from .previews import EVENT_GAP, FrameMaker, StepUpdate, StreamBudget
from .state import _Closing, _Dropped, _Live
from .store import StoreError

__all__ = ["STORAGE_ERRNOS", "Workers"]

# An image write that fails with one of these waits for the disk (or its rights) to come back; others fail the job.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


class Workers:
    """The worker half of ``Studio`` (``jobs.py``): its threads run ``_work``."""

    def _next(self) -> _Live | None:
        with self._lock:
            while not self._queue and not self._closing:
                self._lock.wait()
            if self._closing:
                return None
            job_id = self._queue.popleft()
            return self._live.get(job_id)

    def _work(self) -> None:
        """One worker: takes jobs until the server closes. Nothing a job raises ends it."""
        while True:
            live = self._next()
            if live is None:
                return
            try:
                if self._keep_trying(live, "starting the job", functools.partial(self.store.start, live.id)):
                    self._run(live)
            except _Closing:
                pass  # the database keeps what it has: a job still queued runs after the next start
            except Exception as e:  # a bug: it costs this job, never the worker
                print(f"stepdiff serve: job {live.id} failed unexpectedly:", file=sys.stderr)
                traceback.print_exc()
                with contextlib.suppress(Exception):  # (_Closing too): recording it must not end the worker either
                    self._fail(live, e, 0)
            finally:
                with self._lock:
                    self._live.pop(live.id, None)

    def _keep_trying(self, live: _Live | None, what: str, write: Callable[[], Any], image: bool = False) -> Any:
        """``write()`` until it succeeds. A store write that fails (``StoreError``: a full disk, a read-only
        database) or an image write that fails with one of ``STORAGE_ERRNOS`` is tried again, ever less often
        (up to ``storage_retry_max`` s apart), ``problem`` and the job's ``waiting`` saying why meanwhile; any other
        error is raised. Raises ``_Closing`` when the server closes first, and for an image, ``_Dropped`` when the user
        cancels the job meanwhile (the only way to drop a picture that cannot be written)."""
        delay = 0.05
        while True:
            try:
                result = write()
            except StoreError as e:
                message = str(e)
            except OSError as e:
                if not image or e.errno not in STORAGE_ERRNOS:
                    raise
                message = f"the image cannot be written in {str(self.images)!r} ({e.strerror or e}); the job waits " \
                          "until it can (free space on that disk, or make the folder writable)"
            else:
                if live is not None and live.waiting is not None:
                    if self.problem == live.waiting:
                        self.problem = None
                        self.hub.publish({"type": "problem", "error": None})
                    live.waiting = None
                return result
            if self.problem != message:
                print(f"stepdiff serve: {what} for job {live.id if live else '-'}: {message}", file=sys.stderr)
                self.hub.publish({"type": "problem", "error": message})
            self.problem = message
            if live is not None:
                live.waiting = message
                if image and live.token.cancelled and live.token.reason != SHUTDOWN_REASON:
                    raise _Dropped(message)
            if self._stop.wait(delay):
                raise _Closing(message)
            delay = min(2 * delay, self.storage_retry_max)

    def _fail(self, live: _Live, e: BaseException, done: int) -> None:
        message = f"{type(e).__name__}: {' '.join(str(e).split())}"
        self._keep_trying(live, "recording the failure", lambda: self.store.end(
            live.id, "failed", steps_completed=done, error=message, steering=live.steering))
        self.previewer.flush(live.id)
        self.hub.publish({"type": "failed", "job": live.id, "error": message})

    def _run(self, live: _Live) -> None:
        spec = live.spec
        self.hub.publish({"type": "started", "job": live.id, "total": spec.run_steps})
        live.started = True
        try:
            if self.ray is not None:
                result = self.ray.execute(self, live)
            else:
                result = self._execute_here(live)
        except (_Closing, _Dropped):
            raise
        except Exception as e:
            if live.token.cancelled and live.steps_completed == 0 and live.run is None:  # cancelled while prepared
                self._end_without_image(live, self._stopped_state(live), None)
                return
            self._fail(live, e, live.steps_completed)
            return
        final = self._stopped_state(live) if live.token.cancelled else "finished"
        record = result.record
        if live.calls_at_cancel is not None:
            record["model_calls_at_cancel"] = live.calls_at_cancel
        if result.steps_completed == 0:  # stopped before its first step: only noise to show
            self._end_without_image(live, final, record)
            return
        names = image_names(live.id, len(result.images))
        try:
            for name, image, (parameters, meta) in zip(names, result.images, result.metadata):
                self._keep_trying(live, f"writing image {name}", functools.partial(
                    save_image, image, self.images / name, parameters, meta), image=True)
        except _Dropped as e:
            for name in names:
                with contextlib.suppress(OSError):
                    (self.images / name).unlink()
            self._end_without_image(live, "cancelled", record, f"cancelled while its picture waited to be written: {e}")
            return
        self._keep_trying(live, "recording the job", lambda: self.store.end(
            live.id, final, steps_completed=result.steps_completed, record=record, image=names[0],
            steering=live.steering))
        self.previewer.flush(live.id)
        self.hub.publish({"type": final, "job": live.id, "steps_completed": result.steps_completed,
                          "image": f"/api/images/{names[0]}", "images": [f"/api/images/{n}" for n in names],
                          "record": record})

    def _pipeline_for(self, scheduler: str | None, kind: str = "text2image", control: bool = False,
                      model: Any = None) -> Any:
        """The pipeline a job runs on: a view of its model's modules for its kind and scheduler (nothing copied)."""
        return self.pool.view(model if model is not None else self.pool.peek(), scheduler, kind, control)

    def frame_maker(self, model: Any) -> FrameMaker:
        """The preview frames of ``model`` (a ``pool.LoadedModel``); the default model's are ``self.frames``."""
        if model.pipe is self.pipeline:
            return self.frames
        maker = getattr(model, "frames", None)
        if maker is None:
            maker = model.frames = FrameMaker(model.pipe)  # goes with the model when the pool unloads it
        return maker

    def _execute_here(self, live: _Live, inputs: JobInputs | None = None) -> JobResult:
        """The job on this process's pipelines, previews offered from each step (``_offer``); ``inputs``: its pictures
        (default: read from the uploads here)."""
        from ..cache_options import cache_policies

        spec = live.spec
        policies = cache_policies(spec.fast, spec.cache, spec.run_steps, "cache")  # new objects: per-run state
        live.plan = make_plan(spec, policies)
        self._planned(live)
        if inputs is None:
            inputs = self.read_inputs(spec)
        with self.pool.use(spec.model, spec.loras, ip_adapter=spec.ip_adapter_image is not None) as model:
            pipe = self._pipeline_for(spec.scheduler, spec.kind, spec.control is not None, model)
            maker = self.frame_maker(model)
            clock = {"mark": time.perf_counter()}
            budget = (StreamBudget() if spec.preview.method == "auto" and spec.preview.every is None
                      and maker.resolve("auto") == "tiny" else None)

            def started(run: Any) -> None:
                live.run = run

            def step(run: Any, state: Any) -> None:
                offered = time.perf_counter()
                if budget is not None:
                    budget.step_done(offered - clock["mark"], clock.get("seen"))
                i, total = state.step_index, run.num_timesteps
                frame_step = False
                if self.hub.listening:
                    frame_step = budget.wants(i, total) if budget is not None else \
                        (i % (spec.preview.every or 1) == 0 or i == total - 1)
                tensor = frame_latents(run.pipeline, getattr(state, spec.preview.source)) if frame_step else None
                self._offer(live, i, total, float(state.timestep), state.rows_per_step[-1], state.steps_completed,
                            state.model_rows, state.guidance_scale, tensor, budget, maker)
                clock["mark"] = time.perf_counter()
                if budget is not None:
                    budget.overhead(clock["mark"] - offered)
                    clock["seen"] = budget.mark()  # frames in the making as the next step starts

            return execute(pipe, spec, inputs, live.token, live.plan, policies, job_id=live.id, model=model.folder,
                           on_start=started, on_step=step, steering=lambda: live.steering)

    def _planned(self, live: _Live) -> None:
        """Called once the job's plan is made, before its run starts (a Ray actor applies steering that came first)."""

    def _offer(self, live: _Live, i: int, total: int, timestep: float, rows: int, steps_completed: int,
               model_rows: int, guidance: float, tensor: Any, budget: Any = None, maker: Any = None) -> None:
        """A step done: the job's counters, and the step (with its frame tensor, if any) to the preview thread."""
        offered = time.perf_counter()
        plan = live.plan
        with plan.lock:
            live.steps_completed, live.model_rows = steps_completed, model_rows
            values = plan.values()
        if not self.hub.listening:
            return
        if tensor is None and i < total - 1 and offered - live.last_event < EVENT_GAP:
            return  # a step event without a frame at most every EVENT_GAP seconds: the counters are in the next one
        live.last_event = offered
        every = live.spec.preview.every or 1
        self.previewer.offer(StepUpdate(
            job=live.id, step=i, total=total, timestep=timestep, rows=rows, model_rows=model_rows, guidance=guidance,
            tensor=None if tensor is None else tensor.detach().float().cpu().clone(), method=live.spec.preview.method,
            frame_step=i if tensor is not None else None, budget=budget,
            cadence=every if budget is None else budget.cadence, maker=maker,
            extra={"steer": values},
        ))
        self.offer_seconds += time.perf_counter() - offered
        self.offered_steps += 1

    @staticmethod
    def _stopped_state(live: _Live) -> str:
        return "interrupted" if live.token.reason == SHUTDOWN_REASON else "cancelled"

    def _end_without_image(self, live: _Live, final: str, record: dict | None, error: str | None = None) -> None:
        if record is not None and live.calls_at_cancel is not None:
            record["model_calls_at_cancel"] = live.calls_at_cancel
        self._keep_trying(live, "recording the job", lambda: self.store.end(
            live.id, final, steps_completed=0 if record is None else record.get("steps_completed", 0), record=record,
            error=error, steering=live.steering))
        self.previewer.flush(live.id)
        self.hub.publish({"type": final, "job": live.id, "steps_completed": 0, "image": None, "record": record})

