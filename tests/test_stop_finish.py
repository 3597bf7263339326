"""interrupt_output="finish": an interrupted run runs a few more steps on a re-timed schedule down to t = 0.

What is checked: the record (stop_output, the finishing steps and their model calls, apart from the run's);
that finishing every step the run had left reproduces the completed run (so the schedule, the timesteps,
the latent space, img2img's offsets, inpainting's known region and the guidance are the run's own); a stop
at the last step is a completed run; batch 2 = single runs; every family and kind; callbacks are not
called again; bad values fail before any model call.
"""

import diffusers
import numpy as np
import pytest
import torch

import stepdiff
from stepdiff.callbacks import CFGCutoffCallback, StopAtStep
from stepdiff.finishing import finish_plan

from .conftest import _load, control_image, gen, test_image

IMAGE, MASK = test_image()
STEPS = 6


def _euler(pipe):
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def _ddim(pipe):
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe


# (id, pipeline class, folder fixture, extra call arguments, a scheduler to put on it)
KINDS = [
    ("sd", stepdiff.StableDiffusionPipeline, "sd_folder", {}, None),
    ("sdxl", stepdiff.StableDiffusionXLPipeline, "sdxl_folder", {}, None),
    ("sd3", stepdiff.StableDiffusion3Pipeline, "sd3_folder", {}, None),
    ("sd-img2img", stepdiff.StableDiffusionImg2ImgPipeline, "sd_folder", dict(image=IMAGE, strength=0.7), None),
    ("sdxl-img2img", stepdiff.StableDiffusionXLImg2ImgPipeline, "sdxl_folder", dict(image=IMAGE, strength=0.6), None),
    ("sd3-img2img", stepdiff.StableDiffusion3Img2ImgPipeline, "sd3_folder", dict(image=IMAGE, strength=0.7), None),
    ("sd-inpaint-4ch", stepdiff.StableDiffusionInpaintPipeline, "sd_folder", dict(image=IMAGE, mask_image=MASK), None),
    ("sd-inpaint-9ch", stepdiff.StableDiffusionInpaintPipeline, "sd_inpaint_folder",
     dict(image=IMAGE, mask_image=MASK, strength=0.8), None),
    ("sdxl-inpaint-4ch", stepdiff.StableDiffusionXLInpaintPipeline, "sdxl_folder", dict(image=IMAGE, mask_image=MASK),
     None),
    ("sd-controlnet", stepdiff.StableDiffusionControlNetPipeline, "sd_folder", dict(image=control_image()),
     "sd_controlnet_folder"),
    ("sd-ddim", stepdiff.StableDiffusionPipeline, "sd_folder", {}, _ddim),
    ("sd-inpaint-4ch-ddim", stepdiff.StableDiffusionInpaintPipeline, "sd_folder", dict(image=IMAGE, mask_image=MASK),
     _ddim),
]


def _pipe(request, cls, fixture, extra):
    folder = request.getfixturevalue(fixture)
    if cls is stepdiff.StableDiffusionControlNetPipeline:
        net = diffusers.ControlNetModel.from_pretrained(request.getfixturevalue("sd_controlnet_folder"))
        pipe = cls.from_pretrained(folder, controlnet=net)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return _load(cls, folder)


def _case(request, case):
    _, cls, fixture, extra, how = next(k for k in KINDS if k[0] == case)
    pipe = _pipe(request, cls, fixture, extra)
    if callable(how):
        how(pipe)
    return pipe, extra


def _call(pipe, extra, prompt="a photo of a cat", seed=0, **kw):
    kw = {"num_inference_steps": STEPS, "generator": gen(seed), **kw}
    return pipe(prompt, **extra, **kw)


@pytest.mark.parametrize("case", [k[0] for k in KINDS])
def test_finish_gives_a_finite_image_recorded_as_finish(request, case, count_calls):
    pipe, extra = _case(request, case)
    calls = count_calls(pipe)
    out = _call(pipe, extra, output_type="np", interrupt_output="finish",
                callback_on_step_end=StopAtStep(cutoff_step_index=1))
    r = out.record
    assert out.interrupted and out.steps_completed == 2 and r.stop_reason == "stopped at step 1"
    assert np.isfinite(out.images).all() and out.images.std() > 0
    n = min(3, r.steps_total - 2)  # 3 by default, never more than the run had left
    assert r.stop_output == "finish" and r.finish_steps == n
    assert r.model_calls == 2 and r.finish_model_calls == n  # the run's calls and the finishing ones, apart
    assert r.finish_model_rows == n * 2  # guidance on: both sides, as at the stop
    assert calls.calls == r.model_calls + r.finish_model_calls
    d = r.to_dict()
    assert (d["stop_output"], d["finish_steps"], d["finish_model_calls"], d["finish_model_rows"]) == ("finish", n, n, 2 * n)


@pytest.mark.parametrize("case", [k[0] for k in KINDS])
def test_finishing_every_step_left_is_the_completed_run(request, case):
    """With as many finishing steps as the run had left, the re-timed schedule is the run's own schedule: a DDIM
    run (eta 0) or an Euler one (and SD3's flow matching, with its shift) gives the completed run's latents."""
    pipe, extra = _case(request, case)
    if case not in ("sd-ddim", "sd-inpaint-4ch-ddim") and not pipe.flow_matching:
        _euler(pipe)
    full = _call(pipe, extra, output_type="latent")
    finished = _call(pipe, extra, output_type="latent", interrupt_output="finish:1000",
                     callback_on_step_end=StopAtStep(cutoff_step_index=1))
    assert finished.record.stop_output == "finish"
    assert finished.record.finish_steps == full.record.steps_total - 2
    assert (finished.images - full.images).abs().max() <= 2e-4 * max(1.0, float(full.images.abs().max()))


def test_finish_is_closer_to_the_full_run_than_the_x0_at_the_stop(sd_pipe):
    full = sd_pipe("a cat", num_inference_steps=20, generator=gen(), output_type="latent")
    store = {}

    def keep(p, i, t, kw):
        store["denoised"] = kw["denoised"]

    x0 = sd_pipe("a cat", num_inference_steps=20, generator=gen(), output_type="latent", interrupt_output="denoised",
                 callback_on_step_end=[keep, StopAtStep(cutoff_step_index=5)],
                 callback_on_step_end_tensor_inputs=["denoised"])
    finish = sd_pipe("a cat", num_inference_steps=20, generator=gen(), output_type="latent", interrupt_output="finish",
                     callback_on_step_end=StopAtStep(cutoff_step_index=5))
    assert x0.record.stop_output == "latents"  # output_type="latent" returns the run's latents, as before
    assert finish.record.stop_output == "finish" and finish.record.finish_steps == 3
    assert (finish.images - full.images).norm() < 0.5 * (store["denoised"] - full.images).norm()


def test_stop_at_the_last_step_is_the_completed_run(pipe):
    full = pipe("a cat", num_inference_steps=4, generator=gen(), output_type="np")
    last = pipe("a cat", num_inference_steps=4, generator=gen(), output_type="np", interrupt_output="finish",
                callback_on_step_end=StopAtStep(cutoff_step_index=3))
    assert not last.interrupted and last.stop_reason == "completed"
    assert last.record.stop_output is None and last.record.finish_model_calls == 0
    assert np.array_equal(last.images, full.images)


def test_stop_before_the_first_step_finishes_from_the_start(sd_pipe, count_calls):
    token = stepdiff.CancelToken()
    run = sd_pipe.steps("a cat", num_inference_steps=10, generator=gen(), cancel=token, interrupt_output="finish:2",
                        output_type="np")
    token.cancel()
    for _ in run:
        raise AssertionError("no step runs after the cancel")
    calls = count_calls(sd_pipe)
    out = run.finish()
    assert out.steps_completed == 0 and out.record.stop_output == "finish" and out.record.finish_steps == 2
    assert calls.calls == 2 and np.isfinite(out.images).all()


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_batch_of_two_is_two_single_runs(request, family):
    cls = {"sd": stepdiff.StableDiffusionPipeline, "sdxl": stepdiff.StableDiffusionXLPipeline,
           "sd3": stepdiff.StableDiffusion3Pipeline}[family]
    pipe = _load(cls, request.getfixturevalue(f"{family}_folder"))
    prompts = ["a photo of a cat", "a red car"]
    stop = dict(callback_on_step_end=[CFGCutoffCallback(cutoff_step_index=1), StopAtStep(cutoff_step_index=2)],
                interrupt_output="finish")
    both = pipe(prompts, num_inference_steps=STEPS, generator=[gen(0), gen(1)], output_type="np", **stop)
    assert both.record.stop_output == "finish" and both.record.finish_model_rows == 3 * 2  # guidance cut: 1 row each
    for row, prompt in enumerate(prompts):
        alone = pipe(prompt, num_inference_steps=STEPS, generator=gen(row), output_type="np", **stop)
        assert alone.record.finish_model_rows == 3
        assert np.abs(both.images[row] - alone.images[0]).max() <= 1e-4


def test_finishing_keeps_the_guidance_of_the_stop(sd_pipe):
    """A callback that turned guidance off is not called again; the finishing steps keep its scale."""
    off = sd_pipe("a cat", num_inference_steps=STEPS, generator=gen(), interrupt_output="finish",
                  callback_on_step_end=[CFGCutoffCallback(cutoff_step_index=0), StopAtStep(cutoff_step_index=2)])
    on = sd_pipe("a cat", num_inference_steps=STEPS, generator=gen(), interrupt_output="finish",
                 callback_on_step_end=StopAtStep(cutoff_step_index=2))
    assert off.record.finish_model_rows == 3 and on.record.finish_model_rows == 6


def test_callbacks_are_not_called_during_finishing(pipe):
    seen = []

    def cb(p, i, t, kw):
        seen.append(i)
        if i == 2:
            p.stop("enough")
        return kw

    out = pipe("a cat", num_inference_steps=STEPS, generator=gen(), interrupt_output="finish", callback_on_step_end=cb)
    assert seen == [0, 1, 2] and out.record.finish_model_calls == 3 and out.stop_reason == "enough"


def test_inpainting_finish_keeps_the_unmasked_area(sd_folder):
    pipe = _load(stepdiff.StableDiffusionInpaintPipeline, sd_folder)
    run = pipe.steps("a photo of a cat", image=IMAGE, mask_image=MASK, num_inference_steps=STEPS, generator=gen(0),
                     output_type="latent", interrupt_output="finish")
    for state in run:
        if state.step_index == 1:
            break
    out = run.finish()
    known, keep = run.extras.image_latents, (state.cond["mask"] < 0.5).expand_as(out.images)
    assert out.record.stop_output == "finish"
    assert torch.equal(out.images[keep], known[keep])


def test_run_settings_can_change_until_finish(sd_pipe):
    run = sd_pipe.steps("a cat", num_inference_steps=STEPS, generator=gen(), output_type="np")
    assert run.interrupt_output == "denoised" and run.finish_steps == 3  # the library default
    for state in run:
        if state.step_index == 1:
            break
    run.interrupt_output = "finish:2"
    assert (run.interrupt_output, run.finish_steps) == ("finish", 2)
    run.finish_steps = 1
    out = run.finish()
    assert out.record.stop_output == "finish" and out.record.finish_steps == 1


@pytest.mark.parametrize("value", ["noise", "finish:0", "finish:-1", "finish:", "finish:x", "finish:1.5", "Finish",
                                   " finish", "finish:٣", 3, None, True])
def test_bad_interrupt_output_fails_before_any_model_call(sd_pipe, count_calls, value):
    calls = count_calls(sd_pipe)
    encoded = []
    handle = sd_pipe.text_encoder.register_forward_pre_hook(lambda *a: encoded.append(1))
    with pytest.raises(ValueError, match=r"interrupt_output must be one of 'denoised', 'latents', 'finish' .*'finish:N'"):
        sd_pipe("a cat", num_inference_steps=2, interrupt_output=value)
    handle.remove()
    assert calls.calls == 0 and not encoded


def test_bad_run_settings(sd_pipe):
    run = sd_pipe.steps("a cat", num_inference_steps=2)
    with pytest.raises(ValueError, match="interrupt_output must be one of"):
        run.interrupt_output = "finish:none"
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="finish_steps must be an int >= 1"):
            run.finish_steps = bad
    assert run.interrupt_output == "denoised" and run.finish_steps == 3


def test_finish_plan_resamples_the_levels_left(sd_folder):
    """25 DDIM steps stopped after 3: 3 finishing steps on the run's own timesteps, ending at sigma 0."""
    pipe = _ddim(_load(stepdiff.StableDiffusionPipeline, sd_folder))
    run = pipe.steps("a cat", num_inference_steps=25, generator=gen())
    for state in run:
        if state.steps_completed == 3:
            break
    plan = finish_plan(run.scheduler, run.timesteps, 3, 3, flow_matching=False)
    left = [float(t) for t in run.timesteps[3:]]  # 22 levels, then 0
    assert [float(t) for t in plan.timesteps] == [left[0], left[7], left[15]]
    assert plan.sigmas[-1] == 0.0 and plan.sigmas == sorted(plan.sigmas, reverse=True)
    assert plan.scale == pytest.approx((plan.sigmas[0] ** 2 + 1) ** 0.5)  # DDIM latents into sigma space
    run.finish()


def test_a_schedule_of_one_repeated_timestep_finishes_in_one_step(sd_pipe):
    """2000 Euler steps of a 1000-step model: every timestep is 1, so one noise level is left, then 0."""
    _euler(sd_pipe)
    out = sd_pipe("a cat", num_inference_steps=2000, generator=gen(), output_type="np", interrupt_output="finish",
                  callback_on_step_end=StopAtStep(cutoff_step_index=1))
    assert out.record.stop_output == "finish" and out.record.finish_steps == 1 and np.isfinite(out.images).all()
