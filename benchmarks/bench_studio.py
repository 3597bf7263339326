"""`stepdiff serve` measured: preview streaming cost, stop latency, load, faults, workers, pictures, Ray; a screenshot.

Every measure runs real `stepdiff serve` processes on the shipped model (torch threads 1) and talks to
them over HTTP and WebSockets from this process, as browsers would.

    python benchmarks/bench_studio.py previews --rounds 8      # cost of streaming frames, 0 / 1 / 10 clients
    python benchmarks/bench_studio.py stop --trials 20         # model calls after a cancel request
    python benchmarks/bench_studio.py load                     # 20 clients x 100 jobs, p99 API latency
    python benchmarks/bench_studio.py faults                   # kill -9 + restart, a dropping client, malformed requests
    python benchmarks/bench_studio.py workers                  # 1 vs 2 workers, jobs per second
    python benchmarks/bench_studio.py pictures --rounds 6      # img2img / ControlNet streaming cost; upload to first preview
    python benchmarks/bench_studio.py ray                      # jobs/s on 1 and 2 Ray actors against in-process; stop
    python benchmarks/bench_studio.py screenshot               # docs/images/studio.png
    python benchmarks/bench_studio.py all
    python benchmarks/bench_studio.py previews --smoke         # (any of them) smallest settings: checks it runs
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import websockets

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"
FINAL = {"finished", "cancelled", "failed", "interrupted"}


class Server:
    """A `stepdiff serve` process on a free port."""

    def __init__(self, data: Path, *args: str) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stepdiff.cli", "serve", "--port", "0", "--data", str(data), "--threads", "1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.lines: list[str] = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server did not start:\n" + "".join(self.lines))
            self.lines.append(line)
            if line.startswith("stepdiff studio: "):
                self.url = line.split(": ", 1)[1].strip()
                break
        self.ws = self.url.replace("http://", "ws://") + "api/events"

    def stop(self, sig: int = signal.SIGINT) -> str:
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=120)
        return "".join(self.lines) + (out or "")

    def get(self, path: str) -> dict:
        return httpx.get(self.url + path, timeout=30).json()

    def submit(self, **fields) -> dict:
        r = httpx.post(self.url + "api/jobs", json={"prompt": PROMPT, **fields}, timeout=30)
        r.raise_for_status()
        return r.json()

    def wait(self, job_id: str, states=FINAL, step: int | None = None, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"api/jobs/{job_id}")
            if job["state"] in states and (step is None or job["steps_completed"] >= step):
                return job
            time.sleep(0.01)
        raise TimeoutError(job)


class Watchers:
    """N WebSocket clients in a background event loop, each reading everything (counting frames)."""

    def __init__(self, url: str, n: int) -> None:
        import threading

        self.frames = [0] * n
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(url, n),), daemon=True)
        self.thread.start()
        self.ready.wait(30)

    async def _main(self, url: str, n: int) -> None:
        sockets = [await websockets.connect(url, max_size=None) for _ in range(n)]
        for s in sockets:
            await s.recv()  # hello
        self.ready.set()

        async def read(i, s):
            try:
                async for message in s:
                    if '"frame": "data:' in message:
                        self.frames[i] += 1
                    if self.stopping:
                        return
            except websockets.ConnectionClosed:
                return

        tasks = [asyncio.ensure_future(read(i, s)) for i, s in enumerate(sockets)]
        while not self.stopping:
            await asyncio.sleep(0.05)
        for s in sockets:
            await s.close()
        for t in tasks:
            t.cancel()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(30)


def step_seconds(job: dict) -> float:
    rec = job["record"]
    return rec["wall_seconds"] / rec["steps_completed"]


def bench_previews(rounds: int, steps: int) -> dict:
    """Job time per step with 0, 1 and 10 clients watching, per preview method (tiny and linear at every step; auto:
    the default, its own steps), interleaved by round."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        try:
            server.wait(server.submit(steps=steps)["id"])  # warm-up (loads the tiny decoder lazily too)
            for method in ("auto", "tiny", "linear"):  # auto: the default, the tiny decoder on the steps its budget chooses
                samples: dict[int, list[float]] = {0: [], 1: [], 10: []}
                frames: dict[int, int] = {0: 0, 1: 0, 10: 0}
                for r in range(rounds):
                    order = [0, 1, 10]
                    random.Random(r).shuffle(order)
                    for n in order:
                        watchers = Watchers(server.ws, n) if n else None
                        preview = {"method": method} if method == "auto" else {"every": 1, "method": method}
                        job = server.wait(server.submit(steps=steps, seed=r, preview=preview)["id"])
                        if watchers is not None:
                            time.sleep(0.2)
                            watchers.close()
                            frames[n] += sum(watchers.frames)
                        samples[n].append(step_seconds(job))
                base = statistics.median(samples[0])
                results[method] = {
                    "step_ms_no_client": round(base * 1e3, 2),
                    **{f"cost_{n}_clients": round(statistics.median(
                        [s / b - 1 for s, b in zip(samples[n], samples[0])]), 4) for n in (1, 10)},
                    "frames_per_client_per_job": {n: round(frames[n] / max(1, rounds * n), 1) for n in (1, 10)},
                }
            stats = server.get("api/info")["stats"]
            offer = stats["preview_offer_seconds"] / max(1, stats["preview_offered_steps"])
            results["worker_offer_ms_per_step"] = round(offer * 1e3, 3)
            results["render_ms_per_frame"] = round(stats["preview_render_seconds"] / max(1, stats["preview_frames"]) * 1e3, 3)
        finally:
            server.stop()
    return results


def bench_stop(trials: int) -> dict:
    """Model calls made after the cancel request (the call in flight may finish), and the time to the final state."""
    after, ms = [], []
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        try:
            for t in range(trials):
                job = server.submit(steps=300, seed=t)
                server.wait(job["id"], states={"running"}, step=2 + t % 7)
                time.sleep(random.Random(t).uniform(0, 0.05))  # land anywhere inside a step
                start = time.perf_counter()
                httpx.post(f"{server.url}api/jobs/{job['id']}/cancel", timeout=30)
                done = server.wait(job["id"])
                ms.append((time.perf_counter() - start) * 1e3)
                rec = done["record"]
                after.append(rec["model_calls"] - rec["model_calls_at_cancel"])
        finally:
            server.stop()
    return {"trials": trials, "model_calls_after_cancel_max": max(after), "mean": round(statistics.mean(after), 3),
            "histogram": {k: after.count(k) for k in sorted(set(after))},
            "ms_to_final_state_median": round(statistics.median(ms), 1), "ms_p90": round(sorted(ms)[int(0.9 * len(ms))], 1)}


def bench_load(clients: int, jobs: int, steps: int) -> dict:
    """`clients` concurrent clients submit `jobs` jobs in all and watch them (WebSocket + polling) to a final state."""
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        latencies: list[float] = []
        rejected = 0
        try:
            async def timed(client, method, path, **kw):
                start = time.perf_counter()
                r = await client.request(method, server.url + path, **kw)
                latencies.append(time.perf_counter() - start)
                return r

            async def one_client(k: int, count: int) -> list[str]:
                nonlocal rejected
                mine: list[str] = []
                finals: dict[str, str] = {}
                async with httpx.AsyncClient(timeout=60) as client, websockets.connect(server.ws, max_size=None) as ws:
                    await ws.recv()
                    for j in range(count):
                        while True:
                            r = await timed(client, "POST", "api/jobs", json={"prompt": PROMPT, "steps": steps,
                                                                                "seed": k * 1000 + j})
                            if r.status_code != 429:
                                break
                            rejected += 1
                            await asyncio.sleep(0.2)
                        mine.append(r.json()["id"])

                    async def listen():
                        async for message in ws:
                            e = json.loads(message)
                            if e.get("job") in mine and e["type"] in FINAL:
                                finals[e["job"]] = e["type"]
                            if len(finals) == len(mine):
                                return

                    listener = asyncio.ensure_future(listen())
                    while len(finals) < len(mine):  # also poll: events may be lost, the API is the truth
                        for job_id in [m for m in mine if m not in finals]:
                            r = await timed(client, "GET", f"api/jobs/{job_id}")
                            if r.json()["state"] in FINAL:
                                finals[job_id] = r.json()["state"]
                        await asyncio.sleep(0.5)
                    listener.cancel()
                return mine

            async def main():
                per = [jobs // clients + (1 if k < jobs % clients else 0) for k in range(clients)]
                return await asyncio.gather(*(one_client(k, n) for k, n in enumerate(per)))

            start = time.perf_counter()
            ids = [i for mine in asyncio.run(main()) for i in mine]
            wall = time.perf_counter() - start
            history = server.get("api/jobs?limit=100")["jobs"] + server.get("api/jobs?limit=100&before=1000000")["jobs"]
            rows = {j["id"]: j for j in history}
        finally:
            server.stop()
    lat = sorted(latencies)
    return {"clients": clients, "jobs": jobs, "steps": steps, "submitted": len(ids), "unique": len(set(ids)),
            "in_store": len(rows), "finished": sum(1 for i in ids if rows.get(i, {}).get("state") == "finished"),
            "rejected_429": rejected, "wall_s": round(wall, 1), "requests": len(lat),
            "api_ms_p50": round(lat[len(lat) // 2] * 1e3, 1), "api_ms_p99": round(lat[int(0.99 * (len(lat) - 1))] * 1e3, 1),
            "api_ms_max": round(lat[-1] * 1e3, 1)}


def bench_faults() -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        # 1. kill -9 mid-run, then restart.
        server = Server(data)
        done = [server.wait(server.submit(steps=5, seed=s)["id"]) for s in range(2)]
        running = server.submit(steps=400)
        queued = [server.submit(steps=5, seed=10 + s) for s in range(2)]
        server.wait(running["id"], states={"running"}, step=3)
        server.proc.kill()  # SIGKILL: no clean-up at all
        server.proc.wait()
        server = Server(data)
        try:
            after = {j["id"]: j for j in server.get("api/jobs?limit=100")["jobs"]}
            for q in queued:
                server.wait(q["id"])
            images_ok = all(httpx.get(server.url + j["image"].lstrip("/")).status_code == 200 for j in done)
            out["kill9"] = {
                "finished_before_kept": all(after[j["id"]]["state"] == "finished" for j in done) and images_ok,
                "running_marked": after[running["id"]]["state"],
                "queued_after_restart": [server.get(f"api/jobs/{q['id']}")["state"] for q in queued],
                "rows": len(after), "tmp_files_left": len(list((data / "images").glob(".*.tmp"))),
            }
            # 2. A client dropping mid-stream (the TCP connection cut without a close frame).
            job = server.submit(steps=60)

            async def drop():
                ws = await websockets.connect(server.ws, max_size=None)
                seen = 0
                while seen < 5:
                    if '"type": "step"' in await ws.recv():
                        seen += 1
                ws.transport.abort()

            asyncio.run(drop())
            final = server.wait(job["id"])
            out["client_drop"] = {"job_state": final["state"], "steps": final["steps_completed"],
                                  "server_ok": httpx.get(server.url + "api/info").status_code == 200,
                                  "subscribers_after": server.get("api/info")["stats"]["subscribers"]}
            # 3. Malformed requests: each must be a 4xx with a JSON error, and the server must keep serving.
            out["malformed"] = malformed(server.url)
        finally:
            out["clean_stop"] = "stepdiff serve: stopped" in server.stop()
    return out


def malformed(url: str) -> dict:
    big = "x" * 5000
    cases = [
        ("POST", "api/jobs", b"{not json"), ("POST", "api/jobs", b""), ("POST", "api/jobs", b"[1, 2]"),
        ("POST", "api/jobs", b"\xff\xfe\x00"), ("POST", "api/jobs", b'{"prompt": NaN}'),
        ("POST", "api/jobs", json.dumps({"prompt": 5}).encode()),
        ("POST", "api/jobs", json.dumps({"prompt": big}).encode()),
        ("POST", "api/jobs", b"x" * 200_000),
        ("POST", "api/jobs", json.dumps({"prompt": PROMPT, "steps": "many"}).encode()),
        ("POST", "api/jobs", json.dumps({"prompt": PROMPT, "steps": -3}).encode()),
        ("POST", "api/jobs", json.dumps({"prompt": PROMPT, "seed": 2**70}).encode()),
        ("POST", "api/jobs", json.dumps({"prompt": PROMPT, "width": 65}).encode()),
        ("POST", "api/jobs", json.dumps({"prompt": PROMPT, "guidance": [1]}).encode()),
        ("POST", "api/jobs", json.dumps({"prompt": PROMPT, "scheduler": "../../etc"}).encode()),
        ("POST", "api/jobs", json.dumps({"prompt": PROMPT, "evil": True}).encode()),
        ("POST", "api/jobs", json.dumps({"prompt": PROMPT, "preview": {"every": 0}}).encode()),
        ("GET", "api/jobs/xyz", None), ("GET", "api/jobs/" + "f" * 32, None), ("GET", "api/jobs/' OR 1=1 --", None),
        ("POST", "api/jobs/" + "f" * 32 + "/cancel", None), ("POST", "api/jobs/nope/steer", b'{"guidance": 1}'),
        ("GET", "api/images/..%2f..%2fetc%2fpasswd", None), ("GET", "api/images/%2e%2e%2fstudio.sqlite3", None),
        ("GET", "api/images/studio.sqlite3", None), ("GET", "api/jobs?limit=-5", None), ("GET", "api/jobs?before=abc", None),
        ("DELETE", "api/jobs", None), ("GET", "api/nothing", None),
    ]
    codes = []
    clear = 0
    with httpx.Client(timeout=30) as client:
        for method, path, body in cases:
            r = client.request(method, url + path, content=body)
            codes.append(r.status_code)
            try:
                clear += bool(r.json().get("error"))
            except ValueError:
                pass
        r = client.post(url + "api/jobs", json={"prompt": PROMPT, "steps": 2}, headers={"origin": "http://evil.example"})
        codes.append(r.status_code)
        clear += bool(r.json().get("error"))
        ok = client.get(url + "api/info").status_code == 200
    return {"requests": len(codes), "all_4xx": all(400 <= c < 500 for c in codes), "with_json_error": clear,
            "codes": {c: codes.count(c) for c in sorted(set(codes))}, "serving_after": ok}


def bench_workers(jobs: int, steps: int) -> dict:
    out = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            server = Server(Path(tmp), "--workers", str(workers))
            try:
                server.wait(server.submit(steps=2)["id"])
                start = time.perf_counter()
                ids = [server.submit(steps=steps, seed=s)["id"] for s in range(jobs)]
                for i in ids:
                    server.wait(i)
                out[f"{workers}_workers_jobs_per_s"] = round(jobs / (time.perf_counter() - start), 3)
            finally:
                server.stop()
    out["speedup"] = round(out["2_workers_jobs_per_s"] / out["1_workers_jobs_per_s"], 3)
    return out


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _pictures(server: Server) -> dict[str, bytes]:
    """An init picture (a job of the shipped model, fetched back) and a control silhouette (a white disc on black)."""
    from PIL import Image, ImageDraw

    job = server.wait(server.submit(steps=10, seed=123)["id"])
    init = httpx.get(server.url + job["image"].lstrip("/"), timeout=30).content
    w, h = Image.open(io.BytesIO(init)).size
    control = Image.new("RGB", (w, h))
    ImageDraw.Draw(control).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill="white")
    return {"init": init, "control": _png(control)}


def upload(server: Server, png: bytes) -> str:
    r = httpx.post(server.url + "api/uploads", content=png, headers={"Content-Type": "image/png"}, timeout=30)
    r.raise_for_status()
    return r.json()["id"]


def bench_pictures(rounds: int, steps: int, trials: int) -> dict:
    """Preview streaming cost for an image-to-image and a ControlNet job (the default preview: `auto`, the tiny
    decoder on the steps its 3% budget chooses): job time per step with 1 and 10 clients watching against none,
    interleaved rounds, the median of the per-round ratios. Then upload-to-first-preview: POST /api/uploads, POST a
    job using it, until the first step event with a frame reaches a WebSocket client already connected."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        try:
            pictures = _pictures(server)
            init, control = upload(server, pictures["init"]), upload(server, pictures["control"])
            jobs = {"img2img": {"init_image": init, "strength": 0.6, "steps": max(2, round(steps / 0.6))},
                    "controlnet": {"control": control, "steps": steps}}
            for fields in jobs.values():
                server.wait(server.submit(seed=0, **fields)["id"])  # warm-up: the ControlNet, the tiny decoder
            for name, fields in jobs.items():
                samples: dict[int, list[float]] = {0: [], 1: [], 10: []}
                frames = {1: 0, 10: 0}
                for r in range(rounds):
                    order = [0, 1, 10]
                    random.Random(r).shuffle(order)
                    for n in order:
                        watchers = Watchers(server.ws, n) if n else None
                        job = server.wait(server.submit(seed=r, **fields)["id"])
                        if watchers is not None:
                            time.sleep(0.2)
                            watchers.close()
                            frames[n] += sum(watchers.frames)
                        samples[n].append(step_seconds(job))
                out[name] = {
                    "steps_run": job["record"]["steps_completed"],
                    "step_ms_no_client": round(statistics.median(samples[0]) * 1e3, 2),
                    **{f"cost_{n}_clients": round(statistics.median(
                        [s / b - 1 for s, b in zip(samples[n], samples[0])]), 4) for n in (1, 10)},
                    "frames_per_client_per_job": {n: round(frames[n] / max(1, rounds * n), 1) for n in (1, 10)},
                }
            out["upload_to_first_preview"] = _first_preview(server, pictures["init"], trials, steps)
        finally:
            server.stop()
    return out


def _first_preview(server: Server, png: bytes, trials: int, steps: int) -> dict:
    async def one(seed: int) -> tuple[float, float]:
        async with websockets.connect(server.ws, max_size=None) as ws, httpx.AsyncClient(timeout=30) as client:
            await ws.recv()  # hello
            start = time.perf_counter()
            r = await client.post(server.url + "api/uploads", content=png, headers={"Content-Type": "image/png"})
            uploaded = time.perf_counter() - start
            r = await client.post(server.url + "api/jobs", json={"prompt": PROMPT, "init_image": r.json()["id"],
                                                                "strength": 0.6, "steps": steps, "seed": seed})
            job_id = r.json()["id"]
            async for message in ws:
                e = json.loads(message)
                if e.get("job") == job_id and e["type"] == "step" and e.get("frame"):
                    return uploaded, time.perf_counter() - start
                if e.get("job") == job_id and e["type"] in FINAL:
                    raise RuntimeError(f"job {job_id} ended without a frame")
        raise RuntimeError("the event stream closed")

    times = []
    for t in range(trials):
        times.append(asyncio.run(one(1000 + t)))
        server.wait(server.get("api/jobs?limit=1")["jobs"][0]["id"])  # the queue empty before the next trial
    first = sorted(x for _, x in times)
    return {"trials": trials, "upload_ms_median": round(statistics.median(u for u, _ in times) * 1e3, 1),
            "first_frame_ms_median": round(statistics.median(first) * 1e3, 1),
            "first_frame_ms_max": round(first[-1] * 1e3, 1)}


def bench_ray(jobs: int, steps: int, repeats: int, trials: int) -> dict:
    """Jobs per second on the in-process workers (1 and 2 threads) and on Ray actors (`--ray --ray-workers 1` and 2,
    a local Ray started by the server), the same `jobs` x `steps` jobs, the median of `repeats` batches; then the stop
    latency on Ray: model calls made on the actor after the cancel request, `trials` cancels at random points."""
    out: dict = {}
    setups = {"in_process_1": ["--workers", "1"], "in_process_2": ["--workers", "2"],
              "ray_1_actor": ["--ray", "--ray-workers", "1"], "ray_2_actors": ["--ray", "--ray-workers", "2"]}
    for name, flags in setups.items():
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            server = Server(Path(tmp), *flags)
            ready = time.perf_counter() - started
            try:
                for s in range(2):
                    server.wait(server.submit(steps=2, seed=s)["id"])  # warm-up (each actor, on Ray)
                rates = []
                for r in range(repeats):
                    start = time.perf_counter()
                    ids = [server.submit(steps=steps, seed=100 * r + s)["id"] for s in range(jobs)]
                    for i in ids:
                        server.wait(i)
                    rates.append(jobs / (time.perf_counter() - start))
                out[name] = {"jobs_per_s": round(statistics.median(rates), 3), "start_s": round(ready, 1)}
                if name == "ray_2_actors":
                    after, ms = [], []
                    for t in range(trials):
                        job = server.submit(steps=300, seed=t)
                        server.wait(job["id"], states={"running"}, step=2 + t % 7)
                        time.sleep(random.Random(t).uniform(0, 0.05))
                        start = time.perf_counter()
                        httpx.post(f"{server.url}api/jobs/{job['id']}/cancel", timeout=30)
                        rec = server.wait(job["id"])["record"]
                        ms.append((time.perf_counter() - start) * 1e3)
                        after.append(rec["model_calls"] - rec["model_calls_at_cancel"])
                    out["ray_stop"] = {"trials": trials, "model_calls_after_cancel_max": max(after),
                                       "histogram": {k: after.count(k) for k in sorted(set(after))},
                                       "ms_to_final_state_median": round(statistics.median(ms), 1),
                                       "worker": rec.get("worker")}
            finally:
                server.stop()
    base = out["in_process_1"]["jobs_per_s"]
    for name in setups:
        out[name]["vs_in_process_1"] = round(out[name]["jobs_per_s"] / base, 3)
    return out


def screenshot(path: Path) -> str:
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        try:
            for s, (color, shape, bg) in enumerate([("red", "circle", "blue"), ("yellow", "triangle", "purple"),
                                                    ("green", "square", "black"), ("white", "circle", "orange")]):
                server.wait(server.submit(prompt=f"a {color} {shape} on a {bg} background", seed=s, steps=25,
                                          cfg_cutoff=0.4 if s % 2 else None)["id"])
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
                page = browser.new_page(viewport={"width": 1100, "height": 560})
                page.goto(server.url)
                page.wait_for_selector("#connection:text('live')")
                page.fill("#prompt", "a blue square on a yellow background")
                page.fill("#steps", "400")
                page.keyboard.press("Control+Enter")
                deadline = time.monotonic() + 60
                while page.evaluate("document.getElementById('progress').value") < 180 and time.monotonic() < deadline:
                    time.sleep(0.05)
                page.focus("#steer")
                for _ in range(5):
                    page.keyboard.press("ArrowLeft")
                time.sleep(0.5)
                page.screenshot(path=str(path))
                page.keyboard.press("Escape")
                browser.close()
        finally:
            server.stop()
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("previews", "stop", "load", "faults", "workers", "pictures", "ray",
                                         "screenshot", "all"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--load-steps", type=int, default=4)
    parser.add_argument("--ray-jobs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "images" / "studio.png")
    parser.add_argument("--smoke", action="store_true",
                        help="smallest settings, a few seconds: checks that the script runs (tests/test_benchmarks.py)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.trials, args.clients, args.jobs, args.load_steps = 1, 2, 1, 2, 2, 1
        args.ray_jobs, args.repeats = 2, 1
        if args.what in ("screenshot", "all"):
            parser.error("--smoke runs one measure (previews, stop, load, faults, workers, pictures or ray), "
                         "not the screenshot")
    todo = ["previews", "stop", "load", "faults", "workers", "pictures", "ray"] if args.what == "all" else [args.what]
    for what in todo:
        started = time.perf_counter()
        if what == "previews":
            result = bench_previews(args.rounds, args.steps)
        elif what == "stop":
            result = bench_stop(args.trials)
        elif what == "load":
            result = bench_load(args.clients, args.jobs, args.load_steps)
        elif what == "faults":
            result = bench_faults()
        elif what == "workers":
            result = bench_workers(8, args.steps)
        elif what == "pictures":
            result = bench_pictures(args.rounds, args.steps, args.trials)
        elif what == "ray":
            result = bench_ray(args.ray_jobs, args.steps, args.repeats, args.trials)
        else:
            result = screenshot(args.screenshot)
        print(f"{what} ({time.perf_counter() - started:.0f} s): {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    main()
