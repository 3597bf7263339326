"""The studio's jobs on Ray actors (``stepdiff serve --ray``): a local Ray (2 one-CPU actors, a CPU left free, a small
object store, as tests/test_batch_ray.py), the tiny random model. The same image as in-process, cancel within one
model call, steering from the next step, step events through Ray, and an actor killed mid-job."""

import io
import os
import signal

import pytest
import ray  # a test dependency (the test extra): a missing Ray fails here, it never skips
from PIL import Image
from starlette.testclient import TestClient

import stepdiff
from stepdiff.batch.ray_runner import local_ray_options
from stepdiff.studio import Studio, create_app
from stepdiff.studio.ray_workers import ActorConfig, RayWorkers
from stepdiff.studio.server import limits_for

from .conftest import wait_job as wait

PROMPT = "a red circle on a blue background"
LONG = 500  # steps of a job that must still be running while a test acts on it


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for 2 one-CPU actors plus a CPU left free (or the one another module started)."""
    started = not ray.is_initialized()
    if started:
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        ray.init(**local_ray_options(workers=2, cpus_per_worker=1, object_store_gib=0.25), log_to_driver=False)
        for s, handler in saved.items():
            signal.signal(s, handler)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_pipe(sd_folder):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def on_ray(local_ray, tiny_pipe, sd_folder, tmp_path_factory):
    """One studio for the module whose 2 worker threads run their jobs on 2 Ray actors."""
    workers = RayWorkers(local_ray, ActorConfig(model=str(sd_folder), threads=1), workers=2)
    studio = Studio(tiny_pipe, sd_folder, tmp_path_factory.mktemp("ray-data"), workers=workers.size,
                    limits=limits_for(sd_folder, 500), ray=workers)
    with TestClient(create_app(studio)) as client:
        yield studio, client, workers


def submit(client, **fields):
    r = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 4, **fields})
    assert r.status_code == 201, r.text
    return r.json()



def pixels(client, url) -> bytes:
    r = client.get(url)
    assert r.status_code == 200
    return Image.open(io.BytesIO(r.content)).convert("RGB").tobytes()


def test_a_job_on_an_actor_makes_the_images_of_the_same_job_in_process(on_ray, tiny_pipe, sd_folder, tmp_path):
    studio, client, workers = on_ray
    job = dict(seed=11, steps=5, cfg_cutoff=0.5, num_images=2, guidance=6.0)
    done = wait(client, submit(client, **job)["id"])
    assert done["state"] == "finished", done
    worker = done["record"]["worker"]
    assert worker in workers.labels() and not worker.endswith(f":{os.getpid()}")  # another process: an actor
    here = Studio(tiny_pipe, sd_folder, tmp_path / "here", limits=limits_for(sd_folder, 500))
    with TestClient(create_app(here)) as local:
        ref = wait(local, submit(local, **job)["id"])
    assert ref["state"] == "finished" and len(ref["images"]) == len(done["images"]) == 2
    assert done["record"]["rows_per_step"] == ref["record"]["rows_per_step"] == [4, 4, 4, 2, 2]  # 2 images, guided through step 2
    for a, b in zip(done["images"], ref["images"]):
        assert pixels(client, a) == pixels(local, b)
    assert pixels(client, done["images"][0]) != pixels(client, done["images"][1])  # seeds 11 and 12


def test_cancel_on_an_actor_stops_within_one_model_call(on_ray):
    studio, client, _ = on_ray
    job = submit(client, steps=LONG)
    wait(client, job["id"], states=("running",), step=2)
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    done = wait(client, job["id"])
    rec = done["record"]
    assert done["state"] == "cancelled" and rec["interrupted"] and rec["steps_completed"] < LONG
    assert rec["model_calls"] - rec["model_calls_at_cancel"] <= 1, rec  # at most the call in flight on the actor
    assert rec["stop_output"] == "finish" and 1 <= rec["finish_steps"] <= 3
    assert done["image"] is not None


def test_steer_on_an_actor_changes_rows_from_the_next_step(on_ray):
    studio, client, _ = on_ray
    job = submit(client, steps=LONG, guidance=7.5)
    wait(client, job["id"], states=("running",), step=3)
    r = client.post(f"/api/jobs/{job['id']}/steer", json={"guidance": 4.0, "cfg_cutoff": 0.0})
    assert r.status_code == 200, r.text
    at = r.json()["steering"][-1]["step"]  # the first step not yet begun on the actor when the change reached it
    assert at >= 3
    wait(client, job["id"], states=("running",), step=at + 4)
    client.post(f"/api/jobs/{job['id']}/cancel")
    done = wait(client, job["id"])
    rows = done["record"]["rows_per_step"]
    assert set(rows[:at]) == {2} and set(rows[at + 1 :]) == {1}, (at, rows)
    assert [(s["step"], s["guidance"], s["cfg_cutoff"]) for s in done["steering"]] == [(at, 4.0, 0.0)]


def test_step_events_and_frames_stream_from_the_actor_to_the_hub(on_ray):
    studio, client, _ = on_ray
    with client.websocket_connect("/api/events") as ws:
        assert ws.receive_json()["type"] == "hello"
        job = submit(client, steps=6, preview={"every": 2, "method": "linear"})
        events = []
        while not events or events[-1]["type"] not in ("finished", "failed"):
            events.append(ws.receive_json())
    kinds = [e["type"] for e in events if e.get("job") == job["id"]]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "finished", kinds
    steps = [e for e in events if e["type"] == "step"]
    assert steps and all(e["job"] == job["id"] and e["total"] == 6 for e in steps)
    assert steps[-1]["step"] == 5 and steps[-1]["model_rows"] == 12  # the last step's event precedes "finished"
    framed = [e for e in steps if e["frame"]]
    assert framed and all(e["frame"].startswith("data:image/webp;base64,") for e in framed)
    assert all(e["frame_step"] % 2 == 0 or e["frame_step"] == 5 for e in framed)


def test_an_actor_killed_mid_job_fails_its_job_and_the_queue_goes_on(on_ray, local_ray):
    studio, client, workers = on_ray
    job = submit(client, steps=LONG)
    wait(client, job["id"], states=("running",), step=2)
    victim = studio._live[job["id"]].actor
    local_ray.kill(victim)
    failed = wait(client, job["id"])
    assert failed["state"] == "failed" and "ActorDied" in failed["error"] and "died" in failed["error"], failed
    assert "a new worker replaces it" in failed["error"] and workers.replaced == 1
    # Two long jobs at once: both actors (the survivor and the replacement) run one each.
    a, b = submit(client, steps=LONG), submit(client, steps=LONG)
    wait(client, a["id"], states=("running",), step=1)
    wait(client, b["id"], states=("running",), step=1)
    actors = {studio._live[a["id"]].actor, studio._live[b["id"]].actor}
    assert len(actors) == 2 and victim not in actors
    for j in (a, b):
        client.post(f"/api/jobs/{j['id']}/cancel")
    ends = [wait(client, j["id"]) for j in (a, b)]
    assert [e["state"] for e in ends] == ["cancelled", "cancelled"] and all(e["image"] for e in ends)
    assert len({e["record"]["worker"] for e in ends}) == 2


@pytest.mark.parametrize(("argv", "needle"), [
    (["--ray", "--ray-workers", "0"], "--ray-workers must be in [1, 256], got 0"),
    (["--ray-workers", "2"], "--ray-workers 2 needs --ray or --ray-address"),
    (["--ray", "--workers", "2"], "--workers 2: with --ray the jobs run on Ray actors"),
    (["--ray", "--ray-address", "auto"], "give --ray (start a local Ray) or --ray-address ADDR"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address '127.0.0.1:1': nothing answers there"),
    (["--ray-address", "head"], "--ray-address 'head' is not an address; give HOST:PORT"),
])
def test_bad_ray_flags_are_refused_before_anything_loads(run_cli, tmp_path, argv, needle):
    code, out, err = run_cli("serve", "--data", tmp_path / "d", *argv)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "d").exists()
