"""Studio II on a tiny random model: uploads, image to image, inpainting, ControlNet, several images per job,
deleting a job, steering every per-step value, and a clear 4xx naming the field for every bad input."""

import io
import json

import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

import stepdiff
from stepdiff.studio import Studio, create_app
from stepdiff.studio.pool import PipelinePool
from stepdiff.studio.server import limits_for
from stepdiff.testing import make_tiny_controlnet

from .conftest import wait_job as wait

PROMPT = "a red circle on a blue background"
FINAL = ("finished", "cancelled", "failed", "interrupted")


@pytest.fixture(scope="module")
def tiny_pipe(sd_folder):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def controlnet_folder(sd_folder, tmp_path_factory):
    return make_tiny_controlnet(tmp_path_factory.mktemp("tiny-cn"), sd_folder)


@pytest.fixture
def client(tiny_pipe, sd_folder, controlnet_folder, tmp_path):
    name = sd_folder.name
    pool = PipelinePool({name: sd_folder}, name, lambda f: None, controlnet=controlnet_folder,
                        preloaded={name: tiny_pipe})
    studio = Studio(tiny_pipe, sd_folder, tmp_path / "data", limits=limits_for(sd_folder, 500), pool=pool)
    with TestClient(create_app(studio)) as c:
        c.studio = studio
        yield c


def png(size=(32, 32), color=(200, 30, 30), mode="RGB", fmt="PNG", **save):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt, **save)
    return buf.getvalue()


def upload(client, data, content_type="image/png"):
    r = client.post("/api/uploads", content=data, headers={"content-type": content_type})
    assert r.status_code == 201, r.text
    return r.json()



def submit(client, **fields):
    r = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 4, "seed": 1, **fields})
    assert r.status_code == 201, r.text
    return r.json()


def served(client, url):
    return Image.open(io.BytesIO(client.get(url).content))


def test_upload_raw_and_multipart_read_as_the_cli_reads(client, tmp_path):
    up = upload(client, png((40, 24)))
    assert up["width"] == 40 and up["height"] == 24 and len(up["id"]) == 32
    # a 16-bit greyscale picture: 50% grey reads 128 (as read_image), in a multipart body
    buf = io.BytesIO()
    Image.new("I;16", (16, 8), 32768).save(buf, format="PNG")
    r = client.post("/api/uploads", files={"file": ("grey.png", buf.getvalue(), "image/png")})
    assert r.status_code == 201, r.text
    kept = served(client, f"/api/uploads/{r.json()['id']}.png").convert("RGB")
    assert kept.size == (16, 8) and kept.getpixel((0, 0)) == (128, 128, 128)
    # the EXIF orientation is applied: a 20x10 picture marked "rotate 90" is 10x20
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = upload(client, png((20, 10), fmt="JPEG", exif=exif), "image/jpeg")
    assert (rotated["width"], rotated["height"]) == (10, 20)


@pytest.mark.parametrize("body, content_type, status, words", [
    (b"", "image/png", 400, "empty"),
    (b"not a picture", "image/png", 415, "not a readable picture"),
    (b"x", "text/plain", 415, "Content-Type"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b", 400,
     "exactly one file part"),
])
def test_bad_uploads_are_a_clear_4xx(client, body, content_type, status, words):
    r = client.post("/api/uploads", content=body, headers={"content-type": content_type})
    assert r.status_code == status and words in r.json()["error"], r.text


def test_an_upload_over_the_pixel_limit_is_a_413_from_its_header(client):
    r = client.post("/api/uploads", content=png((4100, 4100), mode="L", color=0),
                    headers={"content-type": "image/png"})
    assert r.status_code == 413 and "megapixels" in r.json()["error"]


def test_img2img_job_matches_the_library_and_runs_strength_of_the_steps(client, tiny_pipe):
    init = upload(client, png((32, 32)))
    done = wait(client, submit(client, init_image=init["id"], strength=0.5, steps=6)["id"])
    assert done["state"] == "finished" and done["steps_completed"] == 3 and done["total"] == 3
    assert done["params"]["width"] == 32 and done["params"]["strength"] == 0.5
    ref = stepdiff.StableDiffusionImg2ImgPipeline(**tiny_pipe.components)(
        PROMPT, image=Image.new("RGB", (32, 32), (200, 30, 30)), strength=0.5, num_inference_steps=6,
        generator=torch.Generator().manual_seed(1)).images[0]
    assert served(client, done["image"]).convert("RGB").tobytes() == ref.tobytes()
    record = json.loads(served(client, done["image"]).text["stepdiff"])
    assert record["init_image"] == init["id"] and record["strength"] == 0.5


def test_inpaint_job_keeps_the_unmasked_pixels(client):
    init = upload(client, png((32, 32), color=(10, 200, 10)))
    mask_image = Image.new("L", (32, 32), 0)
    mask_image.paste(255, (16, 0, 32, 32))  # the right half is re-drawn
    buf = io.BytesIO()
    mask_image.save(buf, format="PNG")
    mask = upload(client, buf.getvalue())
    done = wait(client, submit(client, init_image=init["id"], mask=mask["id"])["id"])
    assert done["state"] == "finished" and done["params"]["strength"] == 1.0
    out = served(client, done["image"]).convert("RGB")
    assert out.getpixel((2, 16)) == (10, 200, 10)  # far from the mask's edge: the picture's own pixels


def test_four_images_one_run_each_its_own_seed(client, tiny_pipe):
    done = wait(client, submit(client, num_images=4, seed=5, steps=3)["id"])
    assert done["record"]["steps_completed"] == 3 and len(done["images"]) == 4
    assert done["images"][0] == done["image"] and done["images"][1].endswith("-2.png")
    seeds = [json.loads(served(client, u).text["stepdiff"])["seed"] for u in done["images"]]
    assert seeds == [5, 6, 7, 8]
    ref = tiny_pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(7)).images[0]
    assert served(client, done["images"][2]).convert("RGB").tobytes() == ref.tobytes()


def test_delete_removes_the_row_and_its_images_and_refuses_a_running_job(client):
    done = wait(client, submit(client, num_images=2)["id"])
    running = submit(client, steps=500)
    wait(client, running["id"], states=("running",), step=1)
    r = client.delete(f"/api/jobs/{running['id']}")
    assert r.status_code == 409 and "cancel it first" in r.json()["error"]
    client.post(f"/api/jobs/{running['id']}/cancel")
    wait(client, running["id"])
    r = client.delete(f"/api/jobs/{done['id']}")
    assert r.status_code == 200 and r.json()["images_removed"] == [f"{done['id']}.png", f"{done['id']}-2.png"]
    assert client.get(f"/api/jobs/{done['id']}").status_code == 404
    assert client.get(done["image"]).status_code == 404
    assert client.delete(f"/api/jobs/{done['id']}").status_code == 404
    assert client.delete(f"/api/jobs/{running['id']}").status_code == 200


def test_control_job_and_steering_its_control_scale_mid_run(client):
    control = upload(client, png((32, 32), color=(255, 255, 255)))
    job = submit(client, control=control["id"], control_scale=0.5, control_end=1.0, steps=400, size="32x32")
    wait(client, job["id"], states=("running",), step=2)
    r = client.post(f"/api/jobs/{job['id']}/steer", json={"control_scale": 1.5, "guidance_interval": [0.0, 0.5]})
    assert r.status_code == 200, r.text
    entry = r.json()["steering"][-1]
    assert entry["control_scale"] == 1.5 and entry["guidance_interval"] == [0.0, 0.5]
    assert entry["changed"] == ["control_scale", "guidance_interval"]
    running = client.get(f"/api/jobs/{job['id']}").json()
    assert running["steer"]["control_scale"] == 1.5
    live = client.studio._live[job["id"]]
    wait(client, job["id"], states=("running",), step=entry["step"] + 2)
    assert live.run.extras.control.scales == [1.5]
    bad = client.post(f"/api/jobs/{job['id']}/steer", json={"ip_adapter_scale": 0.5})
    assert bad.status_code == 422 and bad.json()["field"] == "ip_adapter_scale" and "IP-Adapter" in bad.json()["allowed"]
    client.post(f"/api/jobs/{job['id']}/cancel")
    done = wait(client, job["id"])
    rows = done["record"]["rows_per_step"]
    assert rows[-1] == 1 or done["steps_completed"] < 200  # guided only in the first half from the steer on
    assert done["steering"][-1]["control_scale"] == 1.5


def test_steer_control_scale_on_a_job_without_control_names_the_field(client):
    job = submit(client, steps=400)
    wait(client, job["id"], states=("running",), step=1)
    r = client.post(f"/api/jobs/{job['id']}/steer", json={"control_scale": 1.0})
    assert r.status_code == 422 and r.json()["field"] == "control_scale"
    client.post(f"/api/jobs/{job['id']}/cancel")


BAD_FIELDS = [
    ({"init_image": "nope"}, "init_image", "32 hexadecimal"),
    ({"init_image": "0" * 32}, "init_image", "there is none"),
    ({"mask": "0" * 32}, "mask", "with init_image"),
    ({"strength": 0.5}, "strength", "without init_image"),
    ({"control_scale": 1.0}, "control_scale", "without control"),
    ({"control_end": 0.5}, "control_end", "without control"),
    ({"num_images": 0}, "num_images", "[1, 8]"),
    ({"num_images": 9}, "num_images", "[1, 8]"),
    ({"num_images": "2"}, "num_images", "[1, 8]"),
    ({"model": "other"}, "model", "one model"),
    ({"loras": [{"name": "x"}]}, "loras[0].name", "no LoRAs"),
    ({"loras": "x"}, "loras", "a list"),
]


@pytest.mark.parametrize("fields, field, words", BAD_FIELDS)
def test_bad_job_fields_are_a_422_naming_the_field_value_and_what_is_allowed(client, fields, field, words):
    r = client.post("/api/jobs", json={"prompt": PROMPT, **fields})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == field and words in body["allowed"] + body["error"] and "value" in body


def test_bad_picture_combinations(client):
    init = upload(client, png((32, 32)))["id"]
    small = upload(client, png((16, 16)))["id"]
    odd = upload(client, png((30, 30)))["id"]
    cases = [
        ({"init_image": odd}, "init_image", "multiples of 8"),
        ({"init_image": init, "mask": small}, "mask", "init_image's size"),
        ({"init_image": init, "strength": 0}, "strength", "(0, 1]"),
        ({"init_image": init, "strength": 0.1, "steps": 4}, "strength", "at least"),
        ({"init_image": init, "size": "32x32"}, "size", "left out with init_image"),
        ({"control": small, "size": "32x32"}, "control", "output size"),
        ({"control": init, "control_scale": 11, "size": "32x32"}, "control_scale", "[0, 10]"),
        ({"control": init, "control_end": 0, "size": "32x32"}, "control_end", "(0, 1]"),
        ({"init_image": init, "mask": init, "control": init}, "control", "ControlNet inpainting"),
    ]
    for fields, field, words in cases:
        r = client.post("/api/jobs", json={"prompt": PROMPT, **fields})
        assert r.status_code == 422 and r.json()["field"] == field and words in r.json()["allowed"], (fields, r.text)


@pytest.mark.parametrize("body, field", [
    ({}, "body"), ({"guidance": None}, "guidance"), ({"guidance_interval": [0.6, 0.2]}, "guidance_interval"),
    ({"control_scale": -1}, "control_scale"), ({"ip_adapter_scale": "x"}, "ip_adapter_scale"),
    ({"speed": 2}, "speed"), ({"cfg_cutoff": 0.5, "guidance_interval": [0, 1]}, "guidance_interval"),
])
def test_bad_steer_is_a_422_naming_the_field(client, body, field):
    r = client.post("/api/jobs/" + "0" * 32 + "/steer", json=body)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_models_and_loras_routes_with_one_model(client, sd_folder):
    assert client.get("/api/models").json()["models"] == [{"name": sd_folder.name, "default": True, "loaded": True}]
    assert client.get("/api/loras").json() == {"loras": []}
