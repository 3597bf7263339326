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
import secrets
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from .events import EventHub
from .execute import SHUTDOWN_REASON, JobInputs, image_names
from .intake import check_job, read_inputs
from .pool import PipelinePool
from .previews import FrameMaker, Previewer
from .spec import FieldError, JobSpec, Limits, parse_job
from .state import JobNotFound, QueueFull, WrongState, _Live
from .steering import GuidancePlan
from .store import FINAL_STATES, JobStore
from .uploads import Uploads
from .worker import STORAGE_ERRNOS, Workers

__all__ = ["LOCK_NAME", "STORAGE_ERRNOS", "GuidancePlan", "JobNotFound", "QueueFull", "Studio", "WrongState"]

LOCK_NAME = ".stepdiff-studio.lock"


class Studio(Workers):
    """Jobs in, images and events out. Thread-safe; the HTTP layer (``app.py``) only calls these methods."""

    def __init__(self, pipeline: Any, model: str | Path, data: str | Path, *, workers: int = 1, queue_size: int = 100,
                 limits: Limits | None = None, start: bool = True, pool: PipelinePool | None = None,
                 ray: Any = None) -> None:
        """``pool``: the served models (``serve --models``/``--loras``; default: ``pipeline`` alone, named as its
        folder); ``ray``: a ``ray_workers.RayWorkers`` that runs the jobs on Ray actors, one worker thread each."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.pipeline, self.model = pipeline, Path(model)
        self.pool = pool or PipelinePool({self.model.name: self.model}, self.model.name, _no_loader,
                                         preloaded={self.model.name: pipeline})
        self.ray = ray
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
        self._frame_makers: dict[str, FrameMaker] = {}
        self.previewer = Previewer(self.hub, self.frames)
        self.uploads = Uploads(self.data / "uploads")
        self._lock = threading.Condition()
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
        """What depends on the loaded model and the uploads, before a job is accepted (``intake.check_job``)."""
        check_job(self, spec)

    def read_inputs(self, spec: JobSpec) -> JobInputs:
        return read_inputs(self.uploads, spec)

    def upload(self, data: bytes) -> dict[str, Any]:
        return self.uploads.add(data)

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
            live.calls_at_cancel = state.model_calls if state is not None else live.model_calls
            live.token.cancel("cancelled by user")
            if self.ray is not None:
                self.ray.cancel(live)
        return self.get(job_id)

    def steer(self, job_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """From the next step on: ``changes`` checked by ``steering.parse_steer`` (guidance, cfg_cutoff,
        guidance_interval, control_scale, ip_adapter_scale). A field the job does not use is a ``FieldError``.

        The steering record's ``step`` is the first step not yet done when the request came: it gets the new
        values unless its model call had already begun, in which case the step after it does.
        """
        live = self._live.get(job_id)
        if live is None or live.plan is None:
            row = self.store.get(job_id)
            if row is None:
                raise JobNotFound(job_id)
            raise WrongState(f"job {job_id} is {row['state']}; only a running job can be steered")
        plan = live.plan
        with plan.lock:
            plan.change(changes)
            step = live.steps_completed
            if live.run is not None:
                plan.apply(live.run, step)
            values = plan.values()
            entry = {"step": step, **values, "changed": sorted(changes)}
            live.steering.append(entry)
        if self.ray is not None:  # on a Ray actor: the entry's step becomes the first step it reaches there
            self.ray.steer(live, entry)
        self.hub.publish({"type": "steered", "job": job_id, **entry})
        return self.get(job_id)

    def delete(self, job_id: str) -> dict[str, Any]:
        """Remove a finished (cancelled, failed, interrupted) job: its row and its images. A queued or running
        job is refused (``WrongState``): cancel it first. Its uploads stay (other jobs may use them)."""
        with self._lock:
            if job_id in self._live:
                state = "queued" if job_id in self._queue else "running"
                raise WrongState(f"job {job_id} is {state}; cancel it first (POST /api/jobs/{job_id}/cancel), then "
                                 "delete it")
            row = self.store.get(job_id)
            if row is None:
                raise JobNotFound(job_id)
            self.store.delete(job_id)
        removed = []
        count = row["params"].get("num_images", 1) if isinstance(row["params"], dict) else 1
        for name in image_names(job_id, max(1, int(count) if isinstance(count, int) else 1)):
            with contextlib.suppress(FileNotFoundError):
                (self.images / name).unlink()
                removed.append(name)
        self.hub.publish({"type": "deleted", "job": job_id})
        return {"id": job_id, "deleted": True, "images_removed": removed}

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
            "images": [] if row["image"] is None else [f"/api/images/{n}" for n in image_names(job_id, _count(params))],
            "steering": row["steering"] if isinstance(row["steering"], list) else [],
            "guidance": params.get("guidance"),
        }
        if isinstance(params.get("strength"), (int, float)) and isinstance(params.get("steps"), int) \
                and params.get("init_image") is not None:
            view["total"] = max(1, min(params["steps"], int(params["steps"] * params["strength"])))
        if live is not None and row["state"] in ("queued", "running"):
            view["steps_completed"], view["steering"] = live.steps_completed, list(live.steering)
            view["model_rows"] = live.model_rows
            if live.plan is not None:
                view["guidance"] = live.plan.scale
                with live.plan.lock:
                    view["steer"] = live.plan.values()
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
        if self.ray is not None:
            self.ray.close()
        self.previewer.close()
        self.store.close()
        self._held.close()

    def is_final(self, job_id: str) -> bool:
        row = self.store.get(job_id)
        return row is not None and row["state"] in FINAL_STATES


def _count(params: dict[str, Any]) -> int:
    count = params.get("num_images", 1)
    return count if isinstance(count, int) and 1 <= count <= 8 else 1


def _no_loader(folder: Path) -> Any:
    raise RuntimeError(f"the studio serves one model, loaded at start; it cannot load {str(folder)!r}")


def lock_data_folder(data: Path):
    """The studio's lock on its data folder (``stepdiff batch``'s folder lock, under the studio's own name): a
    second server on the same folder is refused at once, naming the folder and the fix."""
    from ..batch.manifest import folder_lock

    return folder_lock(data, LOCK_NAME, busy=f"--data {str(data)!r} is in use by another stepdiff serve (it holds "
                                              f"{LOCK_NAME} there); stop that server first, or give this one another "
                                              "--data folder")
