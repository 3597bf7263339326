"""serve --models / --loras on tiny random models: GET /api/models and /api/loras, a job's model and LoRA set, at most
max_loaded pipelines in memory (least recently used unloaded), LoRA sets applied per job."""

import io
import time

import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from stepdiff.studio import Studio, create_app
from stepdiff.studio.catalog import open_catalog
from stepdiff.testing import make_tiny_sd

from .test_lora import _make_lora

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_sd(root / "alpha", seed=0)
    make_tiny_sd(root / "beta", seed=1)
    (root / "not-a-model").mkdir()
    return root


@pytest.fixture(scope="module")
def loras(models, tmp_path_factory):
    import stepdiff

    root = tmp_path_factory.mktemp("loras")
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(models / "alpha")
    folder = _make_lora(pipe, "unet", ["to_q", "to_k", "to_v", "to_out.0"], root / "sharp", seed=3)
    return root, folder


def wait(client, job_id):
    for _ in range(3000):
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.01)
    raise AssertionError(job)


def test_models_loras_lru_and_per_job_lora_sets(models, loras, tmp_path):
    root, _ = loras
    pipe, pool, limits = open_catalog(models / "alpha", models=models, loras=root, max_loaded=1)
    studio = Studio(pipe, models / "alpha", tmp_path / "data", limits=limits, pool=pool)
    with TestClient(create_app(studio)) as client:
        listed = client.get("/api/models").json()
        assert [m["name"] for m in listed["models"]] == ["alpha", "beta"] and listed["max_loaded"] == 1
        assert client.get("/api/loras").json() == {"loras": [{"name": "sharp"}]}
        jobs = {}
        for name, extra in (("a", {}), ("b", {"model": "beta"}), ("a_lora", {"loras": [{"name": "sharp", "scale": 1.0}]}),
                            ("a_again", {})):
            r = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 2, "seed": 1, "model": "alpha", **extra})
            assert r.status_code == 201, r.text
            jobs[name] = wait(client, r.json()["id"])
            assert jobs[name]["state"] == "finished", jobs[name]
        assert pool.loads == 2 and pool.unloads == 2  # alpha (preloaded) out for beta, beta out for alpha
        assert pool.loaded() == ["alpha"]
        image = {k: Image.open(io.BytesIO(client.get(j["image"]).content)).convert("RGB").tobytes()
                 for k, j in jobs.items()}
        assert image["a"] == image["a_again"] != image["a_lora"]  # the LoRA is off again for the next job
        assert image["a"] != image["b"]
        bad = client.post("/api/jobs", json={"prompt": PROMPT, "model": "gamma"}).json()
        assert bad["field"] == "model" and "alpha, beta" in bad["allowed"]
        bad = client.post("/api/jobs", json={"prompt": PROMPT, "loras": [{"name": "soft"}]}).json()
        assert bad["field"] == "loras[0].name" and "sharp" in bad["allowed"]


def test_jobs_with_different_lora_sets_never_share_the_modules(models, loras):
    root, _ = loras
    _, pool, _ = open_catalog(models / "alpha", loras=root)
    order = []
    with pool.use(None, [{"name": "sharp", "scale": 1.0}]) as model:
        order.append(("in", model.lora_key))
        import threading

        def other():
            with pool.use(None, []) as m:
                order.append(("in", m.lora_key))

        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.3)
        assert len(order) == 1  # the job without LoRA waits for the one with it
        order.append(("out", model.lora_key))
    t.join(10)
    assert order == [("in", (("sharp", 1.0),)), ("out", (("sharp", 1.0),)), ("in", ())]
    with pool.use(None, [{"name": "sharp", "scale": 1.0}]), pool.use(None, [{"name": "sharp", "scale": 1.0}]):
        pass  # the same set: side by side
    assert torch.is_tensor(next(pool.peek().pipe.unet.parameters()))
