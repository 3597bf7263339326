"""Studio II in real headless Chromium on a real ``stepdiff serve`` with the shipped model and its ControlNet: each
mode end to end (text with 4 images, image from a gallery image, inpainting with a mask painted by mouse, control
with a drawn silhouette and its scale steered mid-run), the gallery's open, delete and "use as input"."""

import httpx
import pytest

from .test_studio_browser import browser, page, server, until, wait_job  # noqa: F401 - fixtures

PROMPT = "a red circle on a blue background"


def newest(server):  # noqa: F811
    url, _ = server
    return httpx.get(url + "api/jobs?limit=1").json()["jobs"][0]


def generate(page, steps):  # noqa: F811
    page.fill("#prompt", PROMPT)
    page.fill("#steps", str(steps))
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")


def finished_card(page, server, steps=6):  # noqa: F811
    generate(page, steps)
    until(page, "document.getElementById('stop').disabled === false || document.getElementById('error').textContent !== ''")
    assert page.text_content("#error") == ""
    job = newest(server)
    page.wait_for_selector(f".card[data-job='{job['id']}'] img", timeout=60_000)
    return wait_job(server, job["id"])


def test_four_images_grid_open_and_delete(page, server):  # noqa: F811
    page.fill("#num-images", "4")
    job = finished_card(page, server)
    card = f".card[data-job='{job['id']}']"
    assert job["state"] == "finished" and len(job["images"]) == 4
    assert page.locator(f"{card} .thumb img").count() == 4
    until(page, f"[...document.querySelectorAll(\"{card} .thumb img\")].every(i => i.complete && i.naturalWidth > 0 && !i.classList.contains('loading'))")
    page.click(f"{card} .open")
    assert page.is_visible("#viewer")
    page.keyboard.press("Escape")
    assert not page.is_visible("#viewer")
    page.click(f"{card} .delete")
    until(page, f"document.querySelector(\"{card}\") === null")
    url, _ = server
    assert httpx.get(f"{url}api/jobs/{job['id']}").status_code == 404


def test_image_mode_from_a_gallery_image(page, server):  # noqa: F811
    first = finished_card(page, server)
    page.click(f".card[data-job='{first['id']}'] .use-input")
    assert page.is_checked("input[name=mode][value=image]") and page.is_visible("#picture")
    page.fill("#strength", "0.5")
    job = finished_card(page, server, steps=8)
    assert job["state"] == "finished" and job["params"]["init_image"] and job["params"]["strength"] == 0.5
    assert job["record"]["steps_completed"] == 4


def test_inpaint_with_a_mask_painted_by_mouse(page, server):  # noqa: F811
    first = finished_card(page, server)
    page.click(f".card[data-job='{first['id']}'] .use-input")
    page.click("#modes label:has(input[value=inpaint])")
    box = page.locator("#drop").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.8, steps=8)
    page.mouse.up()
    job = finished_card(page, server)
    assert job["state"] == "finished" and job["params"]["mask"]
    url, _ = server
    from io import BytesIO

    from PIL import Image

    mask = Image.open(BytesIO(httpx.get(f"{url}api/uploads/{job['params']['mask']}.png").content)).convert("L")
    w, h = mask.size
    assert mask.getpixel((int(w * 0.75), int(h * 0.5))) == 255 and mask.getpixel((2, h - 2)) == 0


def test_control_with_a_drawn_silhouette_and_its_scale_steered_mid_run(page, server):  # noqa: F811
    page.click("#modes label:has(input[value=control])")
    box = page.locator("#drop").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.fill("#brush-size", "32")
    page.mouse.move(cx - 40, cy)
    page.mouse.down()
    for dx, dy in ((40, -40), (40, 0), (0, 40), (-40, 0), (-40, 40), (0, 0)):
        page.mouse.move(cx + dx, cy + dy, steps=4)
    page.mouse.up()
    generate(page, 400)
    until(page, "document.getElementById('progress').value >= 3")
    assert page.is_visible("#steer-control")
    page.focus("#steer-control")
    page.keyboard.press("End")  # the slider to its top: 3
    job = newest(server)
    url, _ = server
    deadline_ok = False
    import time

    for _ in range(200):
        live = httpx.get(f"{url}api/jobs/{job['id']}").json()
        if live["steering"] and live["steering"][-1].get("control_scale") == 3.0:
            deadline_ok = True
            break
        time.sleep(0.05)
    assert deadline_ok, live["steering"]
    page.keyboard.press("Escape")
    done = wait_job(server, job["id"])
    assert done["params"]["control"] and done["steering"][-1]["control_scale"] == 3.0


@pytest.mark.parametrize("mode", ["image", "inpaint"])
def test_a_mode_without_its_picture_says_so(page, mode):  # noqa: F811
    page.click(f"#modes label:has(input[value={mode}])")
    generate(page, 4)
    until(page, "document.getElementById('error').textContent !== ''")
    assert "picture" in page.text_content("#error")
