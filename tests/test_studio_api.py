"""The studio's engine and HTTP API (Starlette's TestClient) on a tiny random model: jobs, queue, cancel,
steer, history, images, events, security, restart after a crash."""

import json
import time

import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

import stepdiff
from stepdiff.studio import JobSpec, Studio, create_app
from stepdiff.studio.events import EventHub
from stepdiff.studio.server import limits_for

from .conftest import wait_job as wait

PROMPT = "a red circle on a blue background"
LONG = 500  # steps of a job that must still be running while a test acts on it (the tiny model: ~3 ms a step)


@pytest.fixture(scope="module")
def tiny_pipe(sd_folder):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def make_client(tiny_pipe, sd_folder, tmp_path):
    made = []

    def make(data=None, token=None, trusted_hosts=None, **kw):
        studio = Studio(tiny_pipe, sd_folder, data or tmp_path / "data", limits=limits_for(sd_folder, 500), **kw)
        client = TestClient(create_app(studio, token=token, trusted_hosts=trusted_hosts))
        client.__enter__()
        made.append(client)
        return studio, client

    yield make
    for client in made:
        client.__exit__(None, None, None)


def submit(client, **fields):
    r = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 4, **fields})
    assert r.status_code == 201, r.text
    return r.json()



def png_metadata(client, url):
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    import io

    image = Image.open(io.BytesIO(r.content))
    return image.text["parameters"], json.loads(image.text["stepdiff"])


def test_submit_run_fetch(make_client):
    studio, client = make_client()
    job = submit(client, seed=7, cfg_cutoff=0.5, steps=6)
    assert job["state"] in ("queued", "running") and len(job["id"]) == 32
    done = wait(client, job["id"])
    assert done["state"] == "finished" and done["steps_completed"] == 6
    rec = done["record"]
    assert rec["rows_per_step"] == [2, 2, 2, 2, 1, 1]  # guided through step int(6 * 0.5) = 3, as CFGCutoffCallback
    assert done["rows_saved"] == 2
    assert done["params"]["seed"] == 7 and done["params"]["cfg_cutoff"] == 0.5
    parameters, record = png_metadata(client, done["image"])
    assert "Seed: 7" in parameters and "CFG cutoff: 0.5" in parameters and "Steps: 6" in parameters
    assert record["job_id"] == job["id"] and record["record"]["rows_per_step"] == rec["rows_per_step"]
    assert record["prompt"] == PROMPT and not record["interrupted"]


def test_same_seed_same_image_as_the_library(make_client, tiny_pipe):
    studio, client = make_client()
    done = wait(client, submit(client, seed=3, steps=3, guidance=5.0)["id"])
    r = client.get(done["image"])
    import io

    served = torch.tensor(list(Image.open(io.BytesIO(r.content)).convert("RGB").getdata()))
    ref = tiny_pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(3)).images[0]
    assert torch.equal(served, torch.tensor(list(ref.getdata())))


BAD_JOBS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"steps": 0}, "steps"),
    ({"steps": "4"}, "steps"),
    ({"steps": 10**6}, "steps"),
    ({"steps": True}, "steps"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"guidance": float("inf")}, None),  # not JSON: a 400 for the body
    ({"guidance": -1}, "guidance"),
    ({"guidance": "high"}, "guidance"),
    ({"width": 33}, "width"),
    ({"height": 4096}, "height"),
    ({"size": "big"}, "size"),
    ({"scheduler": "nope"}, "scheduler"),
    ({"cfg_cutoff": 2}, "cfg_cutoff"),
    ({"guidance_interval": [0.8, 0.2]}, "guidance_interval"),
    ({"guidance_interval": [0.1, 0.5], "cfg_cutoff": 0.3}, "guidance_interval"),
    ({"preview": {"every": 0}}, "preview.every"),
    ({"preview": {"source": "noise"}}, "preview.source"),
    ({"preview": {"method": "magic"}}, "preview.method"),
    ({"preview": {"size": 5}}, "preview.size"),
    ({"preview": "often"}, "preview"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"negative_prompt": ["a"]}, "negative_prompt"),
    ({"cache": "nope:3"}, "cache"),
    ({"cache": ""}, "cache"),
    ({"cache": 3}, "cache"),
    ({"cache": "tgate:0"}, "cache"),
    ({"cache": "fbc:0.1,deepcache:3"}, "cache"),
    ({"fast": "yes"}, "fast"),
    ({"fast": True, "cache": "deepcache:3"}, "cache"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_JOBS)
def test_bad_field_is_a_422_naming_it(make_client, fields, field):
    studio, client = make_client(start=False)
    body = {"prompt": PROMPT, **fields}
    if field is None:  # infinity: Python writes Infinity, which is not JSON
        r = client.post("/api/jobs", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        return
    r = client.post("/api/jobs", json=body)
    assert r.status_code == 422, r.text
    error = r.json()
    assert error["field"] == field and field in error["error"] and error["allowed"]
    assert client.get("/api/jobs").json()["jobs"] == []  # nothing was queued


def test_a_bad_cache_names_the_field_the_part_and_the_grammar(make_client):
    studio, client = make_client(start=False)
    error = client.post("/api/jobs", json={"prompt": PROMPT, "cache": "deepcache:3,warp:9"}).json()
    assert error["field"] == "cache" and error["value"] == "deepcache:3,warp:9"
    assert "'warp:9' is not a policy" in error["error"] and "deepcache:INTERVAL[:BRANCH]" in error["allowed"]


def test_fast_job_runs_the_preset_as_the_library_does(make_client, tiny_pipe):
    from stepdiff.caching import describe, fast_preset

    studio, client = make_client()
    done = wait(client, submit(client, seed=3, steps=6, fast=True)["id"])
    assert done["state"] == "finished" and done["params"]["fast"] is True and done["params"]["cache"] is None
    rec = done["record"]
    assert rec["cached_calls"] > 0 and rec["blocks_skipped"] > 0
    assert rec["rows_per_step"] == [2, 2, 1, 1, 1, 1]  # the preset's cutoff: guidance off from step 2 of 6
    assert done["rows_saved"] == 4
    parameters, record = png_metadata(client, done["image"])
    assert record["cache"] == describe(fast_preset(6)) and 'Cache: "CFGCutoffCallback(cutoff_step_ratio=0.3, cutoff_step_index=None)' in parameters
    import io

    served = Image.open(io.BytesIO(client.get(done["image"]).content)).convert("RGB").tobytes()
    ref = tiny_pipe(PROMPT, num_inference_steps=6, guidance_scale=studio.limits.default_guidance,
                    generator=torch.Generator().manual_seed(3), callback_on_step_end=fast_preset(6)).images[0]
    assert served == ref.tobytes()


def test_cache_job_reaches_the_run_and_a_plain_job_caches_nothing(make_client):
    studio, client = make_client()
    cached = submit(client, steps=4, cache=" DeepCache:2 ")
    plain = submit(client, steps=4)
    cached, plain = wait(client, cached["id"]), wait(client, plain["id"])
    assert cached["params"]["cache"] == "deepcache:2" and cached["params"]["fast"] is False
    assert cached["record"]["cached_calls"] == 2 and cached["record"]["rows_per_step"] == [2, 2, 2, 2]
    assert plain["record"]["cached_calls"] == 0 and png_metadata(client, plain["image"])[1]["cache"] is None


def test_unet_caching_is_refused_for_a_model_without_a_unet(sd3_pipe, sd3_folder, tmp_path):
    studio = Studio(sd3_pipe, sd3_folder, tmp_path / "sd3", limits=limits_for(sd3_folder, 500), start=False)
    client = TestClient(create_app(studio))
    with client:
        r = client.post("/api/jobs", json={"prompt": PROMPT, "fast": True})
        assert r.status_code == 422 and r.json()["field"] == "fast"
        assert "DeepCacheCallback caches a UNet's blocks" in r.json()["error"]
        r = client.post("/api/jobs", json={"prompt": PROMPT, "cache": "tgate:3"})
        assert r.status_code == 422 and r.json()["field"] == "cache"
        assert client.post("/api/jobs", json={"prompt": PROMPT, "cache": "fbc:0.1"}).status_code == 201


def test_guidance_plan_keeps_guidance_off_from_the_gate_whatever_the_steering():
    from stepdiff.studio import GuidancePlan

    plan = GuidancePlan(7.5, 10, gate=4)
    assert [plan.scale_at(i) for i in range(6)] == [7.5] * 4 + [0.0] * 2
    plan.scale = 9.0
    assert plan.scale_at(3) == 9.0 and plan.scale_at(8) == 0.0


def test_the_page_has_a_fast_checkbox_that_sends_fast(make_client):
    studio, client = make_client(start=False)
    page = client.get("/").text
    assert 'id="fast" type="checkbox"' in page and "Fast (step caching)" in page
    script = client.get("/static/app.js").text
    assert 'fast: $("fast").checked' in script


def test_malformed_requests(make_client):
    studio, client = make_client(start=False)
    assert client.post("/api/jobs", content=b"{not json").status_code == 400
    assert client.post("/api/jobs", content=b"").status_code == 400
    assert client.post("/api/jobs", content=b"\xff\xfe").status_code == 400
    r = client.post("/api/jobs", json=[1, 2])
    assert r.status_code == 422 and r.json()["field"] == "body"
    r = client.post("/api/jobs", content=b"x" * 70_000)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = client.get("/api/jobs/not-an-id")
    assert r.status_code == 422 and r.json()["field"] == "id"
    r = client.get("/api/jobs/" + "0" * 32)
    assert r.status_code == 404 and r.json()["field"] == "id"
    for path in ("/api/images/..%2Fstudio.sqlite3", "/api/images/%2e%2e/studio.sqlite3", "/api/images/studio.sqlite3",
                 "/api/images/" + "a" * 32 + ".png", "/api/../studio.sqlite3"):
        r = client.get(path)
        assert r.status_code in (404, 422), path
        assert r.headers["content-type"].startswith("application/json") and "error" in r.json()
    assert client.get("/api/jobs?limit=0").json()["field"] == "limit"
    assert client.get("/api/jobs?before=-1").json()["field"] == "before"
    assert client.get("/api/jobs?state=done").json()["field"] == "state"
    r = client.post("/api/jobs/" + "0" * 32 + "/steer", json={"guidance": "x"})
    assert r.status_code == 422 and r.json()["field"] == "guidance"
    assert client.delete("/api/jobs").status_code == 405
    assert client.get("/api/info").status_code == 200  # still serving


def test_full_queue_is_a_429(make_client):
    studio, client = make_client(start=False, queue_size=2)
    submit(client)
    submit(client)
    r = client.post("/api/jobs", json={"prompt": PROMPT})
    assert r.status_code == 429 and "queue is full" in r.json()["error"]
    jobs = client.get("/api/jobs").json()["jobs"]
    assert [j["position"] for j in reversed(jobs)] == [1, 2]


def test_cancel_queued_leaves_the_queue_and_touches_no_other(make_client):
    studio, client = make_client(start=False)
    a, b, c = submit(client), submit(client), submit(client)
    r = client.post(f"/api/jobs/{b['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert client.get(f"/api/jobs/{c['id']}").json()["position"] == 2
    studio.start()
    assert wait(client, a["id"])["state"] == "finished"
    assert wait(client, c["id"])["state"] == "finished"
    assert client.get(f"/api/jobs/{b['id']}").json()["image"] is None
    assert client.post(f"/api/jobs/{b['id']}/cancel").status_code == 200  # twice: harmless
    assert client.post(f"/api/jobs/{a['id']}/cancel").status_code == 409  # finished: nothing to cancel


def test_cancel_running_stops_before_the_next_model_call(make_client):
    studio, client = make_client(workers=2)
    victim = submit(client, steps=LONG)
    other = submit(client, steps=LONG // 10)
    wait(client, victim["id"], states=("running",), step=2)
    r = client.post(f"/api/jobs/{victim['id']}/cancel")
    assert r.status_code == 200
    done = wait(client, victim["id"])
    assert done["state"] == "cancelled"
    rec = done["record"]
    assert rec["interrupted"] and rec["steps_completed"] < LONG
    assert rec["model_calls"] - rec["model_calls_at_cancel"] <= 1  # at most the call in flight
    # Stop finishes the picture: up to 3 more steps down to t=0, their calls counted apart from the run's
    assert rec["stop_output"] == "finish" and 1 <= rec["finish_steps"] <= 3
    assert rec["finish_model_calls"] == rec["finish_steps"]
    parameters, record = png_metadata(client, done["image"])  # the image of the step reached, marked so
    assert f"Interrupted at step: {rec['steps_completed']}" in parameters and record["stop_reason"] == "cancelled by user"
    assert wait(client, other["id"])["state"] == "finished"  # the other job ran on


def test_steer_guidance_changes_rows_from_the_next_step(make_client):
    studio, client = make_client()
    job = submit(client, steps=LONG, guidance=7.5)
    running = wait(client, job["id"], states=("running",), step=3)
    r = client.post(f"/api/jobs/{job['id']}/steer", json={"guidance": 1.0})
    assert r.status_code == 200 and r.json()["guidance"] == 1.0
    at = r.json()["steering"][-1]["step"]  # the first step not yet done: it gets the new scale unless already begun
    assert at >= running["steps_completed"]
    wait(client, job["id"], states=("running",), step=at + 4)
    r = client.post(f"/api/jobs/{job['id']}/steer", json={"guidance": 4.0, "cfg_cutoff": 0.0})  # and cut off from now
    assert r.status_code == 200 and r.json()["steering"][-1]["cfg_cutoff"] == 0.0
    wait(client, job["id"], states=("running",), step=r.json()["steering"][-1]["step"] + 3)
    client.post(f"/api/jobs/{job['id']}/cancel")
    done = wait(client, job["id"])
    rows = done["record"]["rows_per_step"]
    assert rows[:3] == [2, 2, 2] and set(rows[at + 1 :]) == {1}, rows
    assert [s["guidance"] for s in done["steering"]] == [1.0, 4.0]
    assert client.post(f"/api/jobs/{job['id']}/steer", json={"guidance": 2.0}).status_code == 409  # not running


def test_history_pages(make_client):
    studio, client = make_client()
    ids = [submit(client, steps=1)["id"] for _ in range(5)]
    for i in ids:
        wait(client, i)
    page = client.get("/api/jobs?limit=2").json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    page2 = client.get(f"/api/jobs?limit=2&before={page['next']}").json()
    page3 = client.get(f"/api/jobs?limit=2&before={page2['next']}").json()
    assert [j["id"] for j in page2["jobs"] + page3["jobs"]] == ids[::-1][2:]
    assert page3["next"] is None
    assert len(client.get("/api/jobs?state=finished&limit=100").json()["jobs"]) == 5


def test_event_stream(make_client):
    studio, client = make_client()
    with client.websocket_connect("/api/events") as ws:
        assert ws.receive_json()["type"] == "hello"
        job = submit(client, steps=5, preview={"every": 2, "method": "linear"})
        events = []
        while True:
            e = ws.receive_json()
            events.append(e)
            if e["type"] in ("finished", "failed"):
                break
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "finished", kinds
    steps = [e for e in events if e["type"] == "step"]
    assert steps and all(e["job"] == job["id"] and e["total"] == 5 for e in steps)
    assert all({"step", "timestep", "rows", "model_rows", "frame"} <= set(e) for e in steps)
    framed = [e for e in steps if e["frame"]]
    assert framed and all(e["frame"].startswith("data:image/webp;base64,") for e in framed)
    assert all(e["frame_step"] % 2 == 0 or e["frame_step"] == 4 for e in framed)
    assert events[-1]["image"] == f"/api/images/{job['id']}.png"


def test_slow_subscriber_gets_the_latest_step_not_a_backlog():
    import asyncio

    hub = EventHub()
    loop = asyncio.new_event_loop()
    try:
        sub = hub.subscribe(loop)
        hub.publish({"type": "started", "job": "a"})
        for i in range(100):
            hub.publish({"type": "step", "job": "a", "step": i})
            hub.publish({"type": "step", "job": "b", "step": i})
        hub.publish({"type": "finished", "job": "a"})
        texts = [json.loads(t) for t in sub.take(hub.lock)]
    finally:
        loop.close()
    assert [(e["type"], e.get("step")) for e in texts] == [("started", None), ("step", 99), ("step", 99), ("finished", None)]
    assert sub.dropped_steps == 198


def test_client_dropping_mid_run_does_not_affect_the_job(make_client):
    studio, client = make_client()
    job = None
    with client.websocket_connect("/api/events") as ws:
        ws.receive_json()
        job = submit(client, steps=40)
        while ws.receive_json()["type"] != "step":
            pass
    done = wait(client, job["id"])  # the socket closed mid-run
    assert done["state"] == "finished" and done["steps_completed"] == 40
    assert not studio.hub.listening


def test_token_on_every_api_call_and_the_socket(make_client):
    studio, client = make_client(token="secret-token-1", start=False)
    assert client.get("/").status_code == 200  # the page itself; it reads the token from its URL
    assert client.get("/api/info").status_code == 401
    assert client.get("/api/info", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/info", headers={"authorization": "Bearer secret-token-1"}).status_code == 200
    assert client.get("/api/info?token=secret-token-1").status_code == 200
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/api/events") as ws:
        ws.receive_json()
    with client.websocket_connect("/api/events?token=secret-token-1") as ws:
        assert ws.receive_json()["type"] == "hello"


def test_cross_origin_and_foreign_hosts_are_refused(make_client):
    studio, client = make_client(trusted_hosts={"testserver"}, start=False)
    r = client.post("/api/jobs", json={"prompt": PROMPT}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    assert client.get("/api/info", headers={"sec-fetch-site": "cross-site"}).status_code == 403
    assert client.get("/api/info", headers={"origin": "http://testserver"}).status_code == 200
    assert client.get("/api/info", headers={"host": "rebound.example"}).status_code == 403
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect), \
            client.websocket_connect("/api/events", headers={"origin": "http://evil.example"}) as ws:
        ws.receive_json()
    assert client.get("/api/jobs").json()["jobs"] == []
    r = client.get("/")
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_two_workers_run_at_once_with_the_images_of_one(make_client, tmp_path):
    studio, client = make_client(workers=2, data=tmp_path / "two")
    a, b = submit(client, steps=40, seed=1), submit(client, steps=40, seed=2)
    both = [wait(client, j["id"]) for j in (a, b)]
    assert all(j["state"] == "finished" for j in both)
    started = [j["started"] for j in both]
    finished = [j["finished"] for j in both]
    assert max(started) < min(finished)  # they overlapped
    _, one = make_client(workers=1, data=tmp_path / "one")
    ref = wait(one, submit(one, steps=40, seed=2)["id"])
    import io

    pixels = [Image.open(io.BytesIO(c.get(j["image"]).content)).tobytes() for c, j in ((one, ref), (client, both[1]))]
    assert pixels[0] == pixels[1]


def test_restart_after_a_crash_keeps_history_interrupts_running_and_runs_queued(tiny_pipe, sd_folder, tmp_path):
    data = tmp_path / "crash"
    limits = limits_for(sd_folder, 500)
    first = Studio(tiny_pipe, sd_folder, data, limits=limits, start=False)
    done = first.submit(JobSpec(prompt=PROMPT, steps=2))
    first.start()
    for _ in range(2000):
        if first.get(done["id"])["state"] == "finished":
            break
        time.sleep(0.01)
    first.close()
    # What kill -9 leaves: a row marked running (no worker) and rows still queued.
    crashed = Studio(tiny_pipe, sd_folder, data, limits=limits, start=False)
    running, queued = crashed.submit(JobSpec(prompt=PROMPT, steps=2)), crashed.submit(JobSpec(prompt=PROMPT, steps=2))
    assert crashed.store.start(running["id"])
    crashed._threads.clear()  # abandon it without closing anything, as a killed process would
    crashed._held.close()  # ... whose folder lock the system releases
    restarted = Studio(tiny_pipe, sd_folder, data, limits=limits)
    try:
        assert restarted.get(running["id"])["state"] == "interrupted"
        assert "stopped" in restarted.get(running["id"])["error"]
        for _ in range(2000):
            if restarted.get(queued["id"])["state"] == "finished":
                break
            time.sleep(0.01)
        assert restarted.get(queued["id"])["state"] == "finished"
        old = restarted.get(done["id"])
        assert old["state"] == "finished" and (data / "images" / f"{done['id']}.png").is_file()
        assert len(restarted.history(100)["jobs"]) == 3
    finally:
        restarted.close()


def test_shutdown_interrupts_running_jobs_and_keeps_queued(tiny_pipe, sd_folder, tmp_path):
    studio = Studio(tiny_pipe, sd_folder, tmp_path / "d", limits=limits_for(sd_folder, 500))
    running = studio.submit(JobSpec(prompt=PROMPT, steps=LONG))
    queued = studio.submit(JobSpec(prompt=PROMPT, steps=2))
    for _ in range(2000):
        if studio.get(running["id"])["steps_completed"] >= 2:
            break
        time.sleep(0.005)
    studio.close()
    again = Studio(tiny_pipe, sd_folder, tmp_path / "d", limits=limits_for(sd_folder, 500), start=False)
    try:
        job = again.get(running["id"])
        assert job["state"] == "interrupted" and job["record"]["stop_reason"] == "server shutdown"
        assert job["record"]["stop_output"] == "denoised"  # a server going down does not finish pictures
        assert (tmp_path / "d" / "images" / f"{running['id']}.png").is_file()
        assert not list((tmp_path / "d" / "images").glob(".*.tmp"))  # no half-written file
        assert again.get(queued["id"])["state"] == "queued"
    finally:
        again.close()


def test_words_names_the_unknown_words_and_a_too_long_prompt_is_a_422(make_client):
    studio, client = make_client()
    r = client.get("/api/words", params={"prompt": "A zebra on a blue car!"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unknown"] == ["zebra", "on"] and body["ignored"] is False
    assert body["message"] == "the model does not know zebra, on"
    assert client.get("/api/words", params={"prompt": "A photo of a red car."}).json()["message"] == ""
    r = client.get("/api/words", params={"prompt": "x" * 5000})
    assert r.status_code == 422 and r.json()["field"] == "prompt"
