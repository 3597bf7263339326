"""The x0 estimate ("denoised") against each scheduler's own x0, analytically."""

import pytest
import torch

import stepdiff
from stepdiff.loop import estimate_x0

BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
REPORTING = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler", "DDPMScheduler",
             "LMSDiscreteScheduler", "HeunDiscreteScheduler"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", REPORTING)
def test_formula_matches_pred_original_sample(name, prediction_type):
    # SD configs turn sample clipping off; with it on, the reported x0 is clipped to [-1, 1].
    scheduler = getattr(stepdiff, name).from_config({**BASE, "prediction_type": prediction_type, "clip_sample": False})
    scheduler.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(latents, t)
        output = torch.randn(latents.shape, generator=g)
        ours = estimate_x0(scheduler, i, t, x_in, output)
        step = scheduler.step(output, t, latents, generator=g) if "generator" in scheduler.step.__code__.co_varnames \
            else scheduler.step(output, t, latents)
        assert torch.allclose(ours, step.pred_original_sample, atol=1e-4, rtol=1e-4), (name, i)
        latents = step.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"])
@pytest.mark.parametrize("karras", [False, True])
def test_formula_matches_multistep_data_prediction(name, prediction_type, karras):
    """These schedulers report no x0, but convert the model output to one internally."""
    scheduler = getattr(stepdiff, name)(**BASE, prediction_type=prediction_type, use_karras_sigmas=karras)
    scheduler.set_timesteps(6)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        output = torch.randn(latents.shape, generator=g)
        if scheduler.step_index is None:
            scheduler._init_step_index(t)
        theirs = scheduler.convert_model_output(output, sample=latents)
        if name == "DEISMultistepScheduler":  # DEIS converts to x0 then back to eps; recover its x0
            sigma = scheduler.sigmas[scheduler.step_index]
            alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)
            theirs = (latents - sigma_t * theirs) / alpha_t
        ours = estimate_x0(scheduler, i, t, scheduler.scale_model_input(latents, t), output)
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (name, i)
        latents = scheduler.step(output, t, latents).prev_sample


def test_pndm_uses_alphas_cumprod():
    scheduler = stepdiff.PNDMScheduler(**BASE, skip_prk_steps=True)
    scheduler.set_timesteps(5)
    t = scheduler.timesteps[2]
    x0 = torch.randn(1, 4, 8, 8)
    eps = torch.randn(1, 4, 8, 8)
    x_t = scheduler.add_noise(x0, eps, t.reshape(1))
    assert torch.allclose(estimate_x0(scheduler, 2, t, x_t, eps), x0, atol=1e-4)


def test_denoised_in_loop_equals_scheduler_report(sd_pipe):
    sd_pipe.scheduler = stepdiff.EulerDiscreteScheduler.from_config(sd_pipe.scheduler.config)
    seen, reported = [], []
    original_step = sd_pipe.scheduler.step

    def spy_step(*args, **kwargs):
        out = original_step(*args, **kwargs)
        reported.append(out.pred_original_sample.clone())
        return out

    sd_pipe.scheduler.step = spy_step

    def record(p, i, t, kw):
        seen.append(kw["denoised"].clone())
        return kw

    sd_pipe("a cat", num_inference_steps=4, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["denoised"])
    assert len(seen) == 4 and all(torch.equal(a, b) for a, b in zip(seen, reported))
