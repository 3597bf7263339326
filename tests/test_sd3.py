"""SD3 on the shared loop: parity with diffusers, callbacks, CFG cutoff for any batch, schedules, x0."""

import diffusers
import numpy as np
import pytest
import torch

import stepdiff
from stepdiff.callbacks import CFGCutoffCallback, GuidanceIntervalCallback, SD3CFGCutoffCallback
from stepdiff.loop import estimate_x0

from .conftest import gen

CASES = {
    "batch1-cfg": dict(prompt="a red car", guidance_scale=7.0),
    "batch2-cfg": dict(prompt=["a cat", "a dog"], guidance_scale=5.0, negative_prompt=["red", "blue"]),
    "batch1-no-cfg": dict(prompt="a bear", guidance_scale=1.0),
    "batch2-no-cfg-per-prompt2": dict(prompt=["a cat", "a road"], guidance_scale=1.0, num_images_per_prompt=2),
}


@pytest.fixture(scope="module")
def sd3_pair(sd3_folder):
    ours = stepdiff.StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize("case", CASES)
def test_parity_with_diffusers(sd3_pair, case):
    ours, theirs = sd3_pair
    a = ours(**CASES[case], num_inference_steps=6, generator=gen(4), output_type="np").images
    b = theirs(**CASES[case], num_inference_steps=6, generator=gen(4), output_type="np").images
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("case", ["batch1-cfg", "batch2-cfg", "batch1-no-cfg"])
def test_parity_without_t5(sd3_folder, case):
    ours = stepdiff.StableDiffusion3Pipeline.from_pretrained(sd3_folder, text_encoder_3=None, tokenizer_3=None)
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(sd3_folder, text_encoder_3=None, tokenizer_3=None)
    assert ours.text_encoder_3 is None
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    a = ours(**CASES[case], num_inference_steps=5, generator=gen(1), output_type="np").images
    b = theirs(**CASES[case], num_inference_steps=5, generator=gen(1), output_type="np").images
    assert np.abs(a - b).max() <= 1e-4


def test_auto_pipeline_recognises_sd3(sd3_folder, sd_folder):
    assert type(stepdiff.AutoPipelineForText2Image.from_pretrained(sd3_folder)) is stepdiff.StableDiffusion3Pipeline
    with pytest.raises(ValueError, match="use stepdiff.StableDiffusion3Pipeline"):
        stepdiff.StableDiffusionXLPipeline.from_pretrained(sd3_folder)
    with pytest.raises(ValueError, match="use stepdiff.StableDiffusionPipeline"):
        stepdiff.StableDiffusion3Pipeline.from_pretrained(sd_folder)


def test_tensor_inputs_arrive(sd3_pipe):
    seen = []
    names = ["latents", "prompt_embeds", "pooled_prompt_embeds", "denoised"]
    sd3_pipe("a cat", num_inference_steps=3, generator=gen(),
             callback_on_step_end=lambda p, i, t, kw: seen.append(sorted(kw)) or kw,
             callback_on_step_end_tensor_inputs=names)
    assert seen == [sorted(names)] * 3


@pytest.mark.parametrize("cb", [
    SD3CFGCutoffCallback(cutoff_step_index=1),
    CFGCutoffCallback(cutoff_step_index=1),
    diffusers.callbacks.SD3CFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1),
], ids=["ours", "generic", "classic"])
def test_cfg_cutoff_any_batch(sd3_pipe, count_calls, cb):
    calls = count_calls(sd3_pipe)
    out = sd3_pipe(["a cat", "a dog", "a car"], num_images_per_prompt=2, num_inference_steps=5, generator=gen(),
                   callback_on_step_end=cb, output_type="np")
    assert out.images.shape[0] == 6 and calls.rows == [12, 12, 6, 6, 6]


def test_cutoff_matches_classic_at_batch_1(sd3_pair):
    ours, theirs = sd3_pair
    kwargs = dict(prompt="a sports car", guidance_scale=6.0, num_inference_steps=6, output_type="np")
    a = ours(**kwargs, generator=gen(2), callback_on_step_end=SD3CFGCutoffCallback(cutoff_step_ratio=0.4)).images
    b = theirs(**kwargs, generator=gen(2),
               callback_on_step_end=diffusers.callbacks.SD3CFGCutoffCallback(cutoff_step_ratio=0.4)).images
    assert np.abs(a - b).max() <= 1e-4


def test_guidance_interval_on_sd3(sd3_pipe, count_calls):
    calls = count_calls(sd3_pipe)
    out = sd3_pipe("a cat", num_inference_steps=10, generator=gen(), guidance_scale=6.0,
                   callback_on_step_end=GuidanceIntervalCallback(start_ratio=0.2, end_ratio=0.8))
    assert calls.rows == [1, 1, 2, 2, 2, 2, 2, 2, 1, 1] == out.record.rows_per_step


def test_flow_matching_x0_is_analytic():
    scheduler = stepdiff.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen(1)), torch.randn(2, 4, 8, 8, generator=gen(2))
    for i in (0, 3, 7):
        sigma = scheduler.sigmas[i]
        x_t = (1 - sigma) * x0 + sigma * noise  # rectified flow
        velocity = noise - x0
        assert torch.allclose(estimate_x0(scheduler, i, scheduler.timesteps[i], x_t, velocity, flow_matching=True), x0, atol=1e-5)


def test_denoised_converges_to_final_latents(sd3_pipe):
    seen = []
    out = sd3_pipe("a cat", num_inference_steps=6, generator=gen(), output_type="latent",
                   callback_on_step_end=lambda p, i, t, kw: seen.append(kw["denoised"]) or kw,
                   callback_on_step_end_tensor_inputs=["denoised"])
    # The last step lands on sigma = 0, where the x0 estimate is the result itself.
    assert torch.allclose(seen[-1], out.images, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=30), "height must be a multiple of"),
    (dict(max_sequence_length=0), r"max_sequence_length must be an int in \[1, 512\]"),
    (dict(prompt_3=["a", "b"]), "prompt_3 must match the length of prompt"),
])
def test_sd3_bad_input(sd3_pipe, count_calls, kwargs, message):
    calls = count_calls(sd3_pipe)
    with pytest.raises(ValueError, match=message):
        sd3_pipe(**{"prompt": "a cat", "num_inference_steps": 2, **kwargs})
    assert calls.calls == 0


def test_sd3_preview_uses_channel_matched_table(sd3_pipe):
    from stepdiff.preview import PreviewCallback

    cb = PreviewCallback()
    sd3_pipe("a cat", num_inference_steps=3, generator=gen(), callback_on_step_end=cb)
    assert len(cb.frames) == 3
