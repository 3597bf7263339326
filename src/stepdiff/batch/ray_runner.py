"""The batch run on Ray Data: the chunks become a Dataset, ``map_batches`` runs them on a pool of actors,
each holding one pipeline (:class:`~stepdiff.batch.worker.ChunkWorker`, the embedded run's own class).

Who writes what: each actor writes its images itself, atomically, into ``--out`` (on a cluster that
folder must be one every node sees: NFS, a cloud bucket mounted with FUSE, ...), so image bytes never
travel through the object store and writing scales with the workers. The actors return only the
manifest entries, and the driver alone appends them as they stream back: one writer keeps the
manifest whole, and an entry exists only once its image is on disk.

One dataset row is one chunk and ``batch_size=1``, so a chunk's rows stay together whatever the pool
size: the images are the same bytes with 1, 2 or 100 workers as in the embedded run. Each actor has one
chunk in flight at a time: chunks spread over all the actors, and a crash loses at most one chunk per actor.

Stopping (Ctrl-C): the driver writes ``STOP_MARKER`` into ``--out``, the folder every actor sees; an actor
skips a chunk it has not started once the marker is there, and the driver keeps recording what comes back,
so the chunks in flight finish and are recorded, as in the embedded run, and no image is left unrecorded.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .rows import BatchRow
from .worker import WorkerConfig

__all__ = ["STOP_MARKER", "RayChunkActor", "local_ray_options", "run_on_ray"]

STOP_MARKER = ".stepdiff-stop"  # in --out while a stopped run drains: actors skip the chunks they have not started
_SKIPPED = json.dumps({"skipped": True})


def _row_from_dict(d: dict[str, Any]) -> BatchRow:
    if d.get("guidance_interval") is not None:
        d = {**d, "guidance_interval": tuple(d["guidance_interval"])}
    return BatchRow(**d)


class RayChunkActor:
    """The ``map_batches`` class: one pipeline per actor, loaded once in ``__init__``."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray

        from .worker import ChunkWorker

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        ctx = ray.get_runtime_context()
        label = f"ray:{ctx.get_node_id()[:8]}:{(ctx.get_actor_id() or 'task')[:8]}:{os.getpid()}"
        self.worker = ChunkWorker(WorkerConfig(**config), label)
        self.stop_marker = Path(config["out"]) / STOP_MARKER

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        if self.stop_marker.exists():  # the run is stopping: this chunk was not started, so it is left for a resume
            return {"entry": np.array([_SKIPPED] * len(batch["chunk"]), dtype=object)}
        entries = []
        for text in batch["chunk"]:
            chunk = json.loads(str(text))
            rows = [_row_from_dict(d) for d in chunk["rows"]]
            entries.extend(self.worker.run(rows, set(chunk["todo"])))
        return {"entry": np.array([json.dumps(e) for e in entries], dtype=object)}


def local_ray_options(workers: int, cpus_per_worker: float, object_store_gib: float = 0.25) -> dict[str, Any]:
    """``ray.init`` arguments for a local Ray sized for this run: the workers' CPUs plus one left free,
    so Ray Data's own tasks (reading the rows, moving blocks) always get a CPU and the pipeline cannot
    stall behind a pool that holds them all; an explicit, small object store (only manifest entries go
    through it); and the workers import the same stepdiff as this process, offline."""
    import stepdiff

    package_root = str(Path(stepdiff.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return {
        "address": "local",
        "num_cpus": int(workers * max(1, cpus_per_worker)) + 1,
        "object_store_memory": int(object_store_gib * 2**30),
        "include_dashboard": False,
        "runtime_env": {"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                                     "DIFFUSERS_VERBOSITY": "error"}},
    }


def run_on_ray(ray, config, plan, stop: threading.Event | None) -> Iterator[dict[str, Any]]:
    """Stream the plan's chunks through an actor pool; yields each manifest entry as it comes back."""
    started_here = False
    if not ray.is_initialized():
        if config.ray_address is not None:
            ray.init(address=config.ray_address, log_to_driver=False)
        else:
            ray.init(**local_ray_options(config.workers, config.threads, config.object_store_gib), log_to_driver=False)
        started_here = True
    try:
        gpus = config.gpus_per_worker
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        try:
            _check_resources(ray, config.workers, gpus, config.threads)
        except ValueError as e:
            if config.ray_address is None:
                raise
            warnings.warn(f"{e} (an autoscaling cluster may add them; the run waits until it does)", stacklevel=2)
        device = "cuda" if gpus > 0 else config.device
        worker = WorkerConfig(str(plan.model), str(Path(config.out).resolve()), config.dtype, device,
                              config.allow_pickle, config.threads)
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        saved = ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.wait_for_min_actors_s
        ctx.enable_progress_bars = False  # ours counts images, with an ETA
        ctx.print_on_execution_start = False
        if config.ray_address is None:  # a local Ray sized for the pool: start every actor before the first chunk,
            ctx.wait_for_min_actors_s = 600  # so the chunks spread over all of them (a cluster may be autoscaling)
        items = [{"chunk": json.dumps({"rows": [{**asdict(r), "guidance_interval": r.params()["guidance_interval"]}
                                                 for r in c.rows], "todo": c.todo})} for c in plan.chunks]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(
                RayChunkActor, fn_constructor_kwargs={"config": asdict(worker)}, batch_size=1, batch_format="numpy",
                compute=ActorPoolStrategy(size=config.workers, max_tasks_in_flight_per_actor=1),
                num_cpus=config.threads if gpus == 0 else 1, num_gpus=gpus,
            )
        marker = Path(config.out) / STOP_MARKER
        marker.unlink(missing_ok=True)  # left by a run that was killed while it drained
        finished = threading.Event()
        watcher = threading.Thread(target=_mark_stop, args=(stop, finished, marker), daemon=True)
        watcher.start()
        try:
            for row in ds.iter_rows():
                if row["entry"] != _SKIPPED:
                    yield json.loads(row["entry"])
        finally:
            finished.set()
            watcher.join()
            marker.unlink(missing_ok=True)
            ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.wait_for_min_actors_s = saved
    finally:
        if started_here:
            ray.shutdown()


def _mark_stop(stop: threading.Event | None, finished: threading.Event, marker: Path) -> None:
    """Write the stop marker as soon as ``stop`` is set (not when the next entry happens to come back)."""
    while not finished.wait(0.1):
        if stop is not None and stop.is_set():
            marker.touch()
            return


def _check_resources(ray, workers: int, gpus: float, threads: int) -> None:
    total = ray.cluster_resources()
    need_gpu = workers * gpus
    if need_gpu > total.get("GPU", 0):
        raise ValueError(f"--workers {workers} with --gpus-per-worker {gpus:g} need {need_gpu:g} GPU(s); the Ray cluster "
                         f"has {total.get('GPU', 0):g}; lower --workers, or pass --gpus-per-worker 0 to run on CPUs")
    need_cpu = workers * (threads if gpus == 0 else 1) + 1
    if need_cpu > total.get("CPU", 0):
        raise ValueError(f"--workers {workers} need {need_cpu:g} CPU(s) ({threads if gpus == 0 else 1} each and one "
                         f"left free for Ray Data's own tasks); the Ray cluster has {total.get('CPU', 0):g}; lower "
                         "--workers or --threads")
