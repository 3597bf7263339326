"""Stopping: public stop(), CancelToken from another thread, clean early-stop images, stop callbacks, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import stepdiff
from stepdiff.callbacks import NaNGuard, StopAtStep, StopOnConvergence, Timeout

from .conftest import gen


def stop_at(i_stop, how="stop"):
    def cb(p, i, t, kw):
        if i == i_stop:
            if how == "stop":
                p.stop("user said so")
            else:
                p._interrupt = True
        return kw

    return cb


def test_public_stop_from_callback(pipe, count_calls):
    calls = count_calls(pipe)
    out = pipe("a cat", num_inference_steps=6, generator=gen(), callback_on_step_end=stop_at(2))
    assert out.interrupted and out.steps_completed == 3 and out.stop_reason == "user said so"
    assert out.record.stop_reason == "user said so" and calls.calls == 3
    out = pipe("a cat", num_inference_steps=3, generator=gen())
    assert not out.interrupted and out.stop_reason == "completed"


def test_classic_interrupt_reason(sd_pipe):
    out = sd_pipe("a cat", num_inference_steps=6, generator=gen(), callback_on_step_end=stop_at(1, "classic"))
    assert out.stop_reason == "interrupted" and out.steps_completed == 2


def _record_denoised_and_latents(store):
    def cb(p, i, t, kw):
        store["denoised"], store["latents"] = kw["denoised"].clone(), kw["latents"].clone()
        return kw

    return cb


@pytest.mark.parametrize("interrupt_output", ["denoised", "latents"])
def test_interrupted_image_is_decoded_from_x0_by_default(sd_pipe, interrupt_output):
    store = {}
    out = sd_pipe("a cat", num_inference_steps=8, generator=gen(), output_type="pt", interrupt_output=interrupt_output,
                  callback_on_step_end=[_record_denoised_and_latents(store), stop_at(2)],
                  callback_on_step_end_tensor_inputs=["latents", "denoised"])
    expected = sd_pipe.image_processor.postprocess(sd_pipe.decode_latents(store[interrupt_output]), output_type="pt")
    assert torch.allclose(out.images, expected)


def test_latent_output_of_interrupted_run_is_current_latents(sd_pipe):
    store = {}
    out = sd_pipe("a cat", num_inference_steps=8, generator=gen(), output_type="latent",
                  callback_on_step_end=[_record_denoised_and_latents(store), stop_at(2)],
                  callback_on_step_end_tensor_inputs=["latents", "denoised"])
    assert torch.equal(out.images, store["latents"])


def test_bad_interrupt_output(sd_pipe):
    with pytest.raises(ValueError, match="interrupt_output must be one of"):
        sd_pipe("a cat", interrupt_output="noise")


# ------------------------------------------------------------------ cancel token


def test_cancel_from_another_thread_mid_call(sd_pipe, count_calls):
    """The cancel lands while a model call is in flight; at most that one call follows it."""
    calls = count_calls(sd_pipe)
    token = stepdiff.CancelToken()
    at_cancel = {}

    def in_flight(module, args, kwargs):
        if len(calls.rows) == 3:
            thread = threading.Thread(target=lambda: (at_cancel.setdefault("calls", len(calls.rows)), token.cancel()))
            thread.start()
            thread.join()

    handle = sd_pipe.unet.register_forward_pre_hook(in_flight, with_kwargs=True)
    try:
        out = sd_pipe("a cat", num_inference_steps=20, generator=gen(), cancel=token)
    finally:
        handle.remove()
    assert out.interrupted and out.stop_reason == "cancelled"
    assert calls.calls - at_cancel["calls"] <= 1
    assert out.steps_completed == 3


def test_cancel_from_a_concurrent_thread(sd_pipe, count_calls):
    calls = count_calls(sd_pipe)
    token = stepdiff.CancelToken()
    seen = {}

    def canceller():
        while len(calls.rows) < 2:
            time.sleep(0.001)
        seen["calls"] = len(calls.rows)
        token.cancel("user pressed stop")

    thread = threading.Thread(target=canceller)
    thread.start()
    out = sd_pipe("a cat", num_inference_steps=500, generator=gen(), cancel=token)
    thread.join()
    assert out.interrupted and out.stop_reason == "user pressed stop"
    assert calls.calls - seen["calls"] <= 1


def test_cancelled_token_needs_reset(sd_pipe):
    token = stepdiff.CancelToken()
    token.cancel()
    assert token.cancelled
    with pytest.raises(ValueError, match="already cancelled; call token.reset"):
        sd_pipe("a cat", num_inference_steps=2, cancel=token)
    token.reset()
    assert not token.cancelled
    out = sd_pipe("a cat", num_inference_steps=2, cancel=token)
    assert not out.interrupted


def test_cancel_must_be_a_token(sd_pipe):
    with pytest.raises(TypeError, match="cancel must be a stepdiff.CancelToken"):
        sd_pipe("a cat", num_inference_steps=2, cancel=threading.Event())


# ------------------------------------------------------------------ stopping callbacks


@pytest.mark.parametrize("kwargs,completed", [(dict(cutoff_step_index=3), 4), (dict(cutoff_step_ratio=0.5), 6)])
def test_stop_at_step(sd_pipe, kwargs, completed):
    out = sd_pipe("a cat", num_inference_steps=10, generator=gen(), callback_on_step_end=StopAtStep(**kwargs))
    assert out.steps_completed == completed and out.stop_reason == f"stopped at step {completed - 1}"


def test_stop_on_convergence(sd_pipe):
    loose = StopOnConvergence(tolerance=100.0, patience=2)
    out = sd_pipe("a cat", num_inference_steps=10, generator=gen(), callback_on_step_end=loose)
    assert out.steps_completed == 3 and out.stop_reason.startswith("converged")
    strict = StopOnConvergence(tolerance=1e-12, patience=2)
    out = sd_pipe("a cat", num_inference_steps=10, generator=gen(), callback_on_step_end=strict)
    assert not out.interrupted and len(strict.changes) == 9 and all(c > 0 for c in strict.changes)


def test_stop_on_convergence_respects_min_steps(sd_pipe):
    out = sd_pipe("a cat", num_inference_steps=10, generator=gen(),
                  callback_on_step_end=StopOnConvergence(tolerance=100.0, patience=1, min_steps=6))
    assert out.steps_completed == 6


def test_timeout_keeps_the_image(sd_pipe):
    out = sd_pipe("a cat", num_inference_steps=10, generator=gen(), callback_on_step_end=Timeout(1e-9), output_type="np")
    assert out.steps_completed == 1 and out.stop_reason.startswith("timeout")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_nan_guard_names_the_step(sd_folder):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"model output became NaN or inf at step 0"):
        pipe("a cat", num_inference_steps=4)  # the default check, before the scheduler step
    pipe.check_finite = False  # NaNGuard still works on its own, from the callback
    with pytest.raises(FloatingPointError, match=r"latents became NaN or inf at step 0"):
        pipe("a cat", num_inference_steps=4, callback_on_step_end=NaNGuard())


@pytest.mark.parametrize("make,message", [
    (lambda: StopOnConvergence(tolerance=0), "tolerance must be a finite number > 0"),
    (lambda: StopOnConvergence(tolerance=float("nan")), "tolerance must be a finite number > 0"),
    (lambda: StopOnConvergence(patience=0), "patience must be an int >= 1"),
    (lambda: StopOnConvergence(min_steps=-1), "min_steps must be an int >= 0"),
    (lambda: Timeout(-1), "seconds must be a finite number > 0"),
    (lambda: Timeout("5"), "seconds must be a finite number > 0"),
    (lambda: StopAtStep(cutoff_step_index=-2), "cutoff_step_index must be a non-negative int"),
])
def test_bad_stop_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ------------------------------------------------------------------ loading


def test_truncated_safetensors(sd_folder, tmp_path):
    import shutil

    folder = shutil.copytree(sd_folder, tmp_path / "m")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=r"diffusion_pytorch_model.safetensors' is truncated or corrupt"):
        stepdiff.AutoPipelineForText2Image.from_pretrained(folder)


def test_pickle_checkpoint_refused_by_default(sd_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = shutil.copytree(sd_folder, tmp_path / "m")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(OSError, match=r"diffusion_pytorch_model.bin' is a pickle checkpoint.*allow_pickle=True"):
        stepdiff.AutoPipelineForText2Image.from_pretrained(folder)
    pipe = stepdiff.AutoPipelineForText2Image.from_pretrained(folder, allow_pickle=True)
    assert type(pipe) is stepdiff.StableDiffusionPipeline


def test_missing_component_folder(sd_folder, tmp_path):
    import shutil

    folder = shutil.copytree(sd_folder, tmp_path / "m")
    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match="lists component 'vae' in model_index.json but has no vae/ folder"):
        stepdiff.StableDiffusionPipeline.from_pretrained(folder)


# ------------------------------------------------------------------ Ctrl-C in the CLI


def _start_cli(sd_folder, out, steps=4000):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "stepdiff.cli", "generate", "a cat", "--model", str(sd_folder), "--steps", str(steps),
         "--output", str(out), "--scheduler", "euler"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _wait_for_steps(proc):
    import re

    buf = ""
    while not re.search(r"\b[1-9]\d*/4000", buf):  # the progress bar shows at least one finished step
        ch = proc.stderr.read(1)
        if not ch:
            raise AssertionError(f"CLI ended early: {buf}")
        buf += ch


def test_first_ctrl_c_stops_gracefully_and_keeps_the_image(sd_folder, tmp_path):
    out = tmp_path / "a.png"
    proc = _start_cli(sd_folder, out)
    _wait_for_steps(proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert stdout.strip() == str(out)
    meta = json.loads(Image.open(out).text["stepdiff"])
    assert meta["interrupted"] is True and meta["stop_reason"] == "interrupted by Ctrl-C"
    assert 0 < meta["steps_completed"] < 4000
    assert f"Interrupted at step: {meta['steps_completed']}" in Image.open(out).text["parameters"]
    # the picture is finished in up to 3 more steps down to t=0 (the CLI's default --stop-output), counted apart;
    # fewer here: 4000 Euler steps of a 1000-step model repeat one timestep, so one noise level is left
    record = meta["record"]
    assert record["stop_output"] == "finish" and 1 <= record["finish_steps"] <= 3
    assert record["finish_model_calls"] == record["finish_steps"] and record["model_calls"] == meta["steps_completed"]
    assert f"Stop output: finish ({record['finish_steps']} step" in Image.open(out).text["parameters"]
    assert "then finishing the picture in 3 steps at most (Ctrl-C again to abort)" in stderr


def test_second_ctrl_c_aborts_leaving_no_files(sd_folder, tmp_path, monkeypatch, capsys):
    """Two real SIGINTs, sent from inside the third model call, in this process: deterministic."""
    from diffusers import UNet2DConditionModel

    from stepdiff.cli import main

    forward = UNet2DConditionModel.forward
    calls = []

    def forward_with_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # first: graceful stop requested
            os.kill(os.getpid(), signal.SIGINT)  # second: abort
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward_with_ctrl_c)
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "a cat", "--model", str(sd_folder), "--steps", "50", "--output", str(tmp_path / "a.png")])
    assert code == 130
    assert "aborted; nothing written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_second_ctrl_c_during_the_finishing_steps_aborts(sd_folder, tmp_path, monkeypatch, capsys):
    """First Ctrl-C in the third model call: the run stops and its picture is being finished; a second Ctrl-C
    in the second finishing call aborts, writing nothing."""
    from diffusers import UNet2DConditionModel

    from stepdiff.cli import main

    forward = UNet2DConditionModel.forward
    calls = []

    def forward_with_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) in (3, 5):  # 3: a step of the run; 5: the second finishing step
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward_with_ctrl_c)
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "a cat", "--model", str(sd_folder), "--steps", "50", "--output", str(tmp_path / "a.png")])
    assert code == 130 and len(calls) == 5
    assert "aborted; nothing written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags,stop_output,finish_calls", [
    ([], "denoised", 0),  # --stop-at keeps its x0 picture unless told
    (["--stop-output", "finish:2"], "finish", 2),
    (["--stop-output", "latents"], "latents", 0),
])
def test_stop_output_flag(run_cli, sd_folder, tmp_path, flags, stop_output, finish_calls):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "8", "--stop-at", "2",
                           "--output", tmp_path / "a.png", *flags)
    assert code == 0, err
    record = json.loads(Image.open(tmp_path / "a.png").text["stepdiff"])["record"]
    assert record["stop_output"] == stop_output and record["finish_model_calls"] == finish_calls
    assert record["model_calls"] == 3


@pytest.mark.parametrize("value", ["finish:0", "finsh", "finish:two"])
def test_bad_stop_output_flag_fails_before_loading(run_cli, sd_folder, monkeypatch, value, loader):
    def loads(*a, **k):
        raise AssertionError("the model must not load")

    loader(loads)
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--stop-output", value)
    assert code == 2
    assert f"--stop-output must be one of 'denoised', 'latents', 'finish' (3 finishing steps) or 'finish:N' " \
           f"(N finishing steps, an int >= 1), got {value!r}" in err
