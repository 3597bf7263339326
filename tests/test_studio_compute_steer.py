"""Steering a running studio job's step caching (its compute policies) from the next step: DeepCache's interval
and First-Block-Cache's threshold; what cannot change mid-run is refused, naming the field."""

from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

import stepdiff
from stepdiff.caching import DeepCacheCallback, FirstBlockCacheCallback, TGateCallback
from stepdiff.studio import Studio, create_app
from stepdiff.studio.server import limits_for
from stepdiff.studio.steering import GuidancePlan, parse_steer

from .conftest import wait_job as wait

PROMPT = "a red circle on a blue background"
LONG = 500  # steps: still running while the test steers it (the tiny model: a few ms a step)


@pytest.fixture(scope="module")
def client(sd_folder, tmp_path_factory):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    studio = Studio(pipe, sd_folder, tmp_path_factory.mktemp("data"), limits=limits_for(sd_folder, 500))
    with TestClient(create_app(studio)) as c:
        yield c


def submit(client, **fields):
    r = client.post("/api/jobs", json={"prompt": PROMPT, "steps": LONG, **fields})
    assert r.status_code == 201, r.text
    return r.json()



def test_steer_deepcache_interval_mid_run(client):
    job = submit(client, cache="deepcache:2")
    wait(client, job["id"], states=("running",), step=4)
    r = client.post(f"/api/jobs/{job['id']}/steer", json={"cache_interval": 1})  # caching off from the next step
    assert r.status_code == 200, r.text
    entry = r.json()["steering"][-1]
    assert entry["cache_interval"] == 1 and entry["changed"] == ["cache_interval"]
    at = entry["step"]
    wait(client, job["id"], states=("running",), step=at + 30)
    client.post(f"/api/jobs/{job['id']}/cancel")
    done = wait(client, job["id"])
    rec = done["record"]
    # deepcache:2 reuses the deep features on every other step: up to the steer, about half of them; after it, none
    assert rec["steps_completed"] >= at + 30
    assert 1 <= rec["cached_calls"] <= (at + 2) // 2 + 1, (at, rec["cached_calls"], rec["steps_completed"])
    assert [s["cache_interval"] for s in done["steering"]] == [1]
    assert done["params"]["cache"] == "deepcache:2"  # what was submitted; the steering list says what changed


def test_steer_back_on_caches_again(client):
    job = submit(client, fast=True, guidance=7.5)  # the fast preset: DeepCache interval 3
    wait(client, job["id"], states=("running",), step=2)
    r = client.post(f"/api/jobs/{job['id']}/steer", json={"cache_interval": 1})
    at = r.json()["steering"][-1]["step"]
    wait(client, job["id"], states=("running",), step=at + 10)
    off = client.get(f"/api/jobs/{job['id']}").json()["steps_completed"]
    r = client.post(f"/api/jobs/{job['id']}/steer", json={"cache_interval": 2})
    assert r.status_code == 200 and r.json()["steering"][-1]["cache_interval"] == 2
    back = r.json()["steering"][-1]["step"]
    wait(client, job["id"], states=("running",), step=back + 40)
    client.post(f"/api/jobs/{job['id']}/cancel")
    rec = wait(client, job["id"])["record"]
    assert rec["cached_calls"] >= (rec["steps_completed"] - back) // 2 - 2 > (off - at) // 2  # on again


@pytest.mark.parametrize(("fields", "body", "field", "says"), [
    ({}, {"cache_interval": 2}, "cache_interval", "DeepCache"),  # a job without step caching
    ({"cache": "deepcache:3"}, {"cache_threshold": 0.1}, "cache_threshold", "First-Block-Cache"),
    ({"cache": "fbc:0.05"}, {"cache_interval": 2}, "cache_interval", "DeepCache"),
])
def test_steering_a_policy_the_job_does_not_use_is_a_422(client, fields, body, field, says):
    job = submit(client, **fields)
    try:
        wait(client, job["id"], states=("running",), step=1)
        r = client.post(f"/api/jobs/{job['id']}/steer", json=body)
        assert r.status_code == 422, r.text
        error = r.json()
        assert error["field"] == field and error["value"] == body[field] and says in error["allowed"]
        assert "cannot be added to a running job" in error["allowed"]
        assert client.get(f"/api/jobs/{job['id']}").json()["steering"] == []  # nothing recorded, nothing changed
    finally:
        client.post(f"/api/jobs/{job['id']}/cancel")
        wait(client, job["id"])


@pytest.mark.parametrize(("body", "field"), [
    ({"cache_interval": 0}, "cache_interval"), ({"cache_interval": 51}, "cache_interval"),
    ({"cache_interval": 1.5}, "cache_interval"), ({"cache_interval": True}, "cache_interval"),
    ({"cache_interval": None}, "cache_interval"), ({"cache_threshold": -0.1}, "cache_threshold"),
    ({"cache_threshold": "0.1"}, "cache_threshold"), ({"cache_threshold": None}, "cache_threshold"),
    ({"tgate": 5}, "tgate"), ({"cache": "deepcache:2"}, "cache"),  # not steerable mid-run: unknown steer fields
])
def test_bad_compute_steer_is_a_422_naming_the_field(client, body, field):
    job = submit(client, cache="deepcache:3", steps=4)  # parse_steer refuses before the job is even looked at
    r = client.post(f"/api/jobs/{job['id']}/steer", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    wait(client, job["id"])


def _run_with(*policies):
    """A stand-in run whose compute states are the policies' (their state objects read these attributes)."""
    states = [SimpleNamespace(policy=p, interval=getattr(p, "cache_interval", None),
                              threshold=getattr(p, "threshold", None)) for p in policies]
    extras = SimpleNamespace(control=None, ip_adapter_scales=None)
    return SimpleNamespace(compute=SimpleNamespace(states=states), extras=extras, guidance_scale=7.5), states


def test_plan_sets_the_policy_states_from_the_next_step():
    deep, fbc, tgate = DeepCacheCallback(3), FirstBlockCacheCallback(0.08), TGateCallback(10)
    plan = GuidancePlan(7.5, 20, policies=[deep, tgate])
    assert plan.values()["cache_interval"] == 3 and "cache_threshold" not in plan.values()
    run, states = _run_with(deep, tgate)
    plan.change(parse_steer({"cache_interval": 1}))
    plan.apply(run, 5)
    assert states[0].interval == 1 and deep.cache_interval == 3  # the run's state, never the shared policy object
    with pytest.raises(stepdiff.studio.FieldError, match="cache_threshold"):
        plan.change(parse_steer({"cache_threshold": 0.2}))
    plan = GuidancePlan(7.5, 20, policies=[fbc])
    run, states = _run_with(fbc)
    plan.change(parse_steer({"cache_threshold": 0.0}))
    plan.apply(run, 3)
    assert states[0].threshold == 0.0 and fbc.threshold == 0.08 and plan.values()["cache_threshold"] == 0.0
