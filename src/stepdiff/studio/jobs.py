"""The studio's engine: a bounded FIFO queue, worker threads running jobs on one loaded pipeline, the store.

Each job is a run of the engine (``pipeline.steps(...)``) with its own ``CancelToken`` and guidance plan:
cancelling or steering a job reaches exactly that run and nothing else. Workers share the pipeline
(a run owns all per-call state), so ``workers=2`` runs two jobs at once.

The queue never wedges: a worker survives anything a job raises, and a write to the data folder that fails for
want of room or rights (a full disk, a read-only database) is tried again until it succeeds, the worker pausing
meanwhile (``problem`` says why, ``/api/info`` shows it) rather than losing a computed picture or leaving its job
``running``. One studio at a time on a data folder: it holds the folder's lock (``.stepdiff-studio.lock``) from
start-up to ``close()``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import secrets
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..control import CancelToken
from ..preview import PreviewBudget
from .events import EventHub
from .previews import FrameMaker, Previewer, StepUpdate
from .spec import UNSET, FieldError, JobSpec, Limits, parse_job
from .store import FINAL_STATES, JobStore, StoreError

__all__ = ["LOCK_NAME", "GuidancePlan", "JobNotFound", "QueueFull", "Studio", "WrongState"]

SHUTDOWN_REASON = "server shutdown"
LOCK_NAME = ".stepdiff-studio.lock"
# An image write that fails with one of these waits for the disk (or its rights) to come back; others fail the job.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


class _Closing(Exception):
    """The server closes while a storage write keeps failing: the job is left as the database has it (a row still
    marked running is marked interrupted at the next start)."""


class _Dropped(Exception):
    """The user cancelled a job whose picture was waiting to be written: it ends without it."""


class QueueFull(RuntimeError):
    pass


class JobNotFound(LookupError):
    pass


class WrongState(RuntimeError):
    pass


class GuidancePlan:
    """The guidance scale of every step of one job, steerable while it runs.

    ``cfg_cutoff``: guided up to and including step ``int(steps * ratio)``, as ``CFGCutoffCallback``;
    ``interval``: guided on steps in ``[int(steps * start), int(steps * end))``, as ``GuidanceIntervalCallback``
    (Kynkäänniemi et al. 2024); ``gate``: unguided from this step on whatever the steering says, as
    ``TGateCallback`` (its cross-attention is cached from there). Off-guidance steps compute only the
    conditional rows.
    """

    def __init__(self, scale: float, total: int, cfg_cutoff: float | None = None,
                 interval: tuple[float, float] | None = None, gate: int | None = None) -> None:
        self.lock = threading.Lock()
        self.scale, self.total, self.cfg_cutoff, self.interval = scale, total, cfg_cutoff, interval
        self.gate = gate

    def scale_at(self, step: int) -> float:
        if self.gate is not None and step >= self.gate:
            return 0.0
        if self.interval is not None:
            start, end = (int(self.total * r) for r in self.interval)
            return self.scale if start <= step < end else 0.0
        if self.cfg_cutoff is not None and step > int(self.total * self.cfg_cutoff):
            return 0.0
        return self.scale


@dataclass
class _Live:
    """A job the server holds in memory: queued or running."""

    id: str
    spec: JobSpec
    token: CancelToken = field(default_factory=CancelToken)
    plan: GuidancePlan | None = None
    run: Any = None
    steps_completed: int = 0
    model_rows: int = 0
    steering: list[dict[str, Any]] = field(default_factory=list)
    calls_at_cancel: int | None = None
    waiting: str | None = None  # why its picture or its row is not written yet (a full disk), while that lasts


class Studio:
    """Jobs in, images and events out. Thread-safe; the HTTP layer (``app.py``) only calls these methods."""

    def __init__(self, pipeline: Any, model: str | Path, data: str | Path, *, workers: int = 1, queue_size: int = 100,
                 limits: Limits | None = None, start: bool = True) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.pipeline, self.model = pipeline, Path(model)
        self.data = Path(data)
        self.images = self.data / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self._held = contextlib.ExitStack()  # the data folder's lock, released by close()
        self._held.enter_context(lock_data_folder(self.data))
        try:
            self._open(workers, queue_size, limits)
        except BaseException:
            self._held.close()
            raise
        if start:
            self.start()

    def _open(self, workers: int, queue_size: int, limits: Limits | None) -> None:
        """Under the folder's lock: clear what a killed write left, open the history, recover, make the threads."""
        from ..images import remove_stale_temp_files

        self.removed_temp_files = remove_stale_temp_files(self.images)  # no other writer: the lock is ours
        self.limits = limits or Limits()
        self.queue_size, self.workers = queue_size, workers
        self._queue: deque[str] = deque()
        self._live: dict[str, _Live] = {}
        self.store = JobStore(self.data / "studio.sqlite3")
        try:
            self.recovered_interrupted, queued = self.store.recover(self.images)
            self.recovered_failed: list[dict[str, Any]] = []  # queued rows that could not be run (said why)
            for row in queued:  # queued before a crash or a restart: they run, in their order
                spec = self._stored_spec(row)
                if spec is None:
                    self.recovered_failed.append(row)
                    continue
                self._live[row["id"]] = _Live(row["id"], spec)
                self._queue.append(row["id"])
        except BaseException:
            self.store.close()
            raise
        self.hub = EventHub()
        self.frames = FrameMaker(self.pipeline)
        self.previewer = Previewer(self.hub, self.frames)
        self._lock = threading.Condition()
        self._pipes: dict[str | None, Any] = {None: self.pipeline}
        self._closing = False
        self.offer_seconds = 0.0  # worker time spent handing steps to the previewer (benchmarks)
        self.offered_steps = 0
        self.problem: str | None = None  # why a storage write is failing now (a full disk); None when all is well
        self.storage_retry_max = 2.0  # seconds between tries of a failing storage write, at most
        self._stop = threading.Event()  # set by close(): ends the waits between storage retries
        self._threads = [threading.Thread(target=self._work, name=f"stepdiff-worker-{i}", daemon=True)
                         for i in range(workers)]

    def start(self) -> None:
        for t in self._threads:
            if not t.is_alive():
                t.start()

    def _stored_spec(self, row: dict[str, Any]) -> JobSpec | None:
        """A queued row's job as this server would accept it now; a row it would not (unreadable or changed by
        hand, or beyond this server's limits) is marked failed, saying why, and not run."""
        try:
            if row.get("unreadable"):
                raise ValueError(row["unreadable"])
            return parse_job(row["params"], self.limits)
        except (FieldError, ValueError, TypeError) as e:
            why = " ".join(str(e).split())
            self.store.end(row["id"], "failed", error=f"not run: its stored parameters are not a job this server "
                                                        f"accepts ({why})")
            return None

    # ------------------------------------------------------------------ API

    def words(self, prompt: str) -> dict[str, Any]:
        """The prompt's words the model does not know (for the page, before a job is submitted)."""
        import json

        from ..vocabulary import unknown_words, unknown_words_note

        info_file = self.model / "stepdiff.json"
        try:
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        except (OSError, ValueError):
            info = {}
        unknown, known = unknown_words(self.pipeline.tokenizer, prompt, info.get("vocabulary"))
        ignored = bool(info.get("ignores_unknown_words"))
        return {"unknown": unknown, "known": known, "ignored": ignored,
                "message": unknown_words_note(unknown, known, ignored)}

    def check(self, spec: JobSpec) -> None:
        """What depends on the loaded model, before a job is accepted."""
        try:
            self.frames.check(spec.preview.method)
        except ValueError as e:
            raise FieldError("preview.method", spec.preview.method, "auto, linear or vae for this model "
                             f"({e})") from None
        if spec.scheduler is not None:
            try:
                self._pipeline_for(spec.scheduler).scheduler.set_timesteps(spec.steps)
            except ValueError as e:
                raise FieldError("steps", spec.steps, f"allowed by scheduler {spec.scheduler} ({e})") from None
        if spec.fast or spec.cache is not None:
            from ..cache_options import CACHE_GRAMMAR, cache_policies, check_policies

            name = "fast" if spec.fast else "cache"
            try:
                check_policies(cache_policies(spec.fast, spec.cache, spec.steps, name), name,
                               unet=hasattr(getattr(self.pipeline, "unet", None), "up_blocks"))
            except ValueError as e:
                allowed = "false for this model" if spec.fast else f"{CACHE_GRAMMAR}, fbc or adaptive for this model"
                raise FieldError(name, spec.fast if spec.fast else spec.cache, allowed,
                                 " ".join(str(e).split())) from None

    def submit(self, spec: JobSpec, seed_given: bool = True) -> dict[str, Any]:
        if not seed_given:
            spec.seed = secrets.randbelow(2**32)
        self.check(spec)
        job_id = uuid.uuid4().hex
        with self._lock:
            if self._closing:
                raise WrongState("the server is shutting down")
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"the queue is full ({len(self._queue)} jobs waiting, the limit is {self.queue_size}); "
                                "try again when a job has finished, or cancel one")
            self.store.add(job_id, spec.to_dict())
            self._live[job_id] = _Live(job_id, spec)
            self._queue.append(job_id)
            position = len(self._queue)
            self._lock.notify()
        self.hub.publish({"type": "queued", "job": job_id, "position": position, "params": spec.to_dict()})
        return self.get(job_id)

    def get(self, job_id: str) -> dict[str, Any]:
        row = self.store.get(job_id)
        if row is None:
            raise JobNotFound(job_id)
        return self._view(row)

    def history(self, limit: int = 20, before: int | None = None, state: str | None = None) -> dict[str, Any]:
        rows = self.store.page(limit, before, state)
        return {"jobs": [self._safe_view(r) for r in rows], "next": rows[-1]["seq"] if len(rows) == limit else None}

    def cancel(self, job_id: str) -> dict[str, Any]:
        """A queued job leaves the queue; a running one stops before its next model call. Only this job."""
        with self._lock:
            live = self._live.get(job_id)
            if live is not None and job_id in self._queue:
                self.store.cancel_queued(job_id)  # first: a failing write leaves the job queued, as it was
                self._queue.remove(job_id)
                del self._live[job_id]
                queued = True
            else:
                queued = False
        if queued:
            self.hub.publish({"type": "cancelled", "job": job_id, "steps_completed": 0, "image": None})
            return self.get(job_id)
        if live is None:
            row = self.store.get(job_id)
            if row is None:
                raise JobNotFound(job_id)
            if row["state"] == "cancelled":
                return self._view(row)  # cancelling twice is harmless
            raise WrongState(f"job {job_id} is {row['state']}; only a queued or running job can be cancelled")
        if not live.token.cancelled:
            state = live.run.state if live.run is not None else None
            live.calls_at_cancel = state.model_calls if state is not None else 0
            live.token.cancel("cancelled by user")
        return self.get(job_id)

    def steer(self, job_id: str, guidance: float | None, cfg_cutoff: Any = UNSET) -> dict[str, Any]:
        """From the next step on: the guidance scale, and the cutoff (a ratio, or None for none).

        The steering record's ``step`` is the first step not yet done when the request came: it gets the new
        scale unless its model call had already begun, in which case the step after it does.
        """
        live = self._live.get(job_id)
        if live is None or live.plan is None:
            row = self.store.get(job_id)
            if row is None:
                raise JobNotFound(job_id)
            raise WrongState(f"job {job_id} is {row['state']}; only a running job can be steered")
        plan = live.plan
        with plan.lock:
            if guidance is not None:
                plan.scale = guidance
            if cfg_cutoff is not UNSET:
                plan.cfg_cutoff = cfg_cutoff
                plan.interval = None if cfg_cutoff is not None else plan.interval
            step = live.steps_completed
            if live.run is not None and step < plan.total:
                live.run.guidance_scale = plan.scale_at(step)
            live.steering.append({"step": step, "guidance": plan.scale, "cfg_cutoff": plan.cfg_cutoff})
        self.hub.publish({"type": "steered", "job": job_id, "step": step, "guidance": plan.scale,
                          "cfg_cutoff": plan.cfg_cutoff})
        return self.get(job_id)

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring and benchmarks."""
        with self._lock:
            queued, live = len(self._queue), len(self._live)
        return {"queued": queued, "running": live - queued, "problem": self.problem,
                "subscribers": len(self.hub._subscribers),
                "preview_frames": self.previewer.rendered, "preview_render_seconds": round(self.previewer.render_seconds, 4),
                "preview_offer_seconds": round(self.offer_seconds, 4), "preview_offered_steps": self.offered_steps,
                "jobs": self.store.count()}

    def snapshot(self) -> dict[str, Any]:
        """What a newly connected client needs: the jobs in the queue and running."""
        with self._lock:
            ids = list(self._live)
        return {"type": "hello", "jobs": [self.get(i) for i in ids if self.store.get(i) is not None]}

    def image_path(self, name: str) -> Path:
        return self.images / name

    # ------------------------------------------------------------------ views

    def _safe_view(self, row: dict[str, Any]) -> dict[str, Any]:
        """``_view``, or for a row it cannot show, a view of the same shape saying so: one row never hides a page."""
        try:
            return self._view(row)
        except Exception as e:
            return {"id": str(row.get("id")), "seq": row.get("seq"), "state": str(row.get("state")), "params": {},
                    "steps_completed": 0, "total": None, "created": None, "started": None, "finished": None,
                    "record": None, "error": f"this row cannot be shown ({type(e).__name__}: {e})", "image": None,
                    "steering": [], "guidance": None}

    def _view(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row as the API shows it. A row changed by hand or by another version (unreadable JSON, missing keys)
        still makes a view of the same shape, its ``error`` saying what is wrong: it never breaks a page."""
        job_id = row["id"]
        live = self._live.get(job_id)
        params = row["params"] if isinstance(row["params"], dict) else {}
        record = row["record"] if isinstance(row["record"], dict) else None
        error = row["error"]
        if row.get("unreadable"):
            error = f"{error}; {row['unreadable']}" if error else row["unreadable"]
        view = {
            "id": job_id, "seq": row["seq"], "state": row["state"], "params": params,
            "steps_completed": row["steps_completed"], "total": params.get("steps"), "created": row["created"],
            "started": row["started"], "finished": row["finished"], "record": record, "error": error,
            "image": None if row["image"] is None else f"/api/images/{row['image']}",
            "steering": row["steering"] if isinstance(row["steering"], list) else [],
            "guidance": params.get("guidance"),
        }
        if live is not None and row["state"] in ("queued", "running"):
            view["steps_completed"], view["steering"] = live.steps_completed, list(live.steering)
            view["model_rows"] = live.model_rows
            if live.plan is not None:
                view["guidance"] = live.plan.scale
            if row["state"] == "queued":
                with self._lock:
                    view["position"] = self._queue.index(job_id) + 1 if job_id in self._queue else None
        if record is not None:
            with contextlib.suppress(KeyError, TypeError, ValueError, OverflowError):  # two rows a guided step
                view["rows_saved"] = 2 * int(record["steps_completed"]) - int(record["model_rows"])
        elif live is not None:
            view["rows_saved"] = 2 * live.steps_completed - live.model_rows
        if live is not None and live.waiting is not None and row["state"] == "running":
            view["waiting"] = live.waiting
        return view

    # ------------------------------------------------------------------ workers

    def _pipeline_for(self, scheduler: str | None) -> Any:
        """The loaded pipeline, or a view of it with another scheduler (the same modules; nothing is copied)."""
        from ..schedulers import make_scheduler

        with self._lock:
            pipe = self._pipes.get(scheduler)
            if pipe is None:
                base = self.pipeline
                pipe = type(base)(**{**base.components, "scheduler": make_scheduler(scheduler, base.scheduler.config)})
                pipe.set_progress_bar_config(disable=True)
                self._pipes[scheduler] = pipe
            return pipe

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
        from ..cache_options import cache_policies, gate_step
        from ..caching import describe
        from ..metadata import ImageSettings, write_image

        spec = live.spec
        self.hub.publish({"type": "started", "job": live.id, "total": spec.steps})
        state = None
        try:
            policies = cache_policies(spec.fast, spec.cache, spec.steps, "cache")  # new objects: per-run state
            plan = live.plan = GuidancePlan(spec.guidance, spec.steps, spec.cfg_cutoff, spec.guidance_interval,
                                            gate_step(policies))
            pipe = self._pipeline_for(spec.scheduler)
            with plan.lock:
                first = plan.scale_at(0)
            mark = time.perf_counter()  # the job's time so far, for the preview budget below
            run = pipe.steps(
                prompt=spec.prompt, negative_prompt=spec.negative_prompt, num_inference_steps=spec.steps,
                guidance_scale=first, width=spec.width, height=spec.height,
                generator=torch.Generator().manual_seed(spec.seed), cancel=live.token,
                callback_on_step_end=policies or None, interrupt_output="finish",  # Stop: a finished picture
            )
            live.run = run
            total = run.num_timesteps
            every = spec.preview.every or 1
            # "auto" with the model's tiny decoder and no cadence asked: the frame steps are chosen from this job's
            # measured step and frame times so that frames take at most 3% of it (the rule of stepdiff.preview)
            budget = (PreviewBudget() if spec.preview.method == "auto" and spec.preview.every is None
                      and self.frames.resolve("auto") == "tiny" else None)
            for state in run:
                i = state.step_index
                offered = time.perf_counter()
                if budget is not None:
                    budget.step_done(offered - mark)
                with plan.lock:
                    live.steps_completed, live.model_rows = state.steps_completed, state.model_rows
                    if i + 1 < total:
                        run.guidance_scale = plan.scale_at(i + 1)
                if self.hub.listening:
                    if budget is not None:
                        frame_step = budget.wants(i, total)
                    else:
                        frame_step = i % every == 0 or i == total - 1
                    tensor = getattr(state, spec.preview.source) if frame_step else None
                    self.previewer.offer(StepUpdate(
                        job=live.id, step=i, total=total, timestep=float(state.timestep), rows=state.rows_per_step[-1],
                        model_rows=state.model_rows, guidance=state.guidance_scale,
                        tensor=None if tensor is None else tensor[0].detach().float().cpu().clone(),
                        method=spec.preview.method, frame_step=i if frame_step else None,
                        budget=budget if frame_step else None,
                        cadence=every if budget is None else budget.cadence,
                    ))
                    self.offer_seconds += time.perf_counter() - offered
                    self.offered_steps += 1
                mark = time.perf_counter()
                if budget is not None:
                    budget.spend(mark - offered)
            if live.token.cancelled and (live.token.reason == SHUTDOWN_REASON or run.state.steps_completed == 0):
                # a server going down writes the step reached at once; a job stopped before its first step
                # keeps no image, so there is nothing to finish
                run.interrupt_output = "denoised"
            out = run.finish()
            final = self._stopped_state(live) if live.token.cancelled else "finished"
            if out.steps_completed == 0:  # stopped before its first step: only noise to show
                self._end_without_image(live, final, out.record.to_dict())
                return
            record = out.record.to_dict()
            if live.calls_at_cancel is not None:
                record["model_calls_at_cancel"] = live.calls_at_cancel
            name = f"{live.id}.png"
            settings = ImageSettings(
                prompt=spec.prompt, negative_prompt=spec.negative_prompt, seed=spec.seed, steps=spec.steps,
                guidance_scale=spec.guidance, model=str(self.model), cfg_cutoff_ratio=spec.cfg_cutoff,
                cache=describe(policies) or None,
            )
            extra = {"job_id": live.id, "guidance_interval": spec.to_dict()["guidance_interval"],
                     "steering": live.steering}
            try:
                self._keep_trying(live, f"writing image {name}", lambda: write_image(
                    self.images / name, settings, out.images[0], run.scheduler, out, extra=extra), image=True)
            except _Dropped as e:
                self._end_without_image(live, "cancelled", record, f"cancelled while its picture waited to be "
                                                                   f"written: {e}")
                return
            self._keep_trying(live, "recording the job", lambda: self.store.end(
                live.id, final, steps_completed=out.steps_completed, record=record, image=name, steering=live.steering))
            self.previewer.flush(live.id)
            self.hub.publish({"type": final, "job": live.id, "steps_completed": out.steps_completed,
                              "image": f"/api/images/{name}", "record": record})
        except (_Closing, _Dropped):
            raise
        except Exception as e:
            if live.token.cancelled and state is None:  # cancelled while it was being prepared
                self._end_without_image(live, self._stopped_state(live), None)
                return
            self._fail(live, e, 0 if state is None else state.steps_completed)

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

    # ------------------------------------------------------------------ shutdown

    def running(self) -> list[str]:
        with self._lock:
            return [j for j, live in self._live.items() if live.plan is not None]

    def close(self, timeout: float = 30.0) -> None:
        """Stop cleanly: running jobs stop before their next model call, are written and marked interrupted;
        queued jobs stay queued (they run after the next start)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            for live in self._live.values():
                if live.plan is not None:
                    live.token.cancel(SHUTDOWN_REASON)
            self._lock.notify_all()
        self._stop.set()  # a worker waiting for the disk gives up: its row says what the next start finds
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        self.previewer.close()
        self.store.close()
        self._held.close()

    def is_final(self, job_id: str) -> bool:
        row = self.store.get(job_id)
        return row is not None and row["state"] in FINAL_STATES


def lock_data_folder(data: Path):
    """The studio's lock on its data folder (``stepdiff batch``'s folder lock, under the studio's own name): a
    second server on the same folder is refused at once, naming the folder and the fix."""
    from ..batch.manifest import folder_lock

    return folder_lock(data, LOCK_NAME, busy=f"--data {str(data)!r} is in use by another stepdiff serve (it holds "
                                              f"{LOCK_NAME} there); stop that server first, or give this one another "
                                              "--data folder")
