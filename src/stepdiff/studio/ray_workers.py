"""The studio's jobs on Ray actors (``stepdiff serve --ray`` / ``--ray-address``): the web process stays one process
(the page, the API, the queue, the store, the images); each job runs on a Ray actor that holds its own pipelines.

One actor per GPU where the cluster has GPUs (``num_gpus=1`` each), else CPU actors (``--ray-workers``, default 2).
An actor runs one job at a time, with the code of the threaded workers (``Workers._execute_here``: ``execute``, its
``CancelToken``, its ``GuidancePlan``, the preview thread); it is a threaded actor, so ``cancel``, ``steer`` and
``poll`` calls arrive while a job runs. The studio keeps one worker thread per actor (``Studio(workers=N,
ray=...)``): the thread hands its job to a free actor, polls it every ``POLL_SECONDS`` for the job's counters and
its step events (preview frames already rendered and encoded there, the newest step only, a pending frame kept),
publishes them to the ``EventHub``, and writes the images and the record that come back as the threaded worker
does (``Workers._run``). Cancel and steer go to the actor at once, as method calls: the job stops before its next
model call there; a steering change applies from the first step not yet begun there, which is the step recorded.

An actor that dies (a crashed process, a lost node, ``ray.kill``) fails its job, saying so, and is replaced by a
new actor; the queue goes on. The pictures a job uses are read here and sent with it; the model folders (``--model``,
``--models``, ``--loras``, ``--controlnet``) must be at the same path on every node (or on a shared filesystem).
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .execute import JobInputs, JobResult, make_plan
from .outbox import Outbox
from .state import _Live
from .steering import STEER_FIELDS
from .worker import Workers

__all__ = ["ActorConfig", "ActorDied", "RayWorkers", "StudioActor", "ray_message"]

POLL_SECONDS = 0.05  # how often a job's counters and step events are fetched from its actor
CALL_TIMEOUT = 10.0  # seconds a cancel or steer call may take to reach the actor and answer
READY_TIMEOUT = 600.0  # seconds the actors have to load their model at start


class ActorDied(RuntimeError):
    """The Ray actor running a job died: the job fails with this, and the actor is replaced."""


@dataclass
class ActorConfig:
    """What each actor loads: ``serve``'s model flags (paths as every node sees them) and its device."""

    model: str
    models: str | None = None
    loras: str | None = None
    controlnet: str | None = None
    ip_adapter: str | None = None
    max_loaded: int = 2
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None


class _Host(Workers):
    """The actor's half of a ``Studio``: the pool and the preview thread that ``Workers._execute_here`` runs on."""

    ray = None

    def __init__(self, config: ActorConfig, planned: Any) -> None:
        from .catalog import open_catalog
        from .previews import FrameMaker, Previewer

        self.pipeline, self.pool, _ = open_catalog(
            Path(config.model), models=_path(config.models), loras=_path(config.loras),
            controlnet=_path(config.controlnet), ip_adapter=_path(config.ip_adapter), max_loaded=config.max_loaded,
            device=config.device, dtype=config.dtype)
        self.frames = FrameMaker(self.pipeline)
        self.hub = Outbox()
        self.previewer = Previewer(self.hub, self.frames)  # type: ignore[arg-type]  # publish and listening suffice
        self.offer_seconds, self.offered_steps = 0.0, 0
        self._planned_hook = planned

    def _planned(self, live: _Live) -> None:
        self._planned_hook(live)


@dataclass
class _ActorJob:
    live: _Live | None = None
    reason: str | None = None  # a cancel that came before the job started here
    calls_at_cancel: int | None = None
    seq: int = 0  # the newest steering change applied (its index in the studio's list)
    values: dict[str, Any] | None = None  # steered values that came before the job's plan was made
    steering: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


class StudioActor:
    """One pipeline (pool) on a Ray actor, one job at a time; ``ray.remote`` is applied by ``RayWorkers``."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cfg = ActorConfig(**config)
        if cfg.threads is not None:
            import torch

            torch.set_num_threads(cfg.threads)
        self._lock = threading.Lock()
        self._jobs: dict[str, _ActorJob] = {}
        self._done: set[str] = set()
        self.host = _Host(cfg, self._apply_early)
        ctx = ray.get_runtime_context()
        self.label = f"ray:{ctx.get_node_id()[:8]}:{(ctx.get_actor_id() or '-')[:8]}:{os.getpid()}"

    def ready(self) -> str:
        return self.label

    def run(self, job_id: str, spec: Any, inputs: JobInputs, listening: Any) -> JobResult:
        live = _Live(job_id, spec)
        with self._lock:
            job = self._jobs.setdefault(job_id, _ActorJob())
            job.live = live
            live.steering = [e for _, e in sorted(job.steering, key=lambda s: s[0])]
            if job.reason is not None:
                live.token.cancel(job.reason)
        self.host.hub.hear(listening)
        try:
            result = self.host._execute_here(live, inputs)
        finally:
            self.host.previewer.flush(job_id)
            with self._lock:
                self._jobs.pop(job_id, None)
                self._done.add(job_id)
        result.record["worker"] = self.label
        return result

    def _apply_early(self, live: _Live) -> None:
        """The job's plan is made: steering that reached this actor before it now applies."""
        with self._lock:  # then the plan's lock, as in steer
            job = self._jobs.get(live.id)
            if job is not None and job.values is not None:
                with live.plan.lock:
                    live.plan.change(job.values)

    def poll(self, job_id: str, listening: Any) -> dict[str, Any]:
        """The job's counters and the step events its preview thread published since the last poll; ``listening``:
        the studio's ``EventHub.audience()`` (or a bool)."""
        self.host.hub.hear(listening)
        counters = None
        with self._lock:
            job = self._jobs.get(job_id)
            live = job.live if job is not None else None
        if live is not None and live.plan is not None:
            with live.plan.lock:
                run = live.run
                counters = (live.steps_completed, live.model_rows, run.state.model_calls if run is not None else 0)
        return {"events": self.host.hub.take(), "counters": counters}

    def cancel(self, job_id: str, reason: str) -> int | None:
        """Stop the job before its next model call; returns its model calls when the cancel came (None: not
        started here yet, it will start cancelled)."""
        with self._lock:
            if job_id in self._done:
                return None
            job = self._jobs.setdefault(job_id, _ActorJob())
            live = job.live
            if job.calls_at_cancel is None and live is not None and live.run is not None:
                job.calls_at_cancel = live.run.state.model_calls
            job.reason = job.reason or reason
            if live is not None and not live.token.cancelled:
                live.token.cancel(reason)
            return job.calls_at_cancel

    def steer(self, job_id: str, seq: int, values: dict[str, Any], entry: dict[str, Any]) -> int:
        """Apply steering change number ``seq`` (``values``: all the job's steerable values after it, so that
        changes arriving out of order cannot mix); returns the first step it reaches here."""
        with self._lock:
            job = self._jobs.setdefault(job_id, _ActorJob())
            live = job.live
            newest = seq > job.seq
            if newest:
                job.seq, job.values = seq, values  # (_apply_early applies the newest, whenever the plan is made)
            plan = live.plan if live is not None else None
            if plan is None:
                step = 0
            else:
                with plan.lock:
                    if newest:
                        plan.change(values)
                    step = live.steps_completed
                    if newest and live.run is not None:
                        plan.apply(live.run, step)
            job.steering.append((seq, {**entry, "step": step}))
            if live is not None:
                live.steering = [e for _, e in sorted(job.steering, key=lambda s: s[0])]
        return step


@dataclass
class _Slot:
    actor: Any
    label: str | None = None


class RayWorkers:
    """The studio's side: ``size`` actors, the ``execute``/``cancel``/``steer``/``close`` calls ``Studio`` makes."""

    def __init__(self, ray: Any, config: ActorConfig, *, workers: int | None = None, gpus: float | None = None,
                 cpus: float = 1, started_here: bool = False, wait: bool = True, strict: bool = True) -> None:
        """``workers`` actors (default: one per GPU, else 2) of ``gpus`` GPUs (default: 1 where the cluster has
        GPUs, else 0) or ``cpus`` CPUs each. A pool the cluster cannot hold is refused (``strict``: a local Ray) or
        warned about (a cluster may be autoscaling); ``wait``: until every actor has loaded its model."""
        self.ray, self.started_here = ray, started_here
        have_gpus = ray.cluster_resources().get("GPU", 0)
        self.gpus = (1 if have_gpus > 0 else 0) if gpus is None else gpus
        self.size = workers if workers is not None else (max(1, int(have_gpus)) if self.gpus else 2)
        if self.gpus and config.device == "cpu":
            config = ActorConfig(**{**asdict(config), "device": "cuda"})
        self.config, self.cpus = config, cpus
        try:
            self.check_resources()
        except ValueError as e:
            if strict:
                raise
            import warnings

            warnings.warn(f"{e} (an autoscaling cluster may add them; the workers wait until it does)", stacklevel=2)
        self._remote = ray.remote(StudioActor).options(num_cpus=cpus if not self.gpus else 1, num_gpus=self.gpus,
                                                         max_concurrency=8, max_restarts=0)
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self.slots = [_Slot(self._remote.remote(asdict(config))) for _ in range(self.size)]
        self.replaced = 0
        if wait:
            self.wait_ready()
        for slot in self.slots:
            self._free.put(slot)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> list[str]:
        """Wait for every actor to have loaded its model; a failure says which and why."""
        refs = [s.actor.ready.remote() for s in self.slots]
        try:
            labels = self.ray.get(refs, timeout=timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the {self.size} Ray worker(s) did not start within {timeout:g} s (the cluster has "
                               f"{self._resources()}; each needs {self._needs()})") from None
        except self.ray.exceptions.RayError as e:
            raise RuntimeError(f"a Ray worker could not load the model: {ray_message(e)}") from None
        for slot, label in zip(self.slots, labels):
            slot.label = label
        return labels

    def _resources(self) -> str:
        have = self.ray.cluster_resources()
        return f"{have.get('CPU', 0):g} CPU(s) and {have.get('GPU', 0):g} GPU(s)"

    def _needs(self) -> str:
        return "1 GPU and 1 CPU" if self.gpus else f"{self.cpus:g} CPU(s)"

    def check_resources(self) -> None:
        """Refuse a pool the cluster cannot hold (ValueError naming --ray-workers)."""
        have = self.ray.cluster_resources()
        gpus, cpus = self.size * self.gpus, self.size * (1 if self.gpus else self.cpus)
        if gpus > have.get("GPU", 0) or cpus > have.get("CPU", 0):
            raise ValueError(f"--ray-workers {self.size}: the workers need {cpus:g} CPU(s) and {gpus:g} GPU(s) "
                             f"({self._needs()} each); the Ray cluster has {self._resources()}; lower --ray-workers")

    # ------------------------------------------------------------------ the calls Studio makes

    def execute(self, studio: Any, live: _Live) -> JobResult:
        """Run ``live`` on a free actor; relay its counters and step events until it ends. Raises the job's own
        error, or ``ActorDied`` (after replacing the actor)."""
        from ..cache_options import cache_policies

        ray, spec = self.ray, live.spec
        live.plan = make_plan(spec, cache_policies(spec.fast, spec.cache, spec.run_steps, "cache"))  # for steer here
        inputs = studio.read_inputs(spec)
        slot = self._free.get()
        try:
            live.actor = slot.actor
            ref = slot.actor.run.remote(live.id, spec, inputs, studio.hub.audience())
            poll, sent = None, False
            while True:
                if live.token.cancelled and not sent:  # a shutdown (Studio.cancel sends its own at once)
                    slot.actor.cancel.remote(live.id, live.token.reason)
                    sent = True
                done, _ = ray.wait([ref], timeout=POLL_SECONDS)
                if poll is None:
                    poll = slot.actor.poll.remote(live.id, studio.hub.audience())
                if ray.wait([poll], timeout=0)[0]:
                    self._relay(studio, live, poll)  # a dead actor: its run call says so (done)
                    poll = None
                if done:
                    break
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self._replace(slot)
                raise ActorDied(f"the Ray worker running this job ({slot.label or 'starting'}) died at step "
                                f"{live.steps_completed}: {ray_message(e)}; a new worker replaces it") from None
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else RuntimeError(ray_message(e))) from None
            if poll is not None:
                self._relay(studio, live, poll)
            self._relay(studio, live, slot.actor.poll.remote(live.id, studio.hub.audience()))  # the last events
            live.steps_completed = result.steps_completed
            return result
        finally:
            self._free.put(slot)

    def _relay(self, studio: Any, live: _Live, ref: Any) -> bool:
        """One poll's answer to the studio: the job's counters, its events to the hub. False: the actor is gone."""
        try:
            report = self.ray.get(ref, timeout=CALL_TIMEOUT)
        except Exception:  # a dead actor (its run call says so) or a slow answer: the next poll tries again
            return False
        if report["counters"] is not None:
            with live.plan.lock:
                live.steps_completed, live.model_rows, live.model_calls = report["counters"]
        for event in report["events"]:
            studio.hub.publish(event)
        return True

    def _replace(self, slot: _Slot) -> None:
        self.replaced += 1
        try:
            self.ray.kill(slot.actor)
        except Exception:
            pass
        slot.actor, slot.label = self._remote.remote(asdict(self.config)), None

        def label() -> None:
            try:
                slot.label = self.ray.get(slot.actor.ready.remote())
            except Exception:  # its first job will say why
                pass

        threading.Thread(target=label, daemon=True).start()

    def cancel(self, live: _Live) -> None:
        actor = live.actor
        if actor is None:
            return
        try:
            calls = self.ray.get(actor.cancel.remote(live.id, live.token.reason), timeout=CALL_TIMEOUT)
        except Exception:  # a dead actor fails the job anyway; a slow one gets the cancel when it can
            return
        if calls is not None:
            live.calls_at_cancel = calls  # counted on the actor: the driver's count lags by up to a poll

    def steer(self, live: _Live, entry: dict[str, Any]) -> None:
        """Send steering change ``entry`` (the last of ``live.steering``) to the job's actor; ``entry['step']``
        becomes the first step it reaches there."""
        actor = live.actor
        if actor is None:
            return
        seq = next(i for i, e in enumerate(live.steering) if e is entry) + 1
        values = {k: entry[k] for k in STEER_FIELDS if k in entry}
        try:
            entry["step"] = self.ray.get(actor.steer.remote(live.id, seq, values, dict(entry)), timeout=CALL_TIMEOUT)
        except Exception:
            pass

    def labels(self) -> list[str | None]:
        return [s.label for s in self.slots]

    def close(self) -> None:
        for slot in self.slots:
            try:
                self.ray.kill(slot.actor)
            except Exception:
                pass
        if self.started_here:
            self.ray.shutdown()


def _path(p: str | None) -> Path | None:
    return None if p is None else Path(p)


def ray_message(e: BaseException) -> str:
    """A Ray error's own message, without Ray's traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        return f"{type(cause).__name__}: {' '.join(str(cause).split())}"
    text = str(e).strip().splitlines()
    return " ".join(text[0].split()) if text else type(e).__name__
