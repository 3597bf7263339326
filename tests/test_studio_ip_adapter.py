"""An IP-Adapter in the studio (``serve --ip-adapter DIR``) on tiny random models: a job with an ``ip_adapter_image``
runs with the adapter loaded, its ``ip_adapter_scale`` is steered mid-run, a job without one runs with it unloaded,
and every bad input is a 422 naming the field."""

import io

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

import stepdiff
from stepdiff.studio import Studio, create_app
from stepdiff.studio.pool import PipelinePool
from stepdiff.studio.server import limits_for
from stepdiff.testing import make_tiny_ip_adapter

from .conftest import wait_job as wait

PROMPT = "a red circle on a blue background"
FINAL = ("finished", "cancelled", "failed", "interrupted")
LONG = 400


@pytest.fixture(scope="module")
def ip_folder(sd_folder, tmp_path_factory):
    return make_tiny_ip_adapter(tmp_path_factory.mktemp("tiny-ip"), sd_folder)


def _client(sd_folder, data, ip_adapter):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder)  # its own: the adapter changes its modules
    pipe.set_progress_bar_config(disable=True)
    name = sd_folder.name
    pool = PipelinePool({name: sd_folder}, name, lambda f: None, preloaded={name: pipe}, ip_adapter=ip_adapter)
    studio = Studio(pipe, sd_folder, data, limits=limits_for(sd_folder, 500), pool=pool)
    return TestClient(create_app(studio))


@pytest.fixture(scope="module")
def client(sd_folder, ip_folder, tmp_path_factory):
    with _client(sd_folder, tmp_path_factory.mktemp("data"), ip_folder) as c:
        yield c


def upload(client, color=(30, 200, 30)):
    buf = io.BytesIO()
    rng = np.random.default_rng(sum(color))
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    r = client.post("/api/uploads", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def submit(client, **fields):
    r = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 4, "seed": 3, **fields})
    assert r.status_code == 201, r.text
    return r.json()



def pixels(client, job):
    return np.asarray(Image.open(io.BytesIO(client.get(job["image"]).content)), dtype=np.int16)


def test_ip_adapter_job_and_steering_its_scale_mid_run(client):
    assert client.get("/api/info").json()["ip_adapter"] is True
    picture = upload(client)
    job = submit(client, ip_adapter_image=picture, ip_adapter_scale=0.5, steps=LONG)
    wait(client, job["id"], states=("running",), step=2)
    r = client.post(f"/api/jobs/{job['id']}/steer", json={"ip_adapter_scale": 0.0})
    assert r.status_code == 200, r.text
    entry = r.json()["steering"][-1]
    assert entry["ip_adapter_scale"] == 0.0 and entry["changed"] == ["ip_adapter_scale"]
    client.post(f"/api/jobs/{job['id']}/cancel")
    done = wait(client, job["id"])
    assert done["state"] == "cancelled" and done["params"]["ip_adapter_image"] == picture
    assert [s["ip_adapter_scale"] for s in done["steering"]] == [0.0]


def test_the_adapter_acts_and_a_job_without_it_runs_unloaded(client):
    plain = wait(client, submit(client)["id"])
    picture = upload(client, color=(1, 2, 3))
    strong = wait(client, submit(client, ip_adapter_image=picture, ip_adapter_scale=1.0)["id"])
    off = wait(client, submit(client, ip_adapter_image=picture, ip_adapter_scale=0.0)["id"])
    again = wait(client, submit(client)["id"])  # after IP-Adapter jobs: the adapter is unloaded again
    assert {j["state"] for j in (plain, strong, off, again)} == {"finished"}, [j.get("error") for j in (strong, off)]
    assert np.abs(pixels(client, strong) - pixels(client, off)).max() > 0  # the adapter changes the picture
    assert np.abs(pixels(client, off) - pixels(client, plain)).max() <= 1  # scale 0: as without it
    assert np.array_equal(pixels(client, again), pixels(client, plain))


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"ip_adapter_image": "nope"}, "ip_adapter_image", "upload"),
    ({"ip_adapter_image": "0" * 32}, "ip_adapter_image", ""),  # no such upload
    ({"ip_adapter_scale": 0.5}, "ip_adapter_scale", "without ip_adapter_image"),
    ({"ip_adapter_image": None, "ip_adapter_scale": 0.5}, "ip_adapter_scale", "without ip_adapter_image"),
    ({"ip_adapter_image": "UPLOAD", "ip_adapter_scale": -1}, "ip_adapter_scale", ""),
    ({"ip_adapter_image": "UPLOAD", "ip_adapter_scale": "1"}, "ip_adapter_scale", ""),
])
def test_bad_ip_adapter_fields_are_a_422_naming_the_field(client, fields, field, says):
    if fields.get("ip_adapter_image") == "UPLOAD":
        fields = {**fields, "ip_adapter_image": upload(client)}
    r = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 4, **fields})
    assert r.status_code in (404, 422), r.text
    assert r.json()["field"] == field and says in r.json().get("allowed", r.json()["error"])


def test_a_server_without_an_ip_adapter_refuses_the_field(sd_folder, tmp_path):
    with _client(sd_folder, tmp_path / "data", None) as c:
        assert c.get("/api/info").json()["ip_adapter"] is False
        picture = upload(c)
        r = c.post("/api/jobs", json={"prompt": PROMPT, "ip_adapter_image": picture})
        assert r.status_code == 422 and r.json()["field"] == "ip_adapter_image"
        assert "--ip-adapter" in r.json()["allowed"]
        job = wait(c, submit(c, steps=LONG)["id"], states=("running",), step=1)
        r = c.post(f"/api/jobs/{job['id']}/steer", json={"ip_adapter_scale": 0.5})
        assert r.status_code == 422 and "IP-Adapter" in r.json()["allowed"]
        c.post(f"/api/jobs/{job['id']}/cancel")
        wait(c, job["id"])


def test_the_ip_adapter_folder_is_checked_before_any_model_loads(sd_folder, tmp_path):
    from stepdiff.studio.catalog import open_catalog

    loaded = []
    with pytest.raises(ValueError, match=r"--ip-adapter .* is not an IP-Adapter folder \(it needs ip-adapter"):
        open_catalog(sd_folder, ip_adapter=tmp_path, loader=lambda folder, dtype: loaded.append(folder))
    assert loaded == []
