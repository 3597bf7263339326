"""The studio page in real headless Chromium (Debian's package, driven by Playwright), on a real
``stepdiff serve`` process with the shipped model: the page loads, previews stream, Stop works, the
guidance slider steers the running job."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("STEPDIFF_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("studio")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepdiff.cli", "serve", "--port", "0", "--data", str(data), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    url, lines = None, []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and url is None:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("stepdiff studio: "):
            url = line.split(": ", 1)[1].strip()
    assert url is not None, "".join(lines)
    yield url, data
    proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    assert "stepdiff serve: stopped" in out
    assert not list(Path(data, "images").glob(".*.tmp"))


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    url, _ = server
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("#connection:text('live')", timeout=30_000)
    yield page
    context.close()
    assert errors == []


def until(page, js, timeout=30):
    """Poll an expression in the page (the page's CSP forbids the string evaluation wait_for_function uses)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.evaluate(js):
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {js}")


def newest_job(server):
    url, _ = server
    return httpx.get(url + "api/jobs?limit=1").json()["jobs"][0]


def wait_job(server, job_id, timeout=120):
    url, _ = server
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}api/jobs/{job_id}").json()
        if job["state"] in ("finished", "cancelled", "failed", "interrupted"):
            return job
        time.sleep(0.05)
    raise AssertionError(job)


def submit_from_page(page, steps, guidance=None):
    page.fill("#prompt", PROMPT)
    page.fill("#steps", str(steps))
    if guidance is not None:
        page.fill("#guidance", str(guidance))
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    until(page, "document.getElementById('stop').disabled === false")


def test_page_loads(page):
    assert page.title() == "stepdiff studio"
    assert "shapes-v3" in page.text_content("#model")
    for selector in ("#prompt", "#generate", "#stop", "#steer", "#progress", ".frame", "#rows-saved", "#history", "#modes"):
        assert page.is_visible(selector), selector
    assert page.locator("#scheduler option").count() > 5
    assert not page.is_visible("#preview")  # idle: no broken-image icon, an empty frame
    assert page.evaluate("getComputedStyle(document.querySelector('.frame')).width") == "384px"


def test_previews_stream_before_the_final_image(page, server):
    page.evaluate("""() => {
        window.seen = [];
        const img = document.getElementById('preview');
        new MutationObserver(() => window.seen.push(img.src)).observe(img, {attributes: true, attributeFilter: ['src']});
    }""")
    page.fill("#preview-every", "1")  # a frame at every step: auto's own cadence may skip most steps of a short job
    submit_from_page(page, steps=30)
    job = newest_job(server)
    page.wait_for_selector(f".card[data-job='{job['id']}'] img", timeout=60_000)
    seen = page.evaluate("window.seen")
    final = next(i for i, src in enumerate(seen) if "/api/images/" in src)
    frames = [s for s in seen[:final] if s.startswith("data:image/")]
    assert len(set(frames)) >= 3, f"{len(set(frames))} distinct frames before the final image"
    assert wait_job(server, job["id"])["state"] == "finished"
    assert page.get_attribute(f".card[data-job='{job['id']}']", "data-state") == "finished"


def test_stop_gives_an_interrupted_image_in_the_gallery(page, server):
    submit_from_page(page, steps=400)
    job = newest_job(server)
    until(page, "document.getElementById('progress').value >= 2")
    page.keyboard.press("Escape")
    card = f".card[data-job='{job['id']}']"
    page.wait_for_selector(f"{card} img", timeout=30_000)
    assert page.get_attribute(card, "data-state") == "cancelled"
    assert "cancelled at step" in page.text_content(f"{card} .tag")
    done = wait_job(server, job["id"])
    assert done["record"]["interrupted"] and done["steps_completed"] < 400
    assert "Interrupted at step" in page.text_content("#status") or "at step" in page.text_content("#status")


def test_guidance_slider_steers_the_running_job(page, server):
    submit_from_page(page, steps=400, guidance=7.5)
    job = newest_job(server)
    until(page, "document.getElementById('progress').value >= 3")
    page.focus("#steer")
    page.keyboard.press("Home")  # the slider to 0: no guidance, one row a step from the next step on
    assert page.text_content("#steer-value") == "0"
    until(page, "Number(document.getElementById('rows-saved').textContent) >= 3")
    page.keyboard.press("Escape")
    done = wait_job(server, job["id"])
    rows = done["record"]["rows_per_step"]
    assert rows[:3] == [2, 2, 2] and rows[-1] == 1, rows
    assert done["steering"] and done["steering"][0]["guidance"] == 0.0
    assert int(page.text_content("#rows-saved")) == done["rows_saved"] >= 3


def test_cache_interval_slider_steers_a_fast_job(page, server):
    assert not page.is_visible("#steer-cache")  # only for a job with step caching
    page.check("#fast")
    try:
        submit_from_page(page, steps=400)
    finally:
        page.uncheck("#fast")
    job = newest_job(server)
    assert page.is_visible("#steer-cache") and page.text_content("#steer-cache-value") == "3"  # the fast preset's
    assert not page.is_visible("#steer-threshold")  # no First-Block-Cache in this job
    until(page, "document.getElementById('progress').value >= 3")
    page.focus("#steer-cache")
    page.keyboard.press("Home")  # interval 1: every step in full from the next step on
    assert page.text_content("#steer-cache-value") == "1"
    until_job = time.monotonic() + 30
    while not httpx.get(server[0] + f"api/jobs/{job['id']}", timeout=10).json()["steering"]:
        assert time.monotonic() < until_job
        time.sleep(0.05)
    page.keyboard.press("Escape")
    done = wait_job(server, job["id"])
    assert done["steering"][0]["cache_interval"] == 1 and done["steering"][0]["changed"] == ["cache_interval"]


def test_unknown_words_are_named_under_the_prompt_before_submit(page):
    page.fill("#prompt", "a red circle on a blue background, high quality")
    until(page, "document.getElementById('words').textContent.includes('high, quality')")
    assert "does not know" in page.text_content("#words")
    page.fill("#prompt", "a red circle on a blue background")
    until(page, "document.getElementById('words').textContent === ''")
