"""One contract for every registered pipeline class (as diffusers' PipelineTesterMixin does): a pipeline
added to the registry is tested here the day it is registered."""

import threading

import numpy as np
import pytest
import torch

import stepdiff
from stepdiff import CancelToken
from stepdiff.callbacks import CFGCutoffCallback
from stepdiff.pipelines.registry import REGISTRY, load

from .conftest import control_image, gen, test_image

IMAGE, MASK = test_image()
FOLDERS = {"sd": "sd_folder", "sdxl": "sdxl_folder", "sd3": "sd3_folder", "flux": "flux_folder"}
EXTRA = {"text2image": {}, "image2image": {"image": IMAGE, "strength": 1.0}, "inpaint": {"image": IMAGE, "mask_image": MASK, "strength": 1.0}}
STEPS = 4


CONTROLNETS = {"sd": "sd_controlnet_folder", "sdxl": "sdxl_controlnet_folder"}


@pytest.fixture(params=REGISTRY, ids=[e.name for e in REGISTRY])
def case(request):
    entry = request.param
    extra, load_kwargs = dict(EXTRA[entry.kind]), {}
    if entry.controlnet:
        from diffusers import ControlNetModel

        folder = request.getfixturevalue(CONTROLNETS[entry.family])
        load_kwargs["controlnet"] = ControlNetModel.from_pretrained(folder)
        extra[load(entry)._control_image_name] = control_image()
    pipe = load(entry).from_pretrained(request.getfixturevalue(FOLDERS[entry.family]), **load_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe, extra


def _kwargs(pipe, extra, prompt="a photo of a cat", **kw):
    kw = {"prompt": prompt, "generator": gen(0), "output_type": "np", "num_inference_steps": STEPS, **extra, **kw}
    if pipe.family == "flux":  # Flux's classifier-free guidance is true CFG: a scale > 1 and a negative prompt
        kw = {"true_cfg_scale": 4.0, "max_sequence_length": 48, "height": 16, "width": 16,
              "negative_prompt": "blurry" if isinstance(prompt, str) else ["blurry"] * len(prompt), **kw}
    return kw


def _call(pipe, extra, prompt="a photo of a cat", **kw):
    kw = _kwargs(pipe, extra, prompt, **kw)
    return pipe(**kw)


def test_every_tensor_input_reaches_the_callback(case):
    pipe, extra = case
    seen = {}

    def record(p, i, t, kw):
        seen.setdefault(i, {k: tuple(v.shape) for k, v in kw.items()})
        return kw

    names = list(pipe._callback_tensor_inputs)
    assert "latents" in names and "denoised" in names
    out = _call(pipe, extra, callback_on_step_end=record, callback_on_step_end_tensor_inputs=names)
    assert sorted(seen) == list(range(STEPS)) and set(seen[0]) == set(names)
    assert seen[0]["denoised"] == seen[0]["latents"] and out.record.steps_completed == STEPS


def test_none_return_means_no_change(case):
    pipe, extra = case
    a = _call(pipe, extra, callback_on_step_end=lambda p, i, t, kw: None).images
    b = _call(pipe, extra).images
    assert np.array_equal(a, b)


def test_cutoff_at_batch_2_equals_each_prompt_alone(case):
    pipe, extra = case
    prompts = ["a photo of a cat", "a red car"]
    # Inpainting encodes the image once, with the first generator, as the classic pipelines do: there the first
    # row is the one whose randomness a single run reproduces.
    row = 1 if getattr(pipe, "repeat_image_for_generators", True) else 0
    both = _call(pipe, extra, prompt=prompts, generator=[gen(0), gen(1)], callback_on_step_end=CFGCutoffCallback(0.5))
    alone = _call(pipe, extra, prompt=prompts[row], generator=gen(row), callback_on_step_end=CFGCutoffCallback(0.5))
    assert both.record.rows_per_step == [4, 4, 4, 2]  # cutoff at step int(4 * 0.5) = 2, effective from step 3
    assert np.abs(both.images[row] - alone.images[0]).max() <= 1e-4


def test_interrupt_is_clean_and_recorded(case):
    pipe, extra = case

    def stop(p, i, t, kw):
        if i == 1:
            p._interrupt = True
        return kw

    out = _call(pipe, extra, callback_on_step_end=stop)
    assert out.interrupted and out.steps_completed == 2 and out.record.model_calls == 2
    assert out.stop_reason == "interrupted" and np.isfinite(out.images).all()
    noisy = _call(pipe, extra, callback_on_step_end=stop, interrupt_output="latents").images
    assert not np.array_equal(out.images, noisy)  # the x0 estimate, not the noisy latents


def test_cancel_from_another_thread(case):
    pipe, extra = case
    token = CancelToken()

    def cancel_at_0(p, i, t, kw):
        if i == 0:
            worker = threading.Thread(target=token.cancel, args=("user pressed stop",))
            worker.start()
            worker.join()
        return kw

    out = _call(pipe, extra, cancel=token, callback_on_step_end=cancel_at_0)
    assert out.interrupted and out.steps_completed == 1 and out.stop_reason == "user pressed stop"


def test_step_iterator_matches_call(case):
    pipe, extra = case
    run = pipe.steps(**_kwargs(pipe, extra))
    assert sum(1 for _ in run) == STEPS
    assert np.array_equal(run.finish().images, _call(pipe, extra).images)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(callback_on_step_end_tensor_inputs=["noise"], callback_on_step_end=lambda p, i, t, kw: kw), ValueError,
     r"callback_on_step_end_tensor_inputs has \['noise'\]"),
    (dict(callback_on_step_end="yes"), TypeError, "callback_on_step_end must be a callable"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be an int >= 1"),
    (dict(output_type="jpeg"), ValueError, "output_type must be one of"),
    (dict(generator=[0]), TypeError, "a list containing int"),
    (dict(cancel="stop"), TypeError, "cancel must be a stepdiff.CancelToken"),
])
def test_common_bad_inputs_fail_before_model_work(case, count_calls, kwargs, error, message):
    pipe, extra = case
    calls = count_calls(pipe)
    with pytest.raises(error, match=message):
        _call(pipe, extra, **kwargs)
    assert calls.calls == 0


def test_callback_errors_name_the_step(case):
    pipe, extra = case

    def bad(p, i, t, kw):
        if i == 1:
            return {"latents": torch.zeros(3)}
        return kw

    with pytest.raises(ValueError, match=r"'latents' with shape \(3,\) at step 1"):
        _call(pipe, extra, callback_on_step_end=bad)


def test_registry_is_what_the_package_exports():
    for entry in REGISTRY:
        assert getattr(stepdiff, entry.name) is load(entry)
        assert getattr(stepdiff.pipelines, entry.name) is load(entry)
