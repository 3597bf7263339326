"""Compute policies (stepdiff.caching): lossless corners, batch = single runs, threads, composition with the
official callbacks, img2img, ControlNet, SD3, freed caches, bad parameters, and pixel parity with the
``deepcache`` and ``tgate`` packages on the classic pipeline."""

import threading

import diffusers
import numpy as np
import pytest
import torch

import stepdiff
from stepdiff import AdaptiveGuidanceCallback, DeepCacheCallback, FirstBlockCacheCallback, TGateCallback
from stepdiff.caching import core
from stepdiff.callbacks import (
    CFGCutoffCallback,
    GuidanceIntervalCallback,
    SD3CFGCutoffCallback,
    SDCFGCutoffCallback,
    SDXLCFGCutoffCallback,
    StopAtStep,
)

from .conftest import _load, gen, test_image
from .test_runs import _in_threads

STEPS = 6
PROMPTS = ["a red circle", "a blue square on a green background"]


def _run(pipe, callbacks, prompt=PROMPTS[0], seed=0, **kw):
    generator = [gen(seed + k) for k in range(len(prompt))] if isinstance(prompt, list) else gen(seed)
    kw.setdefault("num_inference_steps", STEPS)
    return pipe(prompt, generator=generator, output_type="np", callback_on_step_end=callbacks, **kw)


LOSSLESS = [
    pytest.param(lambda: [DeepCacheCallback(cache_interval=1, cache_branch_id=0)], id="deepcache-interval-1"),
    pytest.param(lambda: [FirstBlockCacheCallback(threshold=0.0)], id="first-block-threshold-0"),
    pytest.param(lambda: [AdaptiveGuidanceCallback(threshold=1.0)], id="adaptive-threshold-1"),
    pytest.param(lambda: [TGateCallback(gate_step=STEPS + 1, sp_interval=1)], id="tgate-past-the-end"),
]


@pytest.mark.parametrize("policies", LOSSLESS)
def test_lossless_settings_give_the_uncached_pixels_exactly(pipe, policies):
    plain = _run(pipe, None)
    cached = _run(pipe, policies())
    np.testing.assert_array_equal(cached.images, plain.images)
    assert cached.record.cached_calls == 0
    assert cached.record.model_rows == plain.record.model_rows


def test_deepcache_runs_the_whole_unet_every_interval_th_step(pipe):
    out = _run(pipe, [DeepCacheCallback(cache_interval=3, cache_branch_id=0)])
    r = out.record
    assert (r.model_calls, r.cached_calls, r.full_model_calls) == (STEPS, 4, 2)  # steps 0 and 3 are full
    assert r.blocks_skipped > r.blocks_computed > 0
    assert r.to_dict()["cached_calls"] == 4
    plain = _run(pipe, None)
    assert not np.array_equal(out.images, plain.images)  # cached steps really reuse something


def test_a_deeper_branch_computes_more(pipe):
    shallow = _run(pipe, [DeepCacheCallback(3, 0)]).record
    deeper = _run(pipe, [DeepCacheCallback(3, 2)]).record
    assert deeper.blocks_computed > shallow.blocks_computed


def test_tgate_drops_guidance_and_reuses_attention_after_the_gate(pipe):
    out = _run(pipe, [TGateCallback(gate_step=2)])
    r = out.record
    assert r.rows_per_step == [2, 2] + [1] * (STEPS - 2)
    assert r.cached_calls >= STEPS - 2 and r.blocks_skipped > 0


POLICIES = [
    pytest.param(lambda: [DeepCacheCallback(2, 0)], id="deepcache"),
    pytest.param(lambda: [TGateCallback(gate_step=3, sp_interval=2, warm_up=1)], id="tgate"),
    pytest.param(lambda: [FirstBlockCacheCallback(threshold=0.5)], id="first-block"),
    pytest.param(lambda: [AdaptiveGuidanceCallback(threshold=0.5)], id="adaptive"),
    pytest.param(lambda: [TGateCallback(gate_step=3), DeepCacheCallback(2, 0)], id="tgate+deepcache"),
]


@pytest.mark.parametrize("policies", POLICIES)
def test_batch_of_two_gives_each_prompt_its_single_run_image(pipe, policies):
    batch = _run(pipe, policies(), prompt=PROMPTS)
    assert batch.record.cached_calls > 0 or batch.record.model_rows < 2 * 2 * STEPS
    for k, prompt in enumerate(PROMPTS):
        alone = _run(pipe, policies(), prompt=prompt, seed=k)
        np.testing.assert_allclose(batch.images[k], alone.images[0], atol=2e-5)


def _bump(scales):
    """A callback that scales each image's latents at steps 1 and 3: the images then change by different amounts."""

    def bump(pipe, i, t, kw):
        if i in (1, 3):
            return {"latents": kw["latents"] * torch.tensor(scales, dtype=kw["latents"].dtype).view(-1, 1, 1, 1)}
        return None

    return bump


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_first_block_cache_decides_per_image(family, request):
    """Images that change by different amounts skip different steps; in a batch, the blocks run on the rows that
    need them and each image still gets exactly what it gets alone."""
    pipe = request.getfixturevalue(f"{family}_pipe")
    alone = [_run(pipe, [_bump([scale]), FirstBlockCacheCallback(0.3)], prompt=p, seed=k)
             for k, (p, scale) in enumerate(zip(PROMPTS, [1.0, 3.0]))]
    batch = _run(pipe, [_bump([1.0, 3.0]), FirstBlockCacheCallback(0.3)], prompt=PROMPTS)
    counts = [a.record.cached_calls for a in alone]
    # some call had one image skipping and the other computing
    assert batch.record.cached_calls >= max(counts) > 0
    assert counts[0] != counts[1] or batch.record.cached_calls > counts[0]
    for k in range(2):
        np.testing.assert_allclose(batch.images[k], alone[k].images[0], atol=2e-5)


def test_adaptive_guidance_drops_the_unconditional_rows_once_every_image_agrees(pipe):
    out = _run(pipe, [AdaptiveGuidanceCallback(threshold=0.0)], prompt=PROMPTS)  # any similarity ends it
    assert out.record.rows_per_step == [4] + [2] * (STEPS - 1)


def test_two_threads_share_one_pipeline_without_seeing_each_others_cache(sd_pipe):
    settings = [
        ([DeepCacheCallback(2, 0)], PROMPTS[0], 0),
        ([TGateCallback(gate_step=2)], PROMPTS[1], 1),
        (None, PROMPTS[0], 2),
        ([FirstBlockCacheCallback(0.5)], PROMPTS[1], 3),
    ]
    alone = [_run(sd_pipe, cbs, prompt=p, seed=s).images for cbs, p, s in settings]
    start = threading.Barrier(len(settings))

    def work(cbs, p, s):
        start.wait()
        return [_run(sd_pipe, cbs, prompt=p, seed=s).images for _ in range(2)][-1]

    results = _in_threads([lambda setting=setting: work(*setting) for setting in settings])
    for k in range(len(settings)):
        np.testing.assert_allclose(results[k], alone[k], atol=2e-5)


def _cutoffs(family):
    cut = SDCFGCutoffCallback if family == "sd" else SDXLCFGCutoffCallback
    return [cut(cutoff_step_ratio=0.5), CFGCutoffCallback(cutoff_step_index=2)]


@pytest.mark.parametrize("cutoff", [0, 1])
def test_composes_with_the_official_cutoff_callbacks(pipe, cutoff):
    family = "sd" if isinstance(pipe, stepdiff.StableDiffusionPipeline) else "sdxl"
    cut = _cutoffs(family)[cutoff]
    out = _run(pipe, [cut, DeepCacheCallback(2, 0)], prompt=PROMPTS)
    r = out.record
    on = cut.cutoff_step(pipe) if cut.config.cutoff_step_index is not None else int(STEPS * 0.5)
    assert r.rows_per_step == [4] * (on + 1) + [2] * (STEPS - on - 1)
    assert r.cached_calls == STEPS // 2 and r.blocks_computed > 0 and r.blocks_skipped > 0
    for k, prompt in enumerate(PROMPTS):  # the cached rows follow the cutoff: still each prompt's own image
        alone = _run(pipe, [_cutoffs(family)[cutoff], DeepCacheCallback(2, 0)], prompt=prompt, seed=k)
        np.testing.assert_allclose(out.images[k], alone.images[0], atol=2e-5)


def test_composes_with_a_guidance_interval_and_tgate(sd_pipe):
    out = _run(sd_pipe, [GuidanceIntervalCallback(start_ratio=0.0, end_ratio=0.5), TGateCallback(gate_step=4),
                         DeepCacheCallback(3, 0)])
    assert out.record.rows_per_step == [2, 2, 2, 1, 1, 1]
    assert out.record.cached_calls > 0


def test_cached_steps_give_denoised_previews_and_can_stop(sd_pipe):
    seen = []

    def look(pipe, i, t, kw):
        seen.append((i, bool(torch.isfinite(kw["denoised"]).all())))

    out = _run(sd_pipe, [DeepCacheCallback(2, 0), look, StopAtStep(cutoff_step_index=3)],
               callback_on_step_end_tensor_inputs=["denoised"])
    assert seen == [(i, True) for i in range(4)]
    assert out.interrupted and out.steps_completed == 4 and out.record.cached_calls == 2
    assert np.isfinite(out.images).all()


def test_caches_are_freed_and_blocks_unwrapped_when_the_run_ends(sd_pipe):
    policy = DeepCacheCallback(2, 0)
    run = sd_pipe.steps(PROMPTS[0], num_inference_steps=STEPS, generator=gen(0), callback_on_step_end=[policy])
    states = []
    for state in run:
        states.append(state)
        if len(states) == 3:
            assert core._WRAPPED and any("forward" in m.__dict__ for m in sd_pipe.unet.modules())
            assert run.compute.states[0].cache
    run.finish()
    assert not core._WRAPPED
    assert not any("forward" in m.__dict__ for m in sd_pipe.unet.modules())
    assert run.compute.states[0].cache == {}


def test_an_abandoned_run_frees_its_cache_too(sd_pipe):
    run = sd_pipe.steps(PROMPTS[0], num_inference_steps=STEPS, generator=gen(0),
                        callback_on_step_end=[FirstBlockCacheCallback(0.5)])
    it = iter(run)
    next(it)
    next(it)
    it.close()  # the caller stops iterating (a break)
    assert not core._WRAPPED
    run.finish()


def test_img2img_strength(sd_folder):
    pipe = _load(stepdiff.StableDiffusionImg2ImgPipeline, sd_folder)
    image, _ = test_image(64)
    kw = dict(image=image, strength=0.6, num_inference_steps=10)
    plain = _run(pipe, None, **kw)
    lossless = _run(pipe, [DeepCacheCallback(1, 0)], **kw)
    np.testing.assert_array_equal(lossless.images, plain.images)
    cached = _run(pipe, [DeepCacheCallback(2, 0)], **kw)
    assert cached.record.model_calls == 6 and cached.record.cached_calls == 3


def test_inpainting(sd_inpaint_folder):
    pipe = _load(stepdiff.StableDiffusionInpaintPipeline, sd_inpaint_folder)
    image, mask = test_image(64)
    kw = dict(image=image, mask_image=mask, num_inference_steps=STEPS)
    np.testing.assert_array_equal(_run(pipe, [DeepCacheCallback(1, 0)], **kw).images, _run(pipe, None, **kw).images)
    assert _run(pipe, [DeepCacheCallback(2, 0)], **kw).record.cached_calls == STEPS // 2


class _Counter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self.hook)

    def hook(self, *_):
        self.calls += 1


@pytest.mark.parametrize("mode", ["reuse", "run"])
def test_controlnet_residuals_reused_or_recomputed_on_cached_steps(sd_folder, sd_controlnet_folder, mode):
    net = diffusers.ControlNetModel.from_pretrained(sd_controlnet_folder)
    pipe = stepdiff.StableDiffusionControlNetPipeline.from_pretrained(sd_folder, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    control, _ = test_image(64)
    kw = dict(image=control, num_inference_steps=STEPS)
    plain = _run(pipe, None, **kw)
    np.testing.assert_array_equal(_run(pipe, [DeepCacheCallback(1, 0, controlnet=mode)], **kw).images, plain.images)
    counter = _Counter(net)
    try:
        out = _run(pipe, [DeepCacheCallback(2, 0, controlnet=mode)], **kw)
    finally:
        counter.handle.remove()
    # the hook sees the call before the wrapper decides, so count the ControlNet's own work via the record
    assert out.record.cached_calls == STEPS // 2
    assert counter.calls == STEPS
    batch = _run(pipe, [DeepCacheCallback(2, 0, controlnet=mode)], prompt=PROMPTS, image=control,
                 num_inference_steps=STEPS)
    for k, prompt in enumerate(PROMPTS):
        alone = _run(pipe, [DeepCacheCallback(2, 0, controlnet=mode)], prompt=prompt, seed=k, **kw)
        np.testing.assert_allclose(batch.images[k], alone.images[0], atol=2e-5)


def test_reusing_controlnet_residuals_skips_the_controlnets_work(sd_folder, sd_controlnet_folder):
    net = diffusers.ControlNetModel.from_pretrained(sd_controlnet_folder)
    pipe = stepdiff.StableDiffusionControlNetPipeline.from_pretrained(sd_folder, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    control, _ = test_image(64)
    seen = {}
    for mode in ("reuse", "run"):
        counter = _Counter(net.down_blocks[0])  # inside the ControlNet: runs only when the ControlNet does
        try:
            _run(pipe, [DeepCacheCallback(2, 0, controlnet=mode)], image=control, num_inference_steps=STEPS)
        finally:
            counter.handle.remove()
        seen[mode] = counter.calls
    assert seen == {"reuse": STEPS // 2, "run": STEPS}


def test_sd3_first_block_cache(sd3_pipe):
    plain = _run(sd3_pipe, None, prompt=PROMPTS)
    np.testing.assert_array_equal(_run(sd3_pipe, [FirstBlockCacheCallback(0.0)], prompt=PROMPTS).images, plain.images)
    policy = [SD3CFGCutoffCallback(cutoff_step_ratio=0.5), FirstBlockCacheCallback(threshold=0.5)]
    batch = _run(sd3_pipe, policy, prompt=PROMPTS)
    assert batch.record.cached_calls > 0
    for k, prompt in enumerate(PROMPTS):
        alone = _run(sd3_pipe, [SD3CFGCutoffCallback(cutoff_step_ratio=0.5), FirstBlockCacheCallback(0.5)],
                     prompt=prompt, seed=k)
        np.testing.assert_allclose(batch.images[k], alone.images[0], atol=2e-5)


def test_sd3_adaptive_guidance(sd3_pipe):
    out = _run(sd3_pipe, [AdaptiveGuidanceCallback(0.0)])
    assert out.record.rows_per_step == [2] + [1] * (STEPS - 1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DeepCacheCallback(cache_interval=0), "cache_interval must be an int >= 1, got 0"),
        (lambda: DeepCacheCallback(cache_interval=2.5), "cache_interval must be an int >= 1, got 2.5"),
        (lambda: DeepCacheCallback(cache_branch_id=-1), "cache_branch_id must be an int >= 0, got -1"),
        (lambda: DeepCacheCallback(controlnet="maybe"), "controlnet must be 'reuse' or 'run', got 'maybe'"),
        (lambda: TGateCallback(gate_step=0), "gate_step must be an int >= 1, got 0"),
        (lambda: TGateCallback(sp_interval=True), "sp_interval must be an int >= 1, got True"),
        (lambda: FirstBlockCacheCallback(threshold=float("nan")), "threshold must be a number in [0, 1], got nan"),
        (lambda: AdaptiveGuidanceCallback(threshold=1.5), "threshold must be a number in [0, 1], got 1.5"),
    ],
)
def test_bad_parameters_are_refused_when_made(make, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make()


@pytest.mark.parametrize(
    ("family", "policies", "message"),
    [
        ("sd", lambda: [DeepCacheCallback(3, 99)], "cache_branch_id must be below"),
        ("sd3", lambda: [DeepCacheCallback(3, 0)], "DeepCacheCallback caches a UNet's blocks"),
        ("sd3", lambda: [TGateCallback(5)], "TGateCallback caches a UNet's blocks"),
        ("sd", lambda: [DeepCacheCallback(3, 0), FirstBlockCacheCallback(0.1)], "use one of them"),
        ("sd", lambda: [TGateCallback(3), FirstBlockCacheCallback(0.1)], "use one of them"),
    ],
)
def test_policies_that_do_not_fit_the_run_are_refused_before_any_model_call(
    family, policies, message, request, count_calls
):
    pipe = request.getfixturevalue(f"{family}_pipe")
    counter = count_calls(pipe)
    with pytest.raises(ValueError, match=message):
        _run(pipe, policies())
    assert counter.calls == 0
    assert not core._WRAPPED  # a refused run leaves no block wrapped


def test_same_pixels_as_the_deepcache_package(sd_folder):
    from DeepCache import DeepCacheSDHelper

    classic = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    classic.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=classic)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        theirs = classic(PROMPTS[0], generator=gen(0), num_inference_steps=STEPS, output_type="np").images
    finally:
        helper.disable()
    ours = _run(_load(stepdiff.StableDiffusionPipeline, sd_folder), [DeepCacheCallback(3, 0)])
    np.testing.assert_allclose(ours.images, theirs, atol=1e-5)


def test_same_pixels_as_the_tgate_package(sd_folder):
    from tgate import TgateSDLoader

    classic = TgateSDLoader(diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None))
    classic.set_progress_bar_config(disable=True)
    theirs = classic.tgate(PROMPTS[0], generator=gen(0), num_inference_steps=10, gate_step=4, output_type="np").images
    ours = _run(_load(stepdiff.StableDiffusionPipeline, sd_folder), [TGateCallback(gate_step=4)],
                num_inference_steps=10)
    np.testing.assert_allclose(ours.images, theirs, atol=1e-5)
