"""Every script in benchmarks/ runs (issue 24: `bench_shapes.py speed` broke unnoticed when --overwrite became
required, since nothing ran the benchmarks).

Each script's ``--smoke`` (smallest settings, a few seconds; measures nothing) runs in its own process, forked
from one interpreter that has made the imports all of them share (tests/_smoke_benchmarks.py): as
``python benchmarks/SCRIPT --smoke`` would run it, from a fresh temporary folder. A script must exit 0, print its
table, and write nothing in the repository. A new script without a smoke run here fails the first test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# script -> its smoke runs (argument lists); each run is one process.
RUNS: dict[str, list[list[str]]] = {
    "bench_batch.py": [["--smoke"]],
    "bench_control.py": [["--smoke"]],
    "bench_core.py": [["--smoke"]],
    "bench_fast.py": [["--smoke"]],
    "bench_flux.py": [["--smoke"]],
    "bench_guidance.py": [["--smoke"]],
    "bench_lora.py": [["--smoke"]],
    "bench_model_calls.py": [["--smoke"]],
    "bench_preview.py": [["--smoke"]],
    "bench_preview_real.py": [["--smoke"]],
    "bench_runs.py": [["--smoke"]],
    "bench_shapes.py": [["speed", "--smoke"], ["schedulers", "--smoke"], ["convergence", "--smoke"],
                        ["models", "--smoke"]],
    "bench_stop.py": [["--smoke"]],
    "bench_studio.py": [["previews", "--smoke"]],  # one `stepdiff serve` process, ten WebSocket clients
    "bench_vae.py": [["--smoke"]],
    "convergence_study.py": [["--smoke"]],
}
# Longest first, so that two at a time finish together.
ORDER = ["bench_studio.py", "bench_shapes.py", "bench_fast.py", "bench_batch.py", "bench_control.py"]
PER_RUN_TIMEOUT = 300


def _runs() -> list[str]:
    names = sorted(RUNS, key=lambda n: (n not in ORDER, ORDER.index(n) if n in ORDER else 0, n))
    return [f"{name}:{','.join(args)}" for name in names for args in RUNS[name]]


def _repository_files() -> dict[str, float]:
    """The files of the repository the scripts write in real runs (docs/images/*.png, the docs/*.json results,
    benchmarks/, runs/) and their times. Not the other docs: other work may edit them while this runs."""
    paths = [*(ROOT / "docs" / "images").glob("*"), *(ROOT / "docs").glob("*.json"), *BENCHMARKS.rglob("*"),
             *(ROOT / "runs").rglob("*")]
    return {str(p): p.stat().st_mtime for p in paths if p.is_file() and "__pycache__" not in p.parts}


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(RUNS), "add the new script's smoke run to RUNS (and a --smoke flag to the script)"


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-smoke") / "results.json"
    jobs = max(1, min(2, int(os.environ.get("STEPDIFF_TEST_THREADS", "2"))))  # the suite's CPU share
    before = _repository_files()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_smoke_benchmarks.py"), str(out),
                           str(PER_RUN_TIMEOUT), str(jobs), *_runs()],
                          cwd=ROOT, capture_output=True, text=True, timeout=20 * PER_RUN_TIMEOUT)
    assert proc.returncode == 0 and out.is_file(), proc.stdout + proc.stderr
    results = {r["run"]: r for r in json.loads(out.read_text())}
    return results, before, _repository_files()


@pytest.mark.parametrize("run", _runs())
def test_benchmark_smoke_run(smoke_results, run):
    results, _, _ = smoke_results
    result = results[run]
    assert result["code"] == 0, f"{run} exited {result['code']} after {result['seconds']} s:\n{result['output']}"
    assert "|" in result["output"] or "{" in result["output"], result["output"]  # a table, or JSON results


def test_smoke_runs_write_nothing_in_the_repository(smoke_results):
    _, before, after = smoke_results
    changed = sorted(p for p in after if before.get(p) != after[p])
    assert not changed, f"smoke runs wrote {changed}"
