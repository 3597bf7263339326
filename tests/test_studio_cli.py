"""``stepdiff serve`` flags: bad values refused before the model loads; off loopback, a token is generated and required."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest


@pytest.mark.parametrize(("argv", "needle"), [
    (["--workers", "0"], "--workers must be in [1, 64], got 0"),
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--queue-size", "0"], "--queue-size must be in [1, 100000], got 0"),
    (["--max-steps", "0"], "--max-steps must be in [1, 10000], got 0"),
    (["--token", "short"], "--token must be 8 to 256 characters"),
    (["--threads", "0"], "--threads must be in [1, 1024], got 0"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_bad_serve_flags(run_cli, tmp_path, argv, needle):
    code, out, err = run_cli("serve", "--data", tmp_path / "d", *argv)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "d").exists()  # nothing created


def test_data_must_be_a_folder(run_cli, tmp_path):
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli("serve", "--data", tmp_path / "file")
    assert code == 2 and "--data" in err and "not a folder" in err


def test_model_must_be_a_model_folder(run_cli, tmp_path):
    code, out, err = run_cli("serve", "--model", tmp_path, "--data", tmp_path / "d")
    assert code == 2 and "--model" in err


def test_off_loopback_a_token_is_generated_and_required(sd_folder, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepdiff.cli", "serve", "--host", "0.0.0.0", "--port", "0", "--model", str(sd_folder),
         "--data", str(tmp_path / "d"), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(line.startswith("stepdiff serve: token") for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        url = next(line.split(": ", 1)[1].strip() for line in lines if line.startswith("stepdiff studio: "))
        token = url.split("?token=")[1]
        assert len(token) >= 24
        base = url.split("?")[0].replace("0.0.0.0", "127.0.0.1")
        assert httpx.get(base + "api/info").status_code == 401
        assert httpx.get(base + "api/info", headers={"authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(base).status_code == 200  # the page; it takes the token from its URL
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stepdiff serve: stopped" in out
