"""A batch run: check every row, plan what is left to do, make it (here or on Ray), record it.

The plan is what makes a run resumable and its images independent of where they ran:

- rows that share settings are cut into chunks of ``batch_size`` in input order, from *all* the rows
  of the input, done or not. A chunk is one pipeline call. A batched call's numbers differ from a
  single one's in the last bit (the kernels sum in another order), so a chunk always runs whole, even
  when a resume needs only some of its rows: every image is exactly what an uninterrupted run of this
  input with this batch size makes, whichever worker made it, and after any number of resumes;
- a row is done when the manifest's latest entry for its key names an image that is there with the
  recorded size (and hash, with ``verify``). Only rows not done are written; a chunk whose rows are all
  done is not run at all;
- each image is written atomically, then its manifest entry is appended: a crash loses at most the
  chunks in flight (an image without an entry is redone, the same bytes over it).
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest import Manifest, folder_lock
from .rows import BatchDefaults, BatchRow, RowError, check_rows, read_rows

__all__ = ["BatchConfig", "BatchResult", "Chunk", "Plan", "RowFailed", "plan_batch", "run_batch"]


class RowFailed(ValueError):
    """With ``strict``: a row's pipeline call failed (the message names its line); the run stopped."""


@dataclass
class BatchConfig:
    """One ``stepdiff batch`` run; every field is a CLI flag."""

    input: Path
    out: Path
    model: Path | None = None  # None: the shipped model
    defaults: BatchDefaults = field(default_factory=BatchDefaults)
    format: str | None = None  # text, jsonl or csv; None: from INPUT's name
    dtype: str = "float32"
    device: str = "cpu"
    allow_pickle: bool = False
    threads: int = 1  # torch CPU threads per pipeline (embedded, and each Ray worker)
    batch_size: int = 1  # rows per pipeline call
    strict: bool = False  # a bad row fails the run (before any work) instead of being reported and skipped
    verify: bool = False  # resume checks each done image's SHA-256, not only its size
    progress: bool | None = None  # None: a bar when stderr is a terminal
    ray: bool = False  # start a local Ray
    ray_address: str | None = None  # or join this cluster ("auto": the one this machine belongs to)
    workers: int = 1
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0
    object_store_gib: float = 0.25  # a local Ray's object store (only manifest entries travel through it)

    @property
    def uses_ray(self) -> bool:
        return self.ray or self.ray_address is not None


@dataclass
class Chunk:
    rows: list[BatchRow]
    todo: list[str]  # keys of the rows to write (the others are done; they are computed, not written)


@dataclass
class Plan:
    rows: list[BatchRow]  # valid, unique
    bad: list[RowError]
    duplicates: list[tuple[int, int]]  # (line, line of the same row before it)
    done: list[str]
    chunks: list[Chunk]
    model: Path
    check_seconds: float = 0.0

    @property
    def todo(self) -> int:
        return sum(len(c.todo) for c in self.chunks)


@dataclass
class BatchResult:
    out: Path
    manifest: Path
    made: int = 0
    skipped: int = 0  # done before this run
    bad: list[RowError] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line, why) of rows whose pipeline call failed
    duplicates: list[tuple[int, int]] = field(default_factory=list)
    stopped: bool = False  # stopped early (Ctrl-C): run again to resume
    seconds: float = 0.0
    startup_seconds: float = 0.0  # from the start to the first image (Ray start, model loads)
    workers: list[str] = field(default_factory=list)
    removed_temp_files: list[Path] = field(default_factory=list)  # half-written images a killed run left

    def summary(self) -> str:
        parts = [f"{self.made} image(s) made", f"{self.skipped} already done"]
        if self.bad:
            parts.append(f"{len(self.bad)} bad row(s) skipped")
        if self.failed:
            parts.append(f"{len(self.failed)} row(s) failed")
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} duplicate row(s)")
        text = ", ".join(parts) + f" in {self.seconds:.1f} s; images and {self.manifest.name} in {self.out}"
        if self.stopped:
            text += "; stopped early: run the same command again to resume"
        return text


def _done(entry: dict[str, Any] | None, out: Path, verify: bool) -> bool:
    if entry is None or "error" in entry or not isinstance(entry.get("file"), str):
        return False
    path = out / entry["file"]
    try:
        if path.stat().st_size != entry.get("bytes"):
            return False
    except OSError:
        return False
    return not verify or hashlib.sha256(path.read_bytes()).hexdigest() == entry.get("sha256")


def plan_batch(config: BatchConfig) -> Plan:
    """Read and check every row, then decide what this run must do. Loads no model; writes nothing."""
    from ..models import default_model

    started = time.perf_counter()
    folder = Path(config.model) if config.model is not None else default_model()
    rows, bad = read_rows(config.input, config.defaults, config.format, strict=config.strict)
    rows, more = check_rows(rows, folder, config.dtype, strict=config.strict, source=str(config.input))
    bad = sorted(bad + more, key=lambda e: e.line)
    first: dict[str, BatchRow] = {}
    duplicates = []
    for row in rows:
        if row.key in first:
            duplicates.append((row.line, first[row.key].line))
        else:
            first[row.key] = row
    unique = list(first.values())
    latest = Manifest(config.out).latest() if config.out.is_dir() else {}
    done = {row.key for row in unique if _done(latest.get(row.key), config.out, config.verify)}
    groups: dict[tuple, list[BatchRow]] = {}
    for row in unique:
        groups.setdefault(row.group(), []).append(row)
    chunks = []
    for members in groups.values():
        for i in range(0, len(members), config.batch_size):
            part = members[i : i + config.batch_size]
            todo = [r.key for r in part if r.key not in done]
            if todo:
                chunks.append(Chunk(part, todo))
    chunks.sort(key=lambda c: c.rows[0].index)
    return Plan(unique, bad, duplicates, sorted(done), chunks, folder, time.perf_counter() - started)


def run_batch(config: BatchConfig, stop: threading.Event | None = None,
              on_event: Callable[[str], None] | None = None) -> BatchResult:
    """Make every row of ``config.input`` that is not done yet; see the module docstring.

    ``stop``: set it (e.g. on Ctrl-C) to finish the chunks in flight and return early. ``on_event``
    gets one line for each bad or failed row (the CLI prints them as warnings).
    """
    started = time.perf_counter()
    config.out = Path(config.out)
    _check_config(config)
    ray = _import_ray() if config.uses_ray else None
    plan = plan_batch(config)
    say = on_event or (lambda line: None)
    for e in plan.bad:
        say(f"{e}; row skipped")
    for line, before in plan.duplicates:
        say(f"{config.input} line {line} repeats line {before} (same parameters and seed): one image for both")
    config.out.mkdir(exist_ok=True)
    result = BatchResult(out=config.out, manifest=Manifest(config.out).path, skipped=len(plan.done), bad=plan.bad,
                         duplicates=plan.duplicates)
    with folder_lock(config.out), Manifest(config.out) as manifest:
        from ..images import remove_stale_temp_files

        result.removed_temp_files = remove_stale_temp_files(config.out)  # left by a run killed mid-write
        if not plan.chunks:
            result.seconds = time.perf_counter() - started
            return result
        bar = _progress(config, plan)
        try:
            if ray is not None:
                from .ray_runner import run_on_ray

                entries = run_on_ray(ray, config, plan, stop)
            else:
                entries = _run_embedded(config, plan, stop)
            _record(entries, config, result, manifest, say, bar, stop, started)
        except BaseException as e:
            e.stepdiff_kept = (f"kept the {result.made} image(s) made in this run (and {result.skipped} from before) "  # type: ignore[attr-defined]
                               f"with their manifest entries in {config.out}; run the same command again to resume")
            raise
        finally:
            if bar is not None:
                bar.close()
    result.stopped = result.stopped or (stop is not None and stop.is_set() and result.made + len(result.failed) < plan.todo)
    result.seconds = time.perf_counter() - started
    return result


def _record(entries: Iterable[dict[str, Any]], config: BatchConfig, result: BatchResult, manifest: Manifest,
            say: Callable[[str], None], bar: Any, stop: threading.Event | None, started: float) -> None:
    """Each finished row as it comes: its manifest entry, or its failure (which ends a --strict run)."""
    for entry in entries:
        if "error" in entry:
            result.failed.append((entry["line"], entry["error"]))
            say(f"{config.input} line {entry['line']}: {entry['error']}; row failed")
            if config.strict:
                raise RowFailed(f"{config.input} line {entry['line']}: {entry['error']} (--strict: the run "
                                   f"stops; {result.made} image(s) made are kept, run again to resume)")
        else:
            manifest.append(entry)
            result.made += 1
            if result.made == 1:
                result.startup_seconds = time.perf_counter() - started
            if entry["worker"] not in result.workers:
                result.workers.append(entry["worker"])
        if bar is not None:
            bar.update(1)
        if stop is not None and stop.is_set():
            result.stopped = True


def _check_config(config: BatchConfig) -> None:
    def at_least(flag: str, value: Any, low: float, high: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # refuses nan
            raise ValueError(f"{flag} must be a number in [{low:g}, {high:g}], got {value!r}")

    at_least("--batch-size", config.batch_size, 1, 4096)
    at_least("--threads", config.threads, 1, 1024)
    at_least("--workers", config.workers, 1, 100_000)
    if config.gpus_per_worker is not None:
        at_least("--gpus-per-worker", config.gpus_per_worker, 0, 64)
    if not isinstance(config.batch_size, int) or not isinstance(config.workers, int) or not isinstance(config.threads, int):
        raise ValueError("--batch-size, --threads and --workers must be whole numbers")
    if config.ray and config.ray_address is not None:
        raise ValueError("give --ray (start a local Ray) or --ray-address ADDR (join a cluster), not both")
    if not config.uses_ray and (config.workers != 1 or config.gpus_per_worker is not None):
        flag = "--workers" if config.workers != 1 else "--gpus-per-worker"
        raise ValueError(f"{flag} needs --ray or --ray-address (without them the run is embedded: one pipeline here)")
    out = config.out
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; give a folder (it is created if missing)")
    from ..images import check_writable_dir

    check_writable_dir((out if out.exists() else out.parent).resolve(), "--out")


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError(f"--ray needs Ray with Ray Data, which is not installed here ({e}); install it with "
                          "pip install 'stepdiff[ray]'  (or: pip install 'ray[data]')") from None
    return ray


def _progress(config: BatchConfig, plan: Plan):
    if config.progress is False:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=plan.todo, unit="img", desc="stepdiff batch", file=sys.stderr, dynamic_ncols=True,
                disable=None if config.progress is None else False)


def _run_embedded(config: BatchConfig, plan: Plan, stop: threading.Event | None) -> Iterator[dict[str, Any]]:
    import torch

    from .worker import ChunkWorker, WorkerConfig, embedded_label

    threads = torch.get_num_threads()
    try:
        worker = ChunkWorker(WorkerConfig(str(plan.model), str(config.out), config.dtype, config.device,
                                          config.allow_pickle, config.threads), embedded_label())
        for chunk in plan.chunks:
            if stop is not None and stop.is_set():
                return
            todo = set(chunk.todo)
            yield from worker.run(chunk.rows, todo)
    finally:
        torch.set_num_threads(threads)
