"""stepdiff batch on the shipped model: 64 prompts, embedded against Ray with 1 and 2 workers.

    python benchmarks/bench_batch.py [--rows 64] [--steps 10] [--only embedded,batched,ray1,ray2,resume,load]
    python benchmarks/bench_batch.py --smoke   # resume and manifest on 2 rows of 1 step: checks the script runs

Each configuration runs in its own Python process (a fresh Ray, a fresh model load), and a sampler reads
the resident memory of that process and all its descendants (the Ray processes and actors) every 0.2 s:
"peak memory" is the largest sum, an upper bound (pages shared between processes, the torch libraries,
count once per process). Every pipeline uses 1 torch thread. Reported per configuration:

- seconds for the whole run, from before Ray starts (where it does) to the last manifest entry;
- seconds to the first image (Ray start, actor start, model load, first chunk);
- images/s over the whole run, and in the steady state (after the first image);
- for Ray: ``ray.init`` alone (start-up cost);
- resume: a second run over the finished output (nothing to do): size check, and with ``--verify``;
- load: the model load of one pipeline (the scaling model's per-worker fixed cost);
- manifest: fsync'ed manifest appends per second and planning rows per second (the driver's limits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]


def prompts_file(folder: Path, rows: int) -> Path:
    lines = []
    for i in range(rows):
        color, shape, bg = COLORS[i % 8], SHAPES[(i // 8) % 3], COLORS[(i * 3 + 1) % 8]
        if bg == color:
            bg = COLORS[(i * 3 + 2) % 8]
        lines.append(json.dumps({"prompt": f"a {color} {shape} on a {bg} background", "seed": i}))
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def one(name: str, rows: int, steps: int, folder: Path, smoke: bool = False) -> dict:
    """One configuration, in this process (``smoke``: the manifest measure on 20 entries and 100 rows)."""
    from stepdiff.batch import BatchConfig, BatchDefaults, run_batch

    prompts = prompts_file(folder, rows)
    out = folder / "out"
    base = BatchConfig(input=prompts, out=out, defaults=BatchDefaults(steps=steps), progress=False, threads=1)
    result: dict = {"name": name}
    if name == "load":
        from stepdiff.batch.worker import ChunkWorker, WorkerConfig
        from stepdiff.models import default_model

        loads = []
        for _ in range(3):
            loads.append(ChunkWorker(WorkerConfig(str(default_model()), str(folder)), "bench").load_seconds)
        result["load_seconds"] = loads
        return result
    if name == "manifest":  # the driver's side at scale: durable appends per second, planning per row
        from stepdiff.batch import Manifest, plan_batch

        entry = json.loads(json.dumps({"key": "0" * 64, "file": "x.png", "record": {"rows_per_step": [2] * 25},
                                       "prompt": "a red circle on a blue background " * 3, "seed": 1, "steps": 25}))
        appends, planned = (20, 100) if smoke else (1000, 10_000)
        with Manifest(folder) as m:
            started = time.perf_counter()
            for i in range(appends):
                entry["key"] = f"{i:064d}"
                m.append(entry)
            result["manifest_appends_per_second"] = appends / (time.perf_counter() - started)
        big = prompts_file(folder, planned)
        for _ in range(2):  # the second: without the first's imports (torch, diffusers)
            started = time.perf_counter()
            plan_batch(BatchConfig(input=big, out=folder / "empty", defaults=BatchDefaults(steps=steps)))
            result["plan_rows_per_second"] = planned / (time.perf_counter() - started)
        result["planned_rows"] = planned
        return result
    if name.startswith("ray"):
        import ray

        from stepdiff.batch.ray_runner import local_ray_options

        workers = int(name[3:])
        started = time.perf_counter()
        ray.init(**local_ray_options(workers, 1), log_to_driver=False)
        result["ray_init_seconds"] = time.perf_counter() - started
        base.ray, base.workers = True, workers
    if name == "batched":
        base.batch_size = 4
    started = time.perf_counter()
    r = run_batch(base)
    total = time.perf_counter() - started + result.get("ray_init_seconds", 0.0)
    first = r.startup_seconds + result.get("ray_init_seconds", 0.0)
    result.update(made=r.made, seconds=total, first_image_seconds=first, images_per_second=r.made / total,
                  steady_images_per_second=(r.made - 1) / max(1e-9, total - first), workers=len(r.workers))
    if name == "resume":
        for verify in (False, True):
            base.verify = verify
            times = []
            for _ in range(3):
                started = time.perf_counter()
                again = run_batch(base)
                times.append(time.perf_counter() - started)
                assert again.made == 0 and again.skipped == rows
            result["noop_resume_verify" if verify else "noop_resume"] = times
    return result


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        ppid = int(fields.get("PPid", "0").strip())
        children.setdefault(ppid, []).append(int(entry))
        if "VmRSS" in fields:
            rss[int(entry)] = int(fields["VmRSS"].split()[0]) * 1024
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def measure(name: str, rows: int, steps: int, smoke: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent / "src")}
        proc = subprocess.Popen([sys.executable, __file__, "--one", name, "--rows", str(rows), "--steps", str(steps),
                                 "--folder", tmp, *(["--smoke"] if smoke else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, stderr = proc.communicate()
        done.set()
        sampler.join()
        if proc.returncode != 0:
            raise SystemExit(f"{name}: exit {proc.returncode}\n{stderr[-3000:]}")
        result = json.loads(stdout.strip().splitlines()[-1])
        result["peak_memory_mib"] = peak[0] / 2**20
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", default="load,embedded,batched,ray1,ray2,resume")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help="smallest settings, a few seconds: checks that the script runs (tests/test_benchmarks.py)")
    args = parser.parse_args()
    if args.smoke and args.one is None:
        args.rows, args.steps, args.only = 2, 1, "resume,manifest"
    if args.one is not None:
        print(json.dumps(one(args.one, args.rows, args.steps, args.folder, args.smoke)))
        return
    results = []
    for name in args.only.split(","):
        if args.smoke and name == "manifest":  # in this process: the subprocess and the sampler ran for "resume"
            with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
                r = {**one(name, args.rows, args.steps, Path(tmp), smoke=True), "peak_memory_mib": 0.0}
        else:
            r = measure(name, args.rows, args.steps, args.smoke)
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{args.rows} rows, {args.steps} steps, shipped model (64x64), 1 torch thread per pipeline, os.cpu_count()="
          f"{os.cpu_count()}, load average {os.getloadavg()[0]:.2f}\n")
    print("| run | images/s | steady images/s | s to first image | total s | ray.init s | peak memory MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "seconds" in r:
            init = f"{r['ray_init_seconds']:.1f}" if "ray_init_seconds" in r else "-"
            print(f"| {r['name']} | {r['images_per_second']:.2f} | {r['steady_images_per_second']:.2f} | "
                  f"{r['first_image_seconds']:.1f} | {r['seconds']:.1f} | {init} | {r['peak_memory_mib']:.0f} |")
    for r in results:
        if "noop_resume" in r:
            print(f"\nno-op resume over {args.rows} done rows: {min(r['noop_resume']):.2f} s (sizes), "
                  f"{min(r['noop_resume_verify']):.2f} s (--verify: SHA-256 of every image); best of 3, in-process")
        if "manifest_appends_per_second" in r:
            print(f"\nmanifest: {r['manifest_appends_per_second']:.0f} fsync'ed appends/s (this disk); planning "
                  f"{r['plan_rows_per_second']:.0f} rows/s (read, check, key; {r['planned_rows']:,} rows, no manifest)")
        if "load_seconds" in r:
            print(f"\nmodel load (one pipeline): {min(r['load_seconds']):.2f} s best of 3 "
                  f"({', '.join(f'{x:.2f}' for x in r['load_seconds'])})")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
