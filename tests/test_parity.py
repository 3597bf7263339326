"""Parity with the classic library on identical weights, prompt, seed and scheduler (float32, CPU)."""

import diffusers
import numpy as np
import pytest

import stepdiff
from stepdiff.callbacks import SDXLCFGCutoffCallback

from .conftest import gen

SCHEDULERS = {
    "euler": lambda c: diffusers.EulerDiscreteScheduler.from_config(c),
    "euler-a": lambda c: diffusers.EulerAncestralDiscreteScheduler.from_config(c),
    "ddim": lambda c: diffusers.DDIMScheduler.from_config(c),
    "dpm++2m-karras": lambda c: diffusers.DPMSolverMultistepScheduler.from_config(c, use_karras_sigmas=True),
    "unipc": lambda c: diffusers.UniPCMultistepScheduler.from_config(c),
}
CASES = {
    "batch1": dict(prompt="a photo of a cat", guidance_scale=7.0),
    "batch2": dict(prompt=["a photo of a cat", "a red car"], guidance_scale=7.0, negative_prompt=["blue", "dog"]),
    "per-prompt2": dict(prompt="a red car on the road", guidance_scale=5.0, num_images_per_prompt=2),
    "no-guidance": dict(prompt=["a dog", "a bear"], guidance_scale=1.0),
}

_cache: dict = {}


def _pipes(family, sd_folder, sdxl_folder):
    if family not in _cache:
        folder = sd_folder if family == "sd" else sdxl_folder
        ours = (stepdiff.StableDiffusionPipeline if family == "sd" else stepdiff.StableDiffusionXLPipeline).from_pretrained(folder)
        theirs = (diffusers.StableDiffusionPipeline if family == "sd" else diffusers.StableDiffusionXLPipeline).from_pretrained(folder)
        for p in (ours, theirs):
            p.set_progress_bar_config(disable=True)
        _cache[family] = (ours, theirs)
    return _cache[family]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_matches_diffusers(family, scheduler, case, sd_folder, sdxl_folder):
    ours, theirs = _pipes(family, sd_folder, sdxl_folder)
    for p in (ours, theirs):
        p.scheduler = SCHEDULERS[scheduler](p.scheduler.config)
    kwargs = dict(CASES[case], num_inference_steps=6, output_type="np")
    a = ours(**kwargs, generator=gen(3)).images
    b = theirs(**kwargs, generator=gen(3)).images
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_latent_output_matches_diffusers(family, sd_folder, sdxl_folder):
    ours, theirs = _pipes(family, sd_folder, sdxl_folder)
    for p in (ours, theirs):
        p.scheduler = diffusers.EulerDiscreteScheduler.from_config(p.scheduler.config)
    a = ours("a cat", num_inference_steps=5, output_type="latent", generator=gen(1)).images
    b = theirs("a cat", num_inference_steps=5, output_type="latent", generator=gen(1)).images
    assert (a - b).abs().max() <= 1e-4  # the parity tolerance; latents here reach |20|


def test_v_prediction_matches_diffusers(sd_v_folder):
    ours = stepdiff.StableDiffusionPipeline.from_pretrained(sd_v_folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(sd_v_folder)
    kwargs = dict(prompt="a photo of a dog", num_inference_steps=5, output_type="np", guidance_scale=6.0, guidance_rescale=0.7)
    a = ours(**kwargs, generator=gen(0)).images
    b = theirs(**kwargs, generator=gen(0)).images
    assert np.abs(a - b).max() <= 1e-4


def test_cfg_cutoff_matches_classic_at_batch_1(sd_folder, sdxl_folder):
    ours, theirs = _pipes("sdxl", sd_folder, sdxl_folder)
    for p in (ours, theirs):
        p.scheduler = diffusers.EulerDiscreteScheduler.from_config(p.scheduler.config)
    kwargs = dict(prompt="a sports car", negative_prompt="", guidance_scale=6.5, num_inference_steps=8, output_type="np")
    a = ours(**kwargs, generator=gen(2), callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.4)).images
    b = theirs(
        **kwargs, generator=gen(2), callback_on_step_end=diffusers.callbacks.SDXLCFGCutoffCallback(cutoff_step_ratio=0.4)
    ).images
    assert np.abs(a - b).max() <= 1e-4
