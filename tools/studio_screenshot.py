"""The studio's inpainting screenshot (docs/images/studio-inpaint.png), reproducibly.

Starts `stepdiff serve` on the shipped model (a free port, a temporary --data folder, one torch thread), draws four
gallery pictures through the API, then drives the page in headless Debian Chromium (/usr/bin/chromium, through
Playwright, as the browser tests do): "Use as input" on the red circle, Inpaint mode, a mask painted over the circle
with mouse events, a new prompt, a long job submitted with Ctrl+Enter; the screenshot is taken mid-run, while the
live preview shows the re-drawn picture beside the painted mask. The job is then stopped (Esc) and the server too.

    python tools/studio_screenshot.py [--out docs/images/studio-inpaint.png] [--steps 300]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GALLERY = [("a red circle on a blue background", 0), ("a yellow triangle on a purple background", 1),
           ("a green square on a black background", 2), ("a white circle on a orange background", 3)]
PROMPT = "a yellow square on a blue background"


def serve(data: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "stepdiff.cli", "serve", "--port", "0", "--data", str(data),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("stepdiff studio: "):
            return proc, line.split(": ", 1)[1].strip()
    raise RuntimeError("stepdiff serve did not start:\n" + "".join(lines))


def wait_job(url: str, job_id: str) -> dict:
    while True:
        job = httpx.get(f"{url}api/jobs/{job_id}", timeout=30).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.1)


def take(out: Path, steps: int, at: float) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = serve(Path(tmp))
        try:
            jobs = [httpx.post(url + "api/jobs", json={"prompt": p, "seed": s, "steps": 25}, timeout=30).json()
                    for p, s in reversed(GALLERY)]  # the red circle last: the newest card, first in the gallery
            for job in jobs:
                assert wait_job(url, job["id"])["state"] == "finished"
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1160, "height": 760})
                page.goto(url)
                page.wait_for_selector("#connection:text('live')")
                page.click(f".card[data-job='{jobs[-1]['id']}'] .use-input")
                page.click("#modes label:has(input[value=inpaint])")
                page.wait_for_function("document.querySelector('input[name=mode][value=inpaint]').checked")
                time.sleep(0.3)  # the picture drawn into its canvas
                # The mask: the lower middle of the picture, under the circle, painted in strokes with the widest brush.
                page.fill("#brush-size", "32")
                box = page.locator("#drop").bounding_box()
                x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
                page.mouse.move(x0 + w * 0.25, y0 + h * 0.55)
                page.mouse.down()
                for k in range(5):
                    fy = 0.55 + 0.08 * k
                    page.mouse.move(x0 + w * 0.75, y0 + h * fy, steps=12)
                    page.mouse.move(x0 + w * 0.25, y0 + h * (fy + 0.04), steps=12)
                page.mouse.up()
                page.fill("#prompt", PROMPT)
                page.fill("#seed", "7")
                page.fill("#steps", str(steps))
                page.focus("#prompt")
                page.keyboard.press("Control+Enter")
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and page.evaluate(
                        "document.getElementById('progress').value") < at * steps:
                    time.sleep(0.02)
                page.wait_for_function("!document.getElementById('preview').hidden")
                page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
                time.sleep(0.3)
                shot = page.screenshot()
                page.keyboard.press("Escape")
                browser.close()
        finally:
            proc.terminate()
            proc.wait(60)
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"{out} ({image.width}x{image.height}, {out.stat().st_size // 1024} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "studio-inpaint.png")
    parser.add_argument("--steps", type=int, default=300, help="the inpainting job's steps (long enough to catch mid-run)")
    parser.add_argument("--at", type=float, default=0.45, help="the share of the steps done when the screenshot is taken")
    args = parser.parse_args()
    take(args.out, args.steps, args.at)


if __name__ == "__main__":
    main()
