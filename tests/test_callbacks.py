"""The callback protocol of the seed document, checked by recording what each step saw."""

import diffusers
import pytest
import torch

import stepdiff
from stepdiff.callbacks import (
    CFGCutoffCallback,
    MultiPipelineCallbacks,
    PipelineCallback,
    SDCFGCutoffCallback,
    SDXLCFGCutoffCallback,
)

from .conftest import gen

STEPS = 5


def run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("generator", gen(0))
    kwargs.setdefault("prompt", "a photo of a cat")
    return pipe(**kwargs)


class Recorder:
    def __init__(self, result=None):
        self.steps, self.timesteps, self.keys, self.seen = [], [], [], []
        self.result = result

    def __call__(self, pipeline, step_index, timestep, callback_kwargs):
        self.steps.append(step_index)
        self.timesteps.append(timestep)
        self.keys.append(list(callback_kwargs))
        self.seen.append({k: v.clone() for k, v in callback_kwargs.items()})
        return callback_kwargs if self.result is None else self.result(pipeline, step_index, callback_kwargs)


def test_called_once_per_step_including_last(pipe):
    rec = Recorder()
    run(pipe, callback_on_step_end=rec)
    assert rec.steps == list(range(STEPS))
    assert torch.equal(torch.stack(rec.timesteps), pipe.timesteps)  # the last run's (its own scheduler copy)


def test_default_tensor_inputs_is_latents(pipe):
    rec = Recorder()
    run(pipe, callback_on_step_end=rec)
    assert all(keys == ["latents"] for keys in rec.keys)


def test_subset_and_full_set_arrive_exactly(pipe):
    subset = ["prompt_embeds", "denoised"]
    rec = Recorder()
    run(pipe, callback_on_step_end=rec, callback_on_step_end_tensor_inputs=subset)
    assert all(keys == subset for keys in rec.keys)
    full = list(pipe._callback_tensor_inputs)
    rec = Recorder()
    run(pipe, callback_on_step_end=rec, callback_on_step_end_tensor_inputs=full)
    assert all(keys == full for keys in rec.keys)
    assert all(isinstance(v, torch.Tensor) for v in rec.seen[0].values())


def test_classic_tensor_inputs_are_allowed(sd_pipe, sdxl_pipe):
    assert {"latents", "prompt_embeds", "negative_prompt_embeds", "denoised"} <= set(sd_pipe._callback_tensor_inputs)
    assert {"latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "denoised"} <= set(sdxl_pipe._callback_tensor_inputs)


def test_unknown_tensor_input_fails_before_model_work(pipe, count_calls):
    calls = count_calls(pipe)
    with pytest.raises(ValueError, match=r"latent'?\]?.*allowed: \[.*'latents'"):
        run(pipe, callback_on_step_end=Recorder(), callback_on_step_end_tensor_inputs=["latent"])
    assert calls.calls == 0


def test_zeroing_latents_at_last_step_gives_zero_output(pipe):
    def zero_last(p, i, kw):
        return {"latents": torch.zeros_like(kw["latents"])} if i == p.num_timesteps - 1 else kw

    out = run(pipe, output_type="latent", callback_on_step_end=Recorder(zero_last))
    assert torch.count_nonzero(out.images) == 0


def test_returned_latents_replace_the_loops_own(pipe):
    doubled = Recorder(lambda p, i, kw: {"latents": kw["latents"] * 2} if i == 1 else kw)
    run(pipe, callback_on_step_end=doubled, output_type="latent")
    watcher = Recorder()
    # The next step starts from the doubled latents: step 2's input differs from an unmodified run.
    run(pipe, callback_on_step_end=watcher, output_type="latent")
    assert not torch.allclose(doubled.seen[2]["latents"], watcher.seen[2]["latents"])


def test_adding_one_to_guidance_every_step(pipe):
    def bump(p, i, kw):
        p._guidance_scale += 1
        return kw

    run(pipe, guidance_scale=3.0, callback_on_step_end=Recorder(bump))
    assert pipe.guidance_scale == 3.0 + pipe.num_timesteps


def test_interrupt_at_step_1_returns_the_latents_seen_there(pipe, count_calls):
    calls = count_calls(pipe)

    def stop(p, i, kw):
        if i == 1:
            p._interrupt = True
        return kw

    rec = Recorder(stop)
    out = run(pipe, output_type="latent", callback_on_step_end=rec)
    assert rec.steps == [0, 1]  # no callback after the interrupt
    assert calls.calls == 2  # and no model call either
    assert torch.equal(out.images, rec.seen[1]["latents"])
    assert out.interrupted is True and out.steps_completed == 2
    assert out.record.interrupted and out.record.steps_completed == 2
    # The flag resets at the start of the next call.
    out = run(pipe, output_type="latent")
    assert out.interrupted is False and out.steps_completed == STEPS and pipe.interrupt is False


def test_returning_none_means_no_change(pipe):
    plain = run(pipe, output_type="latent").images
    out = run(pipe, output_type="latent", callback_on_step_end=lambda p, i, t, kw: None).images
    assert torch.equal(plain, out)


def test_non_dict_return_names_step_and_type(pipe):
    with pytest.raises(TypeError, match=r"must return a dict.*list at step 0"):
        run(pipe, callback_on_step_end=lambda p, i, t, kw: [kw])


def test_wrong_shape_names_key_step_and_shapes(pipe):
    def bad(p, i, kw):
        return {"latents": kw["latents"][:, :2]} if i == 2 else kw

    with pytest.raises(ValueError, match=r"'latents' with shape \(1, 2, \d+, \d+\) at step 2; expected \(1, 4,"):
        run(pipe, callback_on_step_end=Recorder(bad))


def test_exception_in_callback_gets_step_index(pipe):
    def boom(p, i, t, kw):
        if i == 3:
            raise RuntimeError("user code failed")
        return kw

    with pytest.raises(RuntimeError, match=r"user code failed \(raised in callback_on_step_end at step 3"):
        run(pipe, callback_on_step_end=boom)


def test_list_of_callbacks_runs_in_order(pipe):
    order = []

    def first(p, i, t, kw):
        order.append(("first", i))
        return {"latents": kw["latents"] + 1}

    def second(p, i, t, kw):
        order.append(("second", i))
        return kw

    run(pipe, callback_on_step_end=[first, second], num_inference_steps=2)
    assert order == [("first", 0), ("second", 0), ("first", 1), ("second", 1)]


def test_public_guidance_setter_from_callback(pipe, count_calls):
    calls = count_calls(pipe)

    def off(p, i, t, kw):
        if i == 1:
            p.guidance_scale = 1.0
        return kw

    run(pipe, guidance_scale=7.0, callback_on_step_end=off)
    assert calls.rows == [2, 2, 1, 1, 1]


def test_progress_bar_disable_is_honoured(sd_pipe, capsys):
    sd_pipe.set_progress_bar_config(disable=True)
    run(sd_pipe)
    assert "it/s" not in capsys.readouterr().err
    sd_pipe.set_progress_bar_config(disable=False)
    run(sd_pipe)
    assert f"{STEPS}/{STEPS}" in capsys.readouterr().err


# ---------------------------------------------------------------- official callbacks


@pytest.mark.parametrize("ratio", [0, 1, 0.0, 0.5, 1.0])
def test_ratio_accepts_reals_in_unit_interval(ratio):
    assert CFGCutoffCallback(cutoff_step_ratio=ratio).config.cutoff_step_ratio == float(ratio)


@pytest.mark.parametrize("ratio", [True, False, -0.1, 1.5, float("nan"), "0.4", None])
def test_ratio_rejects_everything_else(ratio):
    with pytest.raises(ValueError, match="cutoff_step"):
        CFGCutoffCallback(cutoff_step_ratio=ratio)


@pytest.mark.parametrize("index", [-1, 1.0, True, "3"])
def test_index_must_be_non_negative_int(index):
    with pytest.raises(ValueError, match="cutoff_step_index must be a non-negative int"):
        CFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=index)


def test_exactly_one_cutoff():
    with pytest.raises(ValueError, match="exactly one"):
        CFGCutoffCallback(cutoff_step_ratio=0.5, cutoff_step_index=3)
    assert CFGCutoffCallback(cutoff_step_index=3).config.cutoff_step_ratio is None
    assert SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=10).config.cutoff_step_index == 10


def test_config_is_serialisable(tmp_path):
    cb = SDXLCFGCutoffCallback(cutoff_step_ratio=0.4)
    cb.save_config(tmp_path)
    again = SDXLCFGCutoffCallback.from_config(SDXLCFGCutoffCallback.load_config(tmp_path))
    assert again.config.cutoff_step_ratio == 0.4 and again.config.cutoff_step_index is None


def test_multi_callbacks_union_without_duplicates():
    multi = MultiPipelineCallbacks([SDCFGCutoffCallback(), SDXLCFGCutoffCallback()])
    assert multi.tensor_inputs == ["prompt_embeds", "add_text_embeds", "add_time_ids"]


@pytest.mark.parametrize("ratio,steps,expected_cut", [(0.4, 10, 4), (0.5, 5, 2), (0.0, 5, 0), (1.0, 5, 5)])
def test_cutoff_step_is_int_of_ratio_and_applies_after(pipe, count_calls, ratio, steps, expected_cut):
    calls = count_calls(pipe)
    run(pipe, num_inference_steps=steps, callback_on_step_end=CFGCutoffCallback(cutoff_step_ratio=ratio))
    # Steps 0..cut run with guidance (2 rows); from cut+1 on only the conditional row.
    assert calls.rows == [2] * min(expected_cut + 1, steps) + [1] * max(steps - expected_cut - 1, 0)


@pytest.mark.parametrize("cb", [
    CFGCutoffCallback(cutoff_step_index=1),
    SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1),
    diffusers.callbacks.SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1),
], ids=["ours", "ours-sdxl", "classic-sdxl"])
def test_cfg_cutoff_works_for_every_batch(sdxl_pipe, count_calls, cb):
    calls = count_calls(sdxl_pipe)
    out = run(sdxl_pipe, prompt=["a red car", "a dog", "a bear"], num_images_per_prompt=2, callback_on_step_end=cb,
              output_type="np")
    assert out.images.shape[0] == 6
    assert calls.rows == [12, 12, 6, 6, 6]


def test_classic_library_fails_there(sdxl_folder):
    classic = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    classic.set_progress_bar_config(disable=True)
    with pytest.raises(RuntimeError, match="size"):
        classic(prompt=["a red car", "a dog"], num_images_per_prompt=2, num_inference_steps=4,
                callback_on_step_end=diffusers.callbacks.SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1))


def test_classic_sd_callback_on_sd(sd_pipe, count_calls):
    calls = count_calls(sd_pipe)
    cb = diffusers.callbacks.SDCFGCutoffCallback(cutoff_step_ratio=0.4)
    run(sd_pipe, prompt=["a cat", "a dog"], callback_on_step_end=cb)
    assert calls.rows == [4, 4, 4, 2, 2]


def test_guidance_off_by_callback_without_slicing_and_back_on(pipe, count_calls):
    calls = count_calls(pipe)

    def toggle(p, i, t, kw):
        if i == 0:
            p.guidance_scale = 0.0
        if i == 2:
            p.guidance_scale = 6.0
        return kw

    run(pipe, prompt=["a cat", "a dog"], negative_prompt=["blue", "red"], guidance_scale=6.0, callback_on_step_end=toggle)
    assert calls.rows == [4, 2, 2, 4, 4]
    # Where guidance resumes, the unconditional rows are the original negative prompt's.
    assert torch.equal(calls.hidden[3][:2], calls.hidden[0][:2])
    assert torch.equal(calls.hidden[3][2:], calls.hidden[0][2:])


def test_official_callback_uses_its_own_tensor_inputs(sdxl_pipe):
    seen = []

    class Spy(SDXLCFGCutoffCallback):
        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append(sorted(callback_kwargs))
            return super().callback_fn(pipeline, step_index, timestep, callback_kwargs)

    run(sdxl_pipe, callback_on_step_end=Spy(cutoff_step_ratio=0.4), callback_on_step_end_tensor_inputs=["latents"])
    assert seen[0] == ["add_text_embeds", "add_time_ids", "prompt_embeds"]


def test_subclassing_pipeline_callback():
    class Halve(PipelineCallback):
        tensor_inputs = ["latents"]  # noqa: RUF012

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return callback_kwargs

    assert Halve(cutoff_step_ratio=0.5).tensor_inputs == ["latents"]
    assert isinstance(Halve(), diffusers.callbacks.PipelineCallback)  # diffusers' own isinstance checks pass


@pytest.mark.parametrize("name", [
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
])
def test_every_scheduler_runs_and_gives_denoised(sd_pipe, name):
    sd_pipe.scheduler = getattr(stepdiff, name).from_config(sd_pipe.scheduler.config)
    rec = Recorder()
    out = run(sd_pipe, num_inference_steps=4, callback_on_step_end=rec,
              callback_on_step_end_tensor_inputs=["latents", "denoised"], output_type="np")
    assert out.images.shape == (1, 32, 32, 3)
    assert len(rec.steps) == sd_pipe.num_timesteps
    for seen in rec.seen:
        assert seen["denoised"].shape == seen["latents"].shape and torch.isfinite(seen["denoised"]).all()


def test_dpm_sde_variant_runs(sd_pipe):
    sd_pipe.scheduler = stepdiff.DPMSolverMultistepScheduler.from_config(
        sd_pipe.scheduler.config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
    )
    out = run(sd_pipe, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_replaced_conditioning_reaches_the_next_model_call(pipe, count_calls):
    """The loop reuses its [uncond; cond] batch between steps; a callback's replacement must still land."""
    calls = count_calls(pipe)

    def swap(p, i, t, kw):
        if i == 1:
            return {"negative_prompt_embeds": torch.zeros_like(kw["negative_prompt_embeds"])}
        return kw

    run(pipe, negative_prompt="a dog", guidance_scale=6.0, callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["negative_prompt_embeds"])
    assert torch.equal(calls.hidden[1], calls.hidden[0])  # unchanged conditioning is reused as is
    assert calls.hidden[1][:1].abs().sum() > 0 and torch.count_nonzero(calls.hidden[2][:1]) == 0
    assert torch.equal(calls.hidden[2][1:], calls.hidden[0][1:])  # conditional rows untouched
