"""The studio never wedges: hostile requests get JSON 4xx naming the field, a bad history row or a full disk
never breaks the gallery or the queue, start-up problems name the file and the fix, one server per data folder,
no half-written file survives a restart, and slow or flooding clients cannot hold the server (a real uvicorn)."""

import errno
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from starlette.testclient import TestClient

import stepdiff
from stepdiff.studio import JobSpec, Studio, create_app
from stepdiff.studio.server import limits_for, serve

PROMPT = "a red circle on a blue background"
TEMP = ".{}.png.k3j_x9a2.tmp"  # the name atomic_write's mkstemp gives a half-written image


@pytest.fixture(scope="module")
def tiny_pipe(sd_folder):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def make(tiny_pipe, sd_folder, tmp_path):
    made = []

    def make(data=None, **kw):
        studio = Studio(tiny_pipe, sd_folder, data or tmp_path / "data", limits=limits_for(sd_folder, 500), **kw)
        client = TestClient(create_app(studio))
        client.__enter__()
        made.append(client)
        return studio, client

    yield make
    for client in made:
        client.__exit__(None, None, None)


def until(check, timeout=30.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def json_error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    return r.json()


# ----------------------------------------------------------------------------------------------- hostile requests


def test_hostile_bodies_are_json_4xx_naming_the_field_and_nothing_is_stored(make):
    studio, client = make(start=False)
    steer = "/api/jobs/" + "0" * 32 + "/steer"
    for url in ("/api/jobs", steer):
        deep = json_error(client.post(url, content=b"[" * 30_000 + b"]" * 30_000), 400)
        assert "nested too deeply" in deep["error"]
    huge = b"1" + b"0" * 400  # an integer no float can hold, in float fields
    for body, field in ((b'{"prompt":"x","guidance":%s}' % huge, "guidance"),
                        (b'{"prompt":"x","cfg_cutoff":%s}' % huge, "cfg_cutoff"),
                        (b'{"prompt":"x","guidance_interval":[0,%s]}' % huge, "guidance_interval[1]")):
        error = json_error(client.post("/api/jobs", content=body), 422)
        assert error["field"] == field and error["value"].startswith("1000") and "a number in" in error["allowed"]
    for body, field in ((b'{"guidance":-%s}' % huge, "guidance"), (b'{"cfg_cutoff":%s}' % huge, "cfg_cutoff")):
        assert json_error(client.post(steer, content=body), 422)["field"] == field
    # A lone surrogate is valid JSON but no text: refused naming the field, whichever field carries it.
    for fields, field in (({"prompt": "\ud800"}, "prompt"), ({"negative_prompt": "a\udfffb"}, "negative_prompt"),
                          ({"scheduler": "\ud800"}, "scheduler"), ({"cache": "\ud800"}, "cache"),
                          ({"\ud800": 1}, "\ud800")):
        body = json.dumps({"prompt": PROMPT, **fields}).encode()  # ASCII: the surrogate travels as \ud800
        error = json_error(client.post("/api/jobs", content=body), 422)
        assert error["field"] == field, error
        if field in ("prompt", "negative_prompt"):
            assert "surrogate" in error["allowed"] and error["value"] == repr(fields[field])
    assert client.get("/api/jobs").json()["jobs"] == []  # nothing was stored
    assert client.get("/api/info").status_code == 200


def test_a_content_length_of_non_ascii_digits_is_a_400(make):
    studio, client = make(start=False)
    app = client.app
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    import asyncio

    scope = {"type": "http", "method": "POST", "path": "/api/jobs", "raw_path": b"/api/jobs", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"content-length", "²".encode("latin-1"))], "scheme": "http",
             "server": ("testserver", 80), "client": ("127.0.0.1", 1), "root_path": "", "http_version": "1.1",
             "asgi": {"version": "3.0"}}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400 and b"Content-Length" in sent[1]["body"]


# ----------------------------------------------------------------------------------------------- the history


def _insert(db, job_id, state, params, record=None, steering=None, error=None, image=None):
    with sqlite3.connect(db) as con:
        con.execute("INSERT INTO jobs (id, state, params, created, record, steering, error, image) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (job_id, state, params, time.time(), record, steering, error, image))


def test_bad_rows_never_break_the_gallery_or_the_start_up(make, tmp_path):
    data = tmp_path / "rows"
    studio, client = make(data=data, start=False)
    client.__exit__(None, None, None)  # closes the studio: the rows below are what a restart finds
    db = data / "studio.sqlite3"
    good = JobSpec(prompt=PROMPT, steps=2).to_dict()
    # What the old server stored for a lone surrogate (json.dumps escapes it) and a record with NaN in it
    _insert(db, "a" * 32, "finished", json.dumps({**good, "prompt": "\ud800"}), record='{"steps_completed": NaN}')
    _insert(db, "b" * 32, "finished", "{not json", record="[]", steering='"x"')
    _insert(db, "c" * 32, "failed", '{"prompt": "no steps or guidance"}', error="boom")
    _insert(db, "d" * 32, "queued", json.dumps({**good, "colour": "red"}))  # a key this version does not know
    _insert(db, "e" * 32, "queued", "[1, 2")
    _insert(db, "f" * 32, "queued", json.dumps({**good, "steps": 100_000}))  # over this server's --max-steps
    _insert(db, "0" * 32, "queued", json.dumps(good))
    studio, client = make(data=data)  # starts: the bad queued rows are failed, saying why; the good one runs
    assert [row["id"][0] for row in studio.recovered_failed] == ["d", "e", "f"]
    done = until(lambda: client.get("/api/jobs/" + "0" * 32).json()["state"] == "finished", what="the good job")
    assert done
    r = client.get("/api/jobs?limit=100")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    jobs = {job["id"][0]: job for job in r.json()["jobs"]}
    assert set(jobs) == set("abcdef0") and all(isinstance(job["params"], dict) for job in jobs.values())
    assert jobs["a"]["params"]["prompt"] == "\ud800" and jobs["a"]["record"] == {"steps_completed": None}
    assert "params cannot be read" in jobs["b"]["error"] and jobs["b"]["record"] is None and jobs["b"]["steering"] == []
    assert jobs["c"]["total"] is None and jobs["c"]["error"] == "boom"
    for key, words in (("d", "unknown field 'colour'"), ("e", "cannot be read"), ("f", "steps must be in [1, 500], got 100000")):
        assert jobs[key]["state"] == "failed" and "not run" in jobs[key]["error"] and words in jobs[key]["error"], jobs[key]
    for job_id in (j["id"] for j in jobs.values()):
        assert client.get(f"/api/jobs/{job_id}").status_code == 200
    with client.websocket_connect("/api/events") as ws:
        assert ws.receive_json()["type"] == "hello"


def test_a_read_only_database_is_a_503_naming_the_file_and_cancel_keeps_the_job(make):
    studio, client = make(start=False)
    queued = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 2}).json()
    writable = studio.store._db
    studio.store._db = sqlite3.connect(f"file:{studio.store.path}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None)
    try:
        error = json_error(client.post("/api/jobs", json={"prompt": PROMPT}), 503)
        assert str(studio.store.path) in error["error"] and "writable" in error["error"]
        assert json_error(client.post(f"/api/jobs/{queued['id']}/cancel"), 503)
        assert client.get(f"/api/jobs/{queued['id']}").json()["state"] == "queued"  # reads still work
        assert studio.stats()["queued"] == 1  # and the queue still holds it
    finally:
        studio.store._db.close()
        studio.store._db = writable
    assert client.post(f"/api/jobs/{queued['id']}/cancel").json()["state"] == "cancelled"


@pytest.mark.parametrize("kind", ["garbage", "foreign"])
def test_a_database_that_cannot_be_opened_names_the_file_and_the_fix(tiny_pipe, sd_folder, tmp_path, kind, run_cli):
    data = tmp_path / kind
    data.mkdir()
    db = data / "studio.sqlite3"
    if kind == "garbage":
        db.write_bytes(b"this is not a database, " * 100)
        words = "move it aside"
    else:
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE jobs (id TEXT, colour TEXT)")
        words = "not a stepdiff studio database"
    with pytest.raises(OSError, match="job history") as info:
        Studio(tiny_pipe, sd_folder, data, limits=limits_for(sd_folder, 500))
    assert str(db) in str(info.value) and words in str(info.value)
    code, out, err = run_cli("serve", "--model", sd_folder, "--data", data, "--port", "0")
    assert code == 2 and str(db) in err and words in err and "TRACEBACK" not in err, err
    db.unlink()  # the fix: the folder's lock was released by the failed start
    Studio(tiny_pipe, sd_folder, data, limits=limits_for(sd_folder, 500), start=False).close()


# ----------------------------------------------------------------------------------------------- a full disk


class _FullDisk:
    """The database connection of a store whose disk is full while ``full`` is set: every write fails as SQLite's
    does ("database or disk is full"); reads work."""

    def __init__(self, db):
        self.db, self.full = db, False

    def execute(self, sql, *args):
        if self.full and sql.lstrip().split()[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_full_disk_pauses_the_queue_which_resumes_with_nothing_lost(make, monkeypatch, tiny_pipe):
    import stepdiff.images

    studio, client = make(start=False)
    studio.storage_retry_max = 0.02
    disk = _FullDisk(studio.store._db)
    studio.store._db = disk
    images_full = threading.Event()
    real_atomic_write = stepdiff.images.atomic_write

    def atomic_write(path, write):  # a full disk: the temporary file gets part of the image, then ENOSPC
        def partial(f):
            f.write(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        return real_atomic_write(path, partial if images_full.is_set() else write)

    monkeypatch.setattr(stepdiff.images.writing, "atomic_write", atomic_write)  # where save_image looks it up
    real_pipeline_for = studio._pipeline_for

    class Filler:  # the job during which the disk fills up: it fails, and its failure cannot be recorded yet
        def steps(self, **kw):
            disk.full = True
            images_full.set()
            raise RuntimeError("the job broke as the disk filled")

    jobs = [client.post("/api/jobs", json={"prompt": PROMPT, "steps": 3, "seed": seed, **extra})
            for seed, extra in ((0, {"scheduler": "ddim"}), (1, {}), (2, {}))]
    assert [r.status_code for r in jobs] == [201, 201, 201]
    filler, first, second = (r.json() for r in jobs)
    monkeypatch.setattr(studio, "_pipeline_for", lambda name, *a, **k: Filler() if name == "ddim" else real_pipeline_for(name, *a, **k))
    studio.start()

    problem = until(lambda: client.get("/api/info").json()["problem"], what="the problem to be reported")
    assert str(studio.store.path) in problem and "free space" in problem
    assert client.get(f"/api/jobs/{filler['id']}").json()["waiting"] == problem
    error = json_error(client.post("/api/jobs", json={"prompt": PROMPT}), 503)  # refused, saying why
    assert "database or disk is full" in error["error"] and str(studio.store.path) in error["error"]
    assert client.get("/api/jobs").status_code == 200  # the gallery still reads

    disk.full = False  # the database has room again; the images folder not yet
    failed = until(lambda: client.get(f"/api/jobs/{filler['id']}").json()["state"] == "failed" and
                   client.get(f"/api/jobs/{filler['id']}").json(), what="the failed job's row")
    assert "the job broke as the disk filled" in failed["error"]
    waiting = until(lambda: client.get(f"/api/jobs/{first['id']}").json().get("waiting"), what="the image to wait")
    assert "No space left on device" in waiting and str(studio.images) in waiting
    assert client.get(f"/api/jobs/{first['id']}").json()["state"] == "running"
    assert not list(studio.images.glob(".*.tmp"))  # a failed write leaves nothing behind

    images_full.clear()  # space returns: the picture computed before is written, and the queue goes on
    for job in (first, second):
        done = until(lambda job=job: client.get(f"/api/jobs/{job['id']}").json()["state"] == "finished" and
                     client.get(f"/api/jobs/{job['id']}").json(), what="the job to finish")
        assert client.get(done["image"]).status_code == 200
    assert client.get("/api/info").json()["problem"] is None
    assert all(t.is_alive() for t in studio._threads)
    monkeypatch.setattr(studio, "_pipeline_for", real_pipeline_for)
    again = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 2}).json()
    until(lambda: client.get(f"/api/jobs/{again['id']}").json()["state"] == "finished", what="a new job")


def test_cancelling_a_job_whose_picture_waits_for_space_drops_it_and_the_queue_goes_on(make, monkeypatch):
    import stepdiff.images

    studio, client = make(start=False)
    studio.storage_retry_max = 0.02
    full = threading.Event()
    full.set()
    real_atomic_write = stepdiff.images.atomic_write

    def atomic_write(path, write):
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_atomic_write(path, write)

    monkeypatch.setattr(stepdiff.images.writing, "atomic_write", atomic_write)  # where save_image looks it up
    stuck, after = (client.post("/api/jobs", json={"prompt": PROMPT, "steps": 2}).json() for _ in range(2))
    studio.start()
    until(lambda: client.get(f"/api/jobs/{stuck['id']}").json().get("waiting"), what="the picture to wait")
    assert client.post(f"/api/jobs/{stuck['id']}/cancel").status_code == 200
    dropped = until(lambda: client.get(f"/api/jobs/{stuck['id']}").json()["state"] == "cancelled" and
                    client.get(f"/api/jobs/{stuck['id']}").json(), what="the job to be cancelled")
    assert dropped["image"] is None and "waited to be written" in dropped["error"] and dropped["steps_completed"] == 2
    until(lambda: client.get(f"/api/jobs/{after['id']}").json().get("waiting"), what="the next job to run")
    full.clear()
    until(lambda: client.get(f"/api/jobs/{after['id']}").json()["state"] == "finished", what="the next job")


def test_event_clients_are_capped(make, monkeypatch):
    import stepdiff.studio.app

    monkeypatch.setattr(stepdiff.studio.app, "MAX_EVENT_CLIENTS", 2)
    studio, client = make(start=False)
    with client.websocket_connect("/api/events") as one, client.websocket_connect("/api/events") as two:
        assert one.receive_json()["type"] == two.receive_json()["type"] == "hello"
        with client.websocket_connect("/api/events") as three:
            closed = three.receive()
            assert closed["type"] == "websocket.close" and closed["code"] == 1013 and "too many" in closed["reason"]
    with client.websocket_connect("/api/events") as again:  # room again once they left
        assert again.receive_json()["type"] == "hello"


def test_a_job_that_breaks_the_worker_costs_that_job_only(make, monkeypatch):
    studio, client = make(start=False)

    def broken(live):
        raise KeyError("a bug in the worker")

    monkeypatch.setattr(studio, "_run", broken)
    job = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 2}).json()
    studio.start()
    failed = until(lambda: client.get(f"/api/jobs/{job['id']}").json()["state"] == "failed" and
                   client.get(f"/api/jobs/{job['id']}").json(), what="the job to fail")
    assert "a bug in the worker" in failed["error"]
    monkeypatch.undo()
    after = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 2}).json()
    until(lambda: client.get(f"/api/jobs/{after['id']}").json()["state"] == "finished", what="the next job")


# ----------------------------------------------------------------------------------------------- one server per folder


def test_a_second_studio_on_the_same_data_is_refused_and_the_first_keeps_its_job(make, tmp_path, run_cli, sd_folder):
    data = tmp_path / "shared"
    studio, client = make(data=data)
    job = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 500}).json()
    until(lambda: client.get(f"/api/jobs/{job['id']}").json()["state"] == "running", what="the job to run")
    with pytest.raises(OSError, match="in use by another stepdiff serve") as info:
        Studio(studio.pipeline, sd_folder, data, limits=studio.limits, start=False)
    assert str(data) in str(info.value) and "another --data folder" in str(info.value)
    code, out, err = run_cli("serve", "--model", sd_folder, "--data", data, "--port", "0")
    assert code == 2 and "in use by another stepdiff serve" in err
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "running"  # not marked interrupted
    client.post(f"/api/jobs/{job['id']}/cancel")


# ----------------------------------------------------------------------------------------------- half-written files


def test_half_written_images_are_removed_at_start_up_and_nothing_else(make, tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    stale = images / TEMP.format("a" * 32)
    stale.write_bytes(b"\x89PNG half")
    kept = [images / "notes.tmp", images / ".hidden.png", images / ("b" * 32 + ".png")]
    for path in kept:
        path.write_bytes(b"mine")
    studio, client = make(start=False)
    assert not stale.exists() and all(p.exists() for p in kept) and studio.removed_temp_files == [stale]


def test_batch_resume_removes_half_written_images(tmp_path, sd_folder):
    from stepdiff.batch import BatchConfig, run_batch
    from stepdiff.batch.rows import BatchDefaults

    (tmp_path / "p.txt").write_text("a red circle\n")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / TEMP.format("0123456789abcdef0123")
    stale.write_bytes(b"\x89PNG half")  # what a run killed during an image write leaves
    keep = out / "notes.tmp"
    keep.write_text("mine")
    result = run_batch(BatchConfig(input=tmp_path / "p.txt", out=out, model=sd_folder, progress=False,
                                   defaults=BatchDefaults(steps=2)))
    assert result.made == 1 and result.removed_temp_files == [stale]
    assert not stale.exists() and keep.exists() and not list(out.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------- slow clients (uvicorn)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--request-timeout", "0"], "--request-timeout must be a number of seconds in [0.1, 3600], got 0.0"),
    (["--request-timeout", "nan"], "--request-timeout must be a number of seconds in [0.1, 3600], got nan"),
    (["--max-connections", "2"], "--max-connections must be in [8, 100000], got 2"),
])
def test_bad_connection_flags(run_cli, tmp_path, argv, needle):
    code, out, err = run_cli("serve", "--data", tmp_path / "d", *argv)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "d").exists()


@pytest.fixture
def live_server(tiny_pipe, sd_folder, tmp_path, monkeypatch):
    """``serve()`` on a free port in a thread (a real uvicorn): yields (port, output); stops it after."""
    import uvicorn

    servers, held = [], []

    class Server(uvicorn.Server):  # serve()'s server, held to stop it
        def __init__(self, config):
            super().__init__(config)
            held.append(self)

    monkeypatch.setattr(uvicorn, "Server", Server)

    def start(out=None, **kw):
        studio = Studio(tiny_pipe, sd_folder, tmp_path / "live", limits=limits_for(sd_folder, 500))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = io.StringIO() if out is None else out
        thread = threading.Thread(target=serve, args=(studio,), kwargs=dict(port=port, out=out, **kw), daemon=True)
        thread.start()
        until(lambda: held and held[-1].started, what="the server to listen")
        servers.append((held[-1], thread))
        return port, out

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)


def test_the_printed_url_already_accepts_connections(live_server):
    """The URL is printed once the socket listens: a client that connects the moment it reads the line waits in the
    backlog until uvicorn accepts, and is not refused (it was, while uvicorn was still starting)."""
    seen = []

    class Out(io.StringIO):
        def write(self, text):
            if text.startswith("stepdiff studio: "):
                port = int(text.rsplit(":", 1)[1].strip().strip("/"))
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                    seen.append("accepted")
                except OSError as e:
                    seen.append(repr(e))
            return super().write(text)

    live_server(out=Out())
    assert seen == ["accepted"]


def _raw(port, data, timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_slow_requests_are_cut_off_with_a_json_408_and_malformed_ones_get_json(live_server, tmp_path):
    (tmp_path / "live" / "images").mkdir(parents=True)
    (tmp_path / "live" / "images" / TEMP.format("c" * 32)).write_bytes(b"half")
    port, out = live_server(request_timeout=0.5)
    assert "removed 1 half-written image file(s)" in out.getvalue()
    started = time.monotonic()
    answer = _raw(port, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # headers never finished
    assert answer.startswith(b"HTTP/1.1 408") and b'"error"' in answer and time.monotonic() - started < 3
    answer = _raw(port, b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"prompt")
    assert answer.startswith(b"HTTP/1.1 408") and b"request body did not arrive" in answer
    answer = _raw(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"application/json" in answer and b'"error"' in answer
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # a byte every 0.2 s: still cut off
        started = time.monotonic()
        with pytest.raises(OSError):
            for _ in range(50):
                s.sendall(b"G")
                time.sleep(0.2)
        assert time.monotonic() - started < 5
    answer = _raw(port, b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"Sec-WebSocket-Key" in answer and b"application/json" in answer
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/api/events", open_timeout=5) as ws:  # an upgraded connection is not cut off
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"
        time.sleep(1.0)
        body = b'{"prompt": "a red circle", "steps": 2}'
        answer = _raw(port, b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert answer.startswith(b"HTTP/1.1 201")
        assert json.loads(ws.recv(timeout=5))["type"] == "queued"
    assert b"200 OK" in _raw(port, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")


_FLOOD = r"""
import json, resource, select, socket, sys, time
port, n, files = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))  # the client's own
started = time.monotonic()
slow = []
for _ in range(n):  # half-sent requests that would hold their connections for ever
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    slow.append(s)
real = socket.create_connection(("127.0.0.1", port), timeout=30)
real.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
try:
    answer = real.recv(100)
except OSError as e:
    answer = repr(e).encode()
seconds = time.monotonic() - started
answers = []
for s in select.select(slow, [], [], 1.0)[0]:  # the slow connections closed to make room, with a JSON 503
    try:
        answers.append(s.recv(1000).decode("latin-1"))
    except OSError:
        pass
print(json.dumps({"answer": answer.decode("latin-1"), "seconds": seconds, "answers": answers}))
"""


def test_a_flood_of_half_sent_requests_cannot_exhaust_the_server(live_server):
    """Under a low open-file limit, as a few hundred slow connections would reach one (uvicorn alone then stops
    accepting: the real request below timed out): the server caps its connections below the limit and closes the
    oldest idle ones, so a real request gets through at once, long before the slow ones time out."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir("/proc/self/fd")) + 400
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        port, out = live_server(request_timeout=20.0)  # its connection cap follows the limit in force
        flood = subprocess.run([sys.executable, "-c", _FLOOD, str(port), "600", str(soft)], capture_output=True,
                               text=True, timeout=120)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert flood.returncode == 0, flood.stderr
    result = json.loads(flood.stdout)
    assert result["answer"].startswith("HTTP/1.1 200"), result["answer"]
    assert result["seconds"] < 10, result["seconds"]  # 600 connections and the request, well inside the timeout
    made_room = [a for a in result["answers"] if a.startswith("HTTP/1.1 503")]
    assert len(made_room) >= 100 and all('"error"' in a and "waited longest" in a for a in made_room), \
        result["answers"][:3]
