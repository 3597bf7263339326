"""Numerical safety and engine-side bad input (issue 16): NaN/inf stops the run with the step and the likely cause
instead of a black image; guidance values set from callbacks are checked; embeddings of the wrong width, a model
folder whose config does not fit its weights, and a malformed ``denoised`` return all fail clearly."""

import json
import shutil

import pytest
import torch

import stepdiff

from .conftest import gen


def _call(pipe, **kw):
    kw = {"prompt": "a photo of a cat", "num_inference_steps": 3, "output_type": "np", "generator": gen(0), **kw}
    return pipe(**kw)


def test_nan_weights_stop_the_run_naming_the_step_and_cause(sd_pipe, count_calls):
    with torch.no_grad():
        next(sd_pipe.unet.parameters()).fill_(float("nan"))
    calls = count_calls(sd_pipe)
    with pytest.raises(FloatingPointError, match=r"model output became NaN or inf at step 0 .*broken model weights"):
        _call(sd_pipe)
    assert calls.calls == 1  # stopped at once, nothing decoded


def test_nan_latents_from_a_callback_are_caught_at_the_next_step(sd_pipe):
    def poison(p, i, t, kw):
        return {"latents": torch.full_like(kw["latents"], float("inf"))} if i == 0 else kw

    with pytest.raises(FloatingPointError, match="at step 1"):
        _call(sd_pipe, callback_on_step_end=poison)


def test_the_check_can_be_turned_off(sd_pipe):
    with torch.no_grad():
        next(sd_pipe.unet.parameters()).fill_(float("nan"))
    sd_pipe.check_finite = False
    out = _call(sd_pipe)
    assert out.record.steps_completed == 3  # the old behaviour, on request


@pytest.mark.parametrize("value,error,message", [
    ("7", TypeError, r"guidance_scale must be a real number, got '7' \(str\)"),
    (float("inf"), ValueError, r"guidance_scale must be a finite number in \[0, 1000\], got inf"),
    (float("nan"), ValueError, r"guidance_scale must be a finite number in \[0, 1000\], got nan"),
    (1e30, ValueError, r"got 1e\+30"),
])
def test_guidance_set_inside_a_callback_is_checked(sd_pipe, value, error, message):
    def steer(p, i, t, kw):
        p._guidance_scale = value
        return kw

    with pytest.raises(error, match=message + r".*at step 0"):
        _call(sd_pipe, callback_on_step_end=steer)


def test_malformed_denoised_return_raises(sd_pipe):
    with pytest.raises(ValueError, match=r"'denoised' with shape \(3,\) at step 0"):
        _call(sd_pipe, callback_on_step_end=lambda p, i, t, kw: {"denoised": torch.zeros(3)},
              callback_on_step_end_tensor_inputs=["denoised"])


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_prompt_embeds_of_the_wrong_width(request, family, count_calls):
    pipe = request.getfixturevalue(f"{family}_pipe")
    calls = count_calls(pipe)
    kw = {"pooled_prompt_embeds": torch.zeros(1, 64)} if family != "sd" else {}
    with pytest.raises(ValueError, match=r"prompt_embeds has width 7 .* takes \d+"):
        pipe(prompt_embeds=torch.zeros(1, 77, 7), num_inference_steps=2, **kw)
    assert calls.calls == 0


@pytest.mark.parametrize("family,clip_skip,limit", [("sd", 3, 2), ("sdxl", 2, 1), ("sd3", 2, 1)])
def test_clip_skip_beyond_the_encoder_depth(request, family, clip_skip, limit):
    pipe = request.getfixturevalue(f"{family}_pipe")
    with pytest.raises(ValueError, match=rf"clip_skip={clip_skip} is larger .* \[0, {limit}\]"):
        _call(pipe, clip_skip=clip_skip)


def test_a_config_that_does_not_fit_its_weights_names_the_config(sd_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sd_folder, bad)
    config = json.loads((bad / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (bad / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unet/config.json' does not match the weights in unet/"):
        stepdiff.StableDiffusionPipeline.from_pretrained(bad)
