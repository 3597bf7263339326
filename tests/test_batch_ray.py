"""stepdiff batch on Ray: one local Ray for the whole test session (2 workers, a CPU left free), the tiny
random model, a handful of rows and 2 steps. Ray is in the ``test`` extra: these tests run in CI."""

import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import ray  # a test dependency (the test extra): a missing Ray fails here, it never skips

import stepdiff
from stepdiff.batch import BatchConfig, BatchDefaults, Manifest, run_batch
from stepdiff.batch.ray_runner import STOP_MARKER, local_ray_options

ROWS = [
    {"prompt": "a red circle", "seed": 1},
    {"prompt": "a blue square", "seed": 2, "negative": "red"},
    {"prompt": "a green triangle", "seed": 3},
    {"prompt": "a white circle", "seed": 4, "steps": 3},
    {"prompt": "a black square", "seed": 5, "steps": 3, "cfg_cutoff": 0.5},
    {"prompt": "a red square", "seed": 6, "guidance_interval": "0.5,1"},
]


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session: 2 one-CPU workers plus a CPU left free; a 256 MiB object store."""
    options = local_ray_options(workers=2, cpus_per_worker=1, object_store_gib=0.25)
    # ray.init installs its own SIGTERM/SIGINT handlers in this process; the rest of the suite checks that the
    # CLI restores the default ones, so they are put back here (Ray's driver works without them).
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ray.init(**options, log_to_driver=False)
    for s, handler in saved.items():
        signal.signal(s, handler)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _default_signal_handlers():
    """Whatever a Ray run in this process installs, the next test starts with the handlers it had."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def config(tmp_path: Path, sd_folder: Path, name: str, **kw) -> BatchConfig:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return BatchConfig(input=path, out=tmp_path / name, model=sd_folder, defaults=BatchDefaults(steps=2), progress=False,
                       batch_size=2, **kw)


def test_ray_workers_import_this_stepdiff(local_ray):
    @ray.remote(num_cpus=1)
    def where() -> str:
        import stepdiff as s

        return s.__file__

    assert ray.get(where.remote()) == stepdiff.__file__


def test_same_image_bytes_embedded_and_on_ray_with_1_and_2_workers(tmp_path, sd_folder, local_ray):
    embedded = config(tmp_path, sd_folder, "embedded")
    assert run_batch(embedded).made == 6
    one = run_batch(config(tmp_path, sd_folder, "ray1", ray=True, workers=1))
    two = run_batch(config(tmp_path, sd_folder, "ray2", ray=True, workers=2))
    assert one.made == two.made == 6
    assert len(one.workers) == 1 and all(w.startswith("ray:") for w in one.workers + two.workers)
    assert len(two.workers) == 2, two.workers  # 4 chunks, one in flight per actor: both actors work
    reference = {e["key"]: e for e in Manifest(embedded.out).read()}
    for name in ("ray1", "ray2"):
        entries = {e["key"]: e for e in Manifest(tmp_path / name).read()}
        assert entries.keys() == reference.keys()
        for key, e in entries.items():
            # The whole file: who made it and how long it took are in the manifest, not in the image (issue 24).
            assert (tmp_path / name / e["file"]).read_bytes() == (embedded.out / reference[key]["file"]).read_bytes()
            assert e["sha256"] == reference[key]["sha256"] and e["worker"] != reference[key]["worker"]
            assert (e["line"], e["batch_rows"], e["record"]["rows_per_step"]) == (
                reference[key]["line"], reference[key]["batch_rows"], reference[key]["record"]["rows_per_step"])


def test_ray_resumes_what_an_embedded_run_left_and_skips_what_is_done(tmp_path, sd_folder, local_ray):
    cfg = config(tmp_path, sd_folder, "out")
    rows = cfg.input.read_text().splitlines()
    cfg.input.write_text("\n".join(rows[:3]) + "\n")
    assert run_batch(cfg).made == 3  # embedded: the first three rows
    cfg.input.write_text("\n".join(rows) + "\n")
    on_ray = run_batch(replace(cfg, ray=True, workers=2))
    assert (on_ray.made, on_ray.skipped) == (3, 3)
    entries = Manifest(cfg.out).read()
    assert len(entries) == 6 and sum(e["worker"].startswith("ray:") for e in entries) == 3
    again = run_batch(replace(cfg, ray=True, workers=2))
    assert (again.made, again.skipped) == (0, 6)


def test_more_workers_than_the_ray_instance_has_cpus_for_is_refused_before_work(tmp_path, sd_folder, local_ray):
    with pytest.raises(ValueError, match=r"--workers 3 need 4 CPU\(s\).*the Ray cluster has 3"):
        run_batch(config(tmp_path, sd_folder, "out", ray=True, workers=3))
    with pytest.raises(ValueError, match=r"need 2 GPU\(s\); the Ray cluster has 0"):
        run_batch(config(tmp_path, sd_folder, "out2", ray=True, workers=2, gpus_per_worker=1))
    assert not list((tmp_path / "out").glob("*.png"))


def test_cli_batch_on_ray(tmp_path, sd_folder, local_ray, run_cli):
    cfg = config(tmp_path, sd_folder, "cli")
    code, stdout, err = run_cli("batch", cfg.input, "--out", cfg.out, "--model", sd_folder, "--steps", 2, "--ray",
                                "--workers", 2, "--batch-size", 3)
    assert code == 0, err
    assert "6 image(s) made" in stdout
    assert {e["batch_rows"] for e in Manifest(cfg.out).read()} <= {1, 2, 3}


def test_ctrl_c_during_a_ray_run_stops_it_keeps_what_was_made_and_resume_finishes(tmp_path, sd_folder, local_ray,
                                                                                  run_cli):
    """A real ``stepdiff batch --ray`` process gets SIGINT (Ctrl-C) once its first images are recorded: it says it
    is stopping, Ray's own handler does not take over, the chunk in flight finishes and is recorded, it exits 130
    with a whole manifest and no image outside it, and the same command then makes only the rest."""
    import os
    import subprocess
    import sys
    import time

    rows = tmp_path / "rows.txt"
    rows.write_text("".join(f"a cat number {i}\n" for i in range(12)))
    out = tmp_path / "out"
    argv = ["batch", str(rows), "--out", str(out), "--model", str(sd_folder), "--steps", "40", "--ray", "--workers", "1"]
    src = str(Path(stepdiff.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stepdiff.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    manifest = out / "manifest.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (manifest.is_file() and manifest.read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no image recorded in 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "stopping after the images in flight" in err and "Traceback" not in err
    assert "stopped early: run the same command again to resume" in stdout
    entries = Manifest(out).read()
    assert 1 <= len(entries) < 12
    # The chunk in flight finished and was recorded; the actors skipped the rest: every image made is in the
    # manifest, and the stop marker is gone.
    assert sorted(p.name for p in out.glob("*.png")) == sorted(e["file"] for e in entries)
    assert not (out / STOP_MARKER).exists()
    code, stdout, err = run_cli(*argv)
    assert code == 0, err
    assert f"{12 - len(entries)} image(s) made, {len(entries)} already done" in stdout
    final = Manifest(out).read()
    assert len({e["key"] for e in final}) == 12
    assert sorted(p.name for p in out.glob("*.png")) == sorted({e["file"] for e in final})
