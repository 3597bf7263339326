"""Flux on the shared loop: parity with the classic classes (guidance embedding off and on), the step payload
(x0, guidance rows), true-CFG cutoff at any batch, distilled guidance schedules, the guidance interval, previews."""

import diffusers
import numpy as np
import pytest
import torch

import stepdiff
from stepdiff.callbacks import (
    CFGCutoffCallback,
    FluxCFGCutoffCallback,
    GuidanceIntervalCallback,
    GuidanceScheduleCallback,
)
from stepdiff.pipelines.flux import pack_latents, unpack_latents

from .conftest import gen, test_image

IMAGE, MASK = test_image(16)
BASE = dict(height=8, width=8, num_inference_steps=3, max_sequence_length=48, output_type="np", guidance_scale=4.0)
CASES = {
    "batch1": dict(prompt="a photo of a cat"),
    "batch2-per-prompt2": dict(prompt=["a cat", "a dog"], num_images_per_prompt=2),
    "true-cfg-batch2": dict(prompt=["a cat", "a dog"], negative_prompt=["red", "blue"], true_cfg_scale=3.0),
    "prompt_2-16x24": dict(prompt="a cat", prompt_2="a red car", height=16, width=24),
    "true-cfg-scale-1-with-negative": dict(prompt="a cat", negative_prompt="blue", true_cfg_scale=1.0),
}
KINDS = {
    "FluxPipeline": {},
    "FluxImg2ImgPipeline": dict(image=IMAGE, strength=0.7, height=16, width=16),
    "FluxInpaintPipeline": dict(image=IMAGE, mask_image=MASK, strength=0.8, height=16, width=16),
}


def _pair(name, folder, **load):
    ours, theirs = getattr(stepdiff, name).from_pretrained(folder, **load), getattr(diffusers, name).from_pretrained(
        folder, **load)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture(params=["plain", "guidance-embeds"])
def folder(request, flux_folder, flux_plain_folder):
    return flux_plain_folder if request.param == "plain" else flux_folder


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_parity_with_the_classic_classes(folder, name, case):
    ours, theirs = _pair(name, folder)
    kw = {**BASE, **KINDS[name], **CASES[case]}
    a = ours(**kw, generator=gen(3)).images
    b = theirs(**kw, generator=gen(3)).images
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4


def test_parity_with_dynamic_shifting(tmp_path):
    """FLUX.1-dev's scheduler: mu from the image's token count shifts the sigmas."""
    from stepdiff.testing import make_tiny_flux

    folder = make_tiny_flux(tmp_path / "flux", guidance_embeds=True, dynamic_shifting=True)
    ours, theirs = _pair("FluxPipeline", folder)
    kw = {**BASE, "height": 32, "width": 16}
    a, b = ours("a cat", **kw, generator=gen()).images, theirs("a cat", **kw, generator=gen()).images
    assert np.abs(a - b).max() <= 1e-4
    plain = stepdiff.FluxPipeline.from_pretrained(folder, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    plain.set_progress_bar_config(disable=True)
    assert np.abs(plain("a cat", **kw, generator=gen()).images - a).max() > 1e-3  # the shift changes the run


def test_sizes_round_down_as_the_classic_pipeline(flux_plain_folder):
    ours, theirs = _pair("FluxPipeline", flux_plain_folder)
    kw = {**BASE, "height": 18, "width": 13}
    a, b = ours("a cat", **kw, generator=gen()).images, theirs("a cat", **kw, generator=gen()).images
    assert a.shape == b.shape == (1, 18, 12, 3) and np.abs(a - b).max() <= 1e-4


def test_given_latents_are_packed_as_in_the_classic_pipeline(flux_folder):
    ours, theirs = _pair("FluxPipeline", flux_folder)
    latents = torch.randn(1, 16, 4, generator=gen(5))
    a = ours("a cat", **BASE, latents=latents).images
    assert np.abs(a - theirs("a cat", **BASE, latents=latents).images).max() <= 1e-4
    with pytest.raises(ValueError, match=r"latents must have the packed shape \(1, 16, 4\).*got \(1, 1, 8, 8\)"):
        ours("a cat", **BASE, latents=unpack_latents(latents, 8, 8))


def test_pack_and_unpack_are_inverse():
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert packed.shape == (2, 15, 64) and torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(unpack_latents(packed[1], 6, 10), x[1])
    # token k is the 2x2 patch at (row k // 5, column k % 5), channels outermost
    assert torch.equal(packed[0, 7].view(16, 2, 2), x[0, :, 2:4, 4:6])


def test_auto_pipelines_pick_flux(flux_folder, sd3_folder):
    assert type(stepdiff.AutoPipelineForText2Image.from_pretrained(flux_folder)) is stepdiff.FluxPipeline
    assert type(stepdiff.AutoPipelineForImage2Image.from_pretrained(flux_folder)) is stepdiff.FluxImg2ImgPipeline
    assert type(stepdiff.AutoPipelineForInpainting.from_pretrained(flux_folder)) is stepdiff.FluxInpaintPipeline
    pipe = stepdiff.FluxPipeline.from_pretrained(flux_folder)
    assert type(stepdiff.AutoPipelineForInpainting.from_pipe(pipe)) is stepdiff.FluxInpaintPipeline
    with pytest.raises(ValueError, match="use stepdiff.FluxPipeline"):
        stepdiff.StableDiffusion3Pipeline.from_pretrained(flux_folder)
    with pytest.raises(ValueError, match="use stepdiff.StableDiffusion3Pipeline"):
        stepdiff.FluxPipeline.from_pretrained(sd3_folder)


@pytest.fixture
def flux_pipe(flux_folder):
    pipe = stepdiff.FluxPipeline.from_pretrained(flux_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_payload_has_x0_and_the_guidance_rows(flux_pipe):
    seen = []
    names = ["latents", "denoised", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
             "negative_pooled_prompt_embeds", "guidance"]

    def record(p, i, t, kw):
        seen.append({k: v.clone() for k, v in kw.items()} | {"t": t, "sigma": float(p.current_run.scheduler.sigmas[i])})

    run = flux_pipe.steps(["a cat", "a dog"], negative_prompt=["red", "blue"], true_cfg_scale=2.0, **BASE,
                          generator=gen(), callback_on_step_end=record, callback_on_step_end_tensor_inputs=names)
    previous = run.state.latents.clone()
    for k, state in enumerate(run):
        # denoised is the flow-matching x0: the latents before the step minus sigma times the velocity; the
        # Euler step from there lands on (1 - sigma_next) x0 + sigma_next noise, so x0 follows from two latents
        s, s_next = seen[k]["sigma"], float(run.scheduler.sigmas[k + 1])
        velocity = (state.latents - previous) / (s_next - s)
        assert torch.allclose(seen[k]["denoised"], previous - s * velocity, atol=1e-5)
        previous = state.latents.clone()
    assert seen[0]["latents"].shape == seen[0]["denoised"].shape == (2, 16, 4)  # packed (B, tokens, 4C)
    assert seen[0]["guidance"].tolist() == [4.0, 4.0] and seen[0]["guidance"].dtype == torch.float32
    assert seen[0]["negative_prompt_embeds"].shape == seen[0]["prompt_embeds"].shape == (2, 48, 32)
    assert not torch.equal(seen[0]["negative_prompt_embeds"], seen[0]["prompt_embeds"])
    assert run.finish().record.rows_per_step == [4, 4, 4]


def test_payload_names_a_run_lacks_arrive_as_none(flux_pipe, flux_plain_folder):
    """As the classic pipeline passes its None locals: a generic callback asking for every name works on every run;
    returning a tensor for a name the run lacks is refused, naming it."""
    seen = []
    flux_pipe("a cat", **BASE, callback_on_step_end=lambda p, i, t, kw: seen.append(kw) or kw,
              callback_on_step_end_tensor_inputs=flux_pipe._callback_tensor_inputs)
    assert seen[0]["negative_prompt_embeds"] is None and seen[0]["negative_pooled_prompt_embeds"] is None
    assert seen[0]["guidance"].tolist() == [4.0] and seen[0]["prompt_embeds"].shape == (1, 48, 32)
    plain = stepdiff.FluxPipeline.from_pretrained(flux_plain_folder)
    plain.set_progress_bar_config(disable=True)
    out = plain("a cat", **BASE, callback_on_step_end=lambda p, i, t, kw: seen.append(kw["guidance"]),
                callback_on_step_end_tensor_inputs=["guidance"])
    assert seen[-3:] == [None] * 3 and out.record.guidance == "none"
    with pytest.raises(ValueError, match=r"returned \['negative_prompt_embeds'\] at step 0, which this run does not have"):
        flux_pipe("a cat", **BASE, callback_on_step_end=lambda p, i, t, kw: {"negative_prompt_embeds": torch.zeros(1)})


def test_classic_guidance_attribute_reads_back_without_the_embedding(flux_plain_folder):
    """The classic fast test steps pipe._guidance_scale up by 1 per step and reads it after the run."""
    plain = stepdiff.FluxPipeline.from_pretrained(flux_plain_folder)
    plain.set_progress_bar_config(disable=True)

    def up(p, i, t, kw):
        p._guidance_scale += 1.0

    plain("a cat", **{**BASE, "guidance_scale": 2.0}, callback_on_step_end=up)
    assert plain.guidance_scale == 5.0 and plain.num_timesteps == 3


def test_classic_cache_hooks_run_on_the_shared_loop(flux_folder):
    """The classic library's own transformer caches (hooks asking for cache contexts and the current timestep)."""
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    for config in (FirstBlockCacheConfig(threshold=0.0), PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=None)):
        pipe = stepdiff.FluxPipeline.from_pretrained(flux_folder)
        pipe.set_progress_bar_config(disable=True)
        kw = {**BASE, "negative_prompt": "blue", "true_cfg_scale": 2.0}
        full = pipe("a cat", **kw, generator=gen()).images
        if isinstance(config, PyramidAttentionBroadcastConfig):
            config.current_timestep_callback = lambda p=pipe: p.current_timestep
        pipe.transformer.enable_cache(config)
        cached = pipe("a cat", **kw, generator=gen()).images
        assert np.isfinite(cached).all() and cached.shape == full.shape
        if isinstance(config, FirstBlockCacheConfig):  # threshold 0: every block computed, the same pictures
            assert np.abs(cached - full).max() <= 1e-5


@pytest.mark.parametrize("bad,error,message", [
    (dict(true_cfg_scale=float("nan")), ValueError, "true_cfg_scale must be a finite number"),
    (dict(true_cfg_scale="2"), TypeError, r"true_cfg_scale must be a real number, got '2'"),
    (dict(guidance_scale=-1.0), ValueError, "guidance_scale must be a finite number"),
    (dict(max_sequence_length=513), ValueError, r"max_sequence_length must be an int in \[1, 512\], got 513"),
    (dict(height=1), ValueError, "height must be an int >= 2, got 1"),
    (dict(negative_prompt=["a", "b"]), ValueError, "negative_prompt has 2 entries but prompt has 1"),
    (dict(joint_attention_kwargs=[1]), TypeError, "joint_attention_kwargs must be a dict or None, got list"),
    (dict(ip_adapter_image=IMAGE), ValueError, r"ip_adapter_image needs an IP-Adapter: call pipe.load_ip_adapter"),
    (dict(negative_ip_adapter_image_embeds=[torch.zeros(1, 1, 32)]), ValueError,
     "negative_ip_adapter_image_embeds needs an IP-Adapter"),
])
def test_bad_inputs_fail_before_model_work(flux_pipe, count_calls, bad, error, message):
    calls = count_calls(flux_pipe)
    with pytest.raises(error, match=message):
        flux_pipe("a cat", **{**BASE, **bad})
    assert calls.calls == 0


def test_mismatched_negative_embeds_fail_only_with_true_cfg(flux_pipe):
    embeds = dict(prompt_embeds=torch.randn(1, 4, 32), pooled_prompt_embeds=torch.randn(1, 32),
                  negative_prompt_embeds=torch.randn(1, 5, 32), negative_pooled_prompt_embeds=torch.randn(1, 32))
    kw = {**BASE, "output_type": "latent"}
    with pytest.raises(ValueError, match="must have the same shape when passed directly"):
        flux_pipe(**embeds, **kw, true_cfg_scale=2.0)
    out = flux_pipe(**embeds, **kw, true_cfg_scale=1.0)  # the classic pipeline ignores the negatives here
    assert out.record.rows_per_step == [1, 1, 1]


@pytest.mark.parametrize("cb", [FluxCFGCutoffCallback(0.4), CFGCutoffCallback(0.4)], ids=["flux", "generic"])
def test_true_cfg_cutoff_at_batch_2_equals_each_prompt_alone(flux_pipe, count_calls, cb):
    calls = count_calls(flux_pipe)
    prompts, negatives = ["a photo of a cat", "a red car"], ["blue", "a dog"]
    kw = {**BASE, "num_inference_steps": 5, "true_cfg_scale": 3.0, "callback_on_step_end": cb}
    both = flux_pipe(prompts, negative_prompt=negatives, generator=[gen(0), gen(1)], **kw)
    assert calls.rows == [4, 4, 4, 2, 2] and both.record.rows_per_step == calls.rows  # cutoff at step int(5 * 0.4) = 2
    for k in range(2):
        alone = flux_pipe(prompts[k], negative_prompt=negatives[k], generator=gen(k), **kw)
        assert np.abs(both.images[k] - alone.images[0]).max() <= 1e-4
    full = flux_pipe(prompts, negative_prompt=negatives, generator=[gen(0), gen(1)], **{**kw, "callback_on_step_end": None})
    assert np.abs(full.images - both.images).max() > 1e-4  # the cutoff changed the images
    # the distilled guidance embedding is untouched by the cutoff: every step still sees guidance_scale
    seen = []
    flux_pipe(prompts, negative_prompt=negatives, generator=[gen(0), gen(1)], **{**kw, "callback_on_step_end": [
        cb, lambda p, i, t, kwargs: seen.append(kwargs["guidance"].tolist())]},
              callback_on_step_end_tensor_inputs=["guidance"])
    assert seen == [[4.0, 4.0]] * 5


def test_true_cfg_cutoff_keeps_the_classic_steps_before_it(flux_folder):
    """Up to the cutoff step the run is the classic true-CFG run, step for step; from the next step it is not."""
    ours, theirs = _pair("FluxPipeline", flux_folder)
    kw = {**BASE, "num_inference_steps": 5, "true_cfg_scale": 3.0, "negative_prompt": "blue", "output_type": "latent"}
    mine, classic = [], []
    ours("a cat", **kw, generator=gen(), callback_on_step_end=[
        FluxCFGCutoffCallback(cutoff_step_index=2), lambda p, i, t, k: mine.append(k["latents"].clone())])
    theirs("a cat", **kw, generator=gen(), callback_on_step_end=lambda p, i, t, k: classic.append(k["latents"].clone()) or k)
    for k in range(3):
        assert torch.allclose(mine[k], classic[k], atol=1e-5)
    assert not torch.allclose(mine[3], classic[3], atol=1e-4)


def test_distilled_guidance_schedule_reaches_the_transformer(flux_pipe):
    seen = []
    hook = flux_pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["guidance"].tolist()), with_kwargs=True)
    try:
        out = flux_pipe("a cat", **{**BASE, "num_inference_steps": 4},
                        callback_on_step_end=GuidanceScheduleCallback([1.0, 2.0, 3.5, 6.0]), generator=gen())
    finally:
        hook.remove()
    assert seen == [[1.0], [2.0], [3.5], [6.0]] and out.record.rows_per_step == [1, 1, 1, 1]
    assert flux_pipe.guidance_scale == 6.0  # the classic attribute reads the run's last distilled value
    constant = flux_pipe("a cat", **{**BASE, "num_inference_steps": 4, "guidance_scale": 3.5}, generator=gen()).images
    assert np.abs(out.images - constant).max() > 1e-4


def test_guidance_interval_is_true_cfgs(flux_pipe, count_calls):
    calls = count_calls(flux_pipe)
    seen = []
    flux_pipe(["a cat", "a dog"], negative_prompt=["red", "blue"], true_cfg_scale=3.0,
              **{**BASE, "num_inference_steps": 6}, generator=gen(),
              callback_on_step_end=[GuidanceIntervalCallback(start_step=2, end_step=4),
                                    lambda p, i, t, kw: seen.append((p.guidance_scale, p.true_cfg_scale))])
    assert calls.rows == [2, 2, 4, 4, 2, 2]
    # inside a callback the classic names read the run: guidance_scale is the distilled value, never touched here
    assert [g for g, _ in seen] == [4.0] * 6 and [c for _, c in seen] == [0.0, 3.0, 3.0, 0.0, 0.0, 0.0]


def test_true_cfg_needs_a_negative_as_in_the_classic_pipeline(flux_pipe, count_calls):
    calls = count_calls(flux_pipe)
    out = flux_pipe("a cat", true_cfg_scale=4.0, **BASE, generator=gen())
    assert calls.rows == [1, 1, 1] and out.record.guidance == "distilled"
    out = flux_pipe("a cat", negative_prompt="", true_cfg_scale=4.0, **BASE, generator=gen())
    assert out.record.rows_per_step == [2, 2, 2] and out.record.guidance == "distilled+true-cfg"


def test_true_cfg_turned_on_by_a_callback(flux_pipe):
    """Negatives given at true_cfg_scale 1 are kept: a callback can turn true CFG on later."""

    def on_at_1(p, i, t, kw):
        if i == 0:
            p.true_cfg_scale = 3.0
        return kw

    out = flux_pipe("a cat", negative_prompt="blue", **BASE, generator=gen(), callback_on_step_end=on_at_1)
    assert out.record.rows_per_step == [1, 2, 2]


def test_a_callback_can_set_per_image_guidance(flux_pipe):
    seen = []
    hook = flux_pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["guidance"].tolist()), with_kwargs=True)

    def per_image(p, i, t, kw):
        return {"guidance": torch.tensor([1.0, 8.0])} if i == 0 else None

    try:
        flux_pipe(["a cat", "a dog"], negative_prompt=["red", "blue"], true_cfg_scale=2.0, **BASE, generator=gen(),
                  callback_on_step_end=per_image, callback_on_step_end_tensor_inputs=["guidance"])
    finally:
        hook.remove()
    assert seen == [[4.0] * 4, [1.0, 8.0, 1.0, 8.0], [1.0, 8.0, 1.0, 8.0]]  # uncond rows first, same per image


def test_interrupted_run_decodes_the_x0_estimate(flux_pipe):
    def stop(p, i, t, kw):
        if i == 0:
            p._interrupt = True

    out = flux_pipe("a cat", **BASE, generator=gen(), callback_on_step_end=stop)
    noisy = flux_pipe("a cat", **BASE, generator=gen(), callback_on_step_end=stop, interrupt_output="latents")
    assert out.interrupted and out.images.shape == noisy.images.shape == (1, 8, 8, 3)
    assert np.abs(out.images - noisy.images).max() > 1e-3


def test_preview_unpacks_the_latents(flux_pipe):
    from stepdiff.preview import LatentRGBTable, PreviewCallback, table_for

    table = LatentRGBTable("one-channel", ((0.5, -0.5, 0.25),), (0.0, 0.0, 0.0), "test")
    frames = []
    preview = PreviewCallback(table=table, method="linear", on_image=lambda image, i, t: frames.append(image))
    seen = []
    flux_pipe("a cat", **{**BASE, "height": 16, "width": 8}, generator=gen(),
              callback_on_step_end=[preview, lambda p, i, t, kw: seen.append(p.spatial_latents(kw["denoised"]))],
              callback_on_step_end_tensor_inputs=["denoised"])
    assert [f.size for f in frames] == [(8, 16)] * 3  # width x height of the unpacked (1, 16, 8) latents
    expected = table.to_image(seen[-1][0])
    assert np.array_equal(np.asarray(frames[-1]), np.asarray(expected))
    with pytest.raises(ValueError, match="has 16 channels but this model.s latents have 1"):  # the built-in Flux table
        PreviewCallback(method="linear", table=table_for(_FakeFlux())).on_run_start(flux_pipe)


class _FakeFlux:
    """A pipeline whose VAE looks like FLUX.1's (16 channels, scaling 0.3611): table_for picks the Flux table."""

    class config:
        _name_or_path = None

    class vae:
        class config:
            latent_channels, scaling_factor = 16, 0.3611


def test_builtin_flux_table_is_the_referenced_one():
    from stepdiff.preview import table_for

    table = table_for(_FakeFlux())
    assert table.name == "flux" and table.channels == 16 and "InvokeAI" in table.source


def test_first_block_cache_on_flux_is_exact_at_0_and_skips_blocks(flux_folder):
    from stepdiff.callbacks import FirstBlockCacheCallback
    from stepdiff.testing import make_tiny_flux

    pipe = stepdiff.FluxPipeline.from_pretrained(flux_folder)
    pipe.set_progress_bar_config(disable=True)
    kw = {**BASE, "num_inference_steps": 8, "true_cfg_scale": 2.0}
    prompts = dict(prompt=["a cat", "a dog"], negative_prompt=["red", "blue"])
    full = pipe(**prompts, **kw, generator=gen())
    exact = pipe(**prompts, **kw, generator=gen(), callback_on_step_end=FirstBlockCacheCallback(0.0))
    assert np.array_equal(full.images, exact.images) and exact.record.blocks_skipped == 0
    cached = pipe(**prompts, **kw, generator=gen(), callback_on_step_end=FirstBlockCacheCallback(1.0))
    assert cached.record.blocks_skipped > 0 and cached.record.cached_calls > 0
    # per image: a batch of 2 caches each image as it is cached alone
    deep = make_tiny_flux(flux_folder.parent / "deeper", guidance_embeds=True, layers=2, single_layers=2)
    pipe = stepdiff.FluxPipeline.from_pretrained(deep)
    pipe.set_progress_bar_config(disable=True)
    both = pipe(**prompts, **kw, generator=[gen(0), gen(1)], callback_on_step_end=FirstBlockCacheCallback(0.3))
    for k in range(2):
        alone = pipe(prompt=prompts["prompt"][k], negative_prompt=prompts["negative_prompt"][k], **kw, generator=gen(k),
                     callback_on_step_end=FirstBlockCacheCallback(0.3))
        assert np.abs(both.images[k] - alone.images[0]).max() <= 1e-4


def test_unet_policies_are_refused_on_flux(flux_pipe):
    from stepdiff.callbacks import DeepCacheCallback

    with pytest.raises(ValueError, match="FluxPipeline has no UNet"):
        flux_pipe("a cat", **BASE, callback_on_step_end=DeepCacheCallback(2))


def test_encode_prompt_matches_the_classic(flux_folder):
    ours, theirs = _pair("FluxPipeline", flux_folder)
    kw = dict(prompt=["a cat", "a dog"], prompt_2=["a red car", "a road"], device="cpu", num_images_per_prompt=2,
              max_sequence_length=48)
    a, b = ours.encode_prompt(**kw), theirs.encode_prompt(**kw)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)


def test_preview_with_a_tiny_decoder_the_user_gives(flux_pipe, tmp_path):
    """A TAEF1-style decoder (here a random one for the tiny VAE: 1 channel, 1x) previews the unpacked x0."""
    from stepdiff.preview import PreviewCallback, tiny_decode
    from stepdiff.testing import make_tiny_preview_decoder

    folder = make_tiny_preview_decoder(tmp_path / "taef", latent_channels=1, scale_factor=1)
    frames, seen = [], []
    preview = PreviewCallback(method="tiny", tiny_decoder=folder, on_image=lambda image, i, t: frames.append(image))
    flux_pipe("a cat", **{**BASE, "height": 16, "width": 8}, generator=gen(),
              callback_on_step_end=[preview, lambda p, i, t, kw: seen.append(p.spatial_latents(kw["denoised"]))],
              callback_on_step_end_tensor_inputs=["denoised"])
    assert preview.resolved_method == "tiny" and [f.size for f in frames] == [(8, 16)] * 3
    expected = tiny_decode(preview._tiny, seen[-1][:1])[0]
    got = torch.from_numpy(np.asarray(frames[-1])).permute(2, 0, 1).float() / 127.5 - 1
    assert (got - expected).abs().max() <= 1 / 127.5 + 1e-6


# ------------------------------------------------------------------ IP-Adapter (diffusers' FluxIPAdapterMixin)

REF = test_image(32, seed=11)[0]
NEG_REF = test_image(32, seed=12)[0]
IP_BASE = {**BASE, "height": 16, "width": 16}
IP_CASES = {
    "image-batch2": dict(prompt=["a cat", "a dog"], ip_adapter_image=REF, num_images_per_prompt=2),
    "true-cfg-batch2": dict(prompt=["a cat", "a dog"], negative_prompt=["red", "blue"], true_cfg_scale=3.0,
                            ip_adapter_image=REF),  # the negative rows get the classic black image
    "true-cfg-negative-image": dict(prompt=["a cat", "a dog"], negative_prompt=["red", "blue"], true_cfg_scale=3.0,
                                    ip_adapter_image=REF, negative_ip_adapter_image=NEG_REF),
    "true-cfg-embeds": dict(prompt="a cat", negative_prompt="", true_cfg_scale=4.0,
                            ip_adapter_image_embeds=[torch.randn(1, 1, 32, generator=gen(5))],
                            negative_ip_adapter_image_embeds=[torch.randn(1, 1, 32, generator=gen(6))]),
}
_ip_cache: dict = {}


@pytest.fixture(scope="module")
def flux_ip_folder(flux_folder, tmp_path_factory):
    from stepdiff.testing import make_tiny_ip_adapter

    return make_tiny_ip_adapter(tmp_path_factory.mktemp("flux-ip"), flux_folder)


def _load_ip(pipe, folder):
    pipe.load_ip_adapter(str(folder), weight_name="ip-adapter.safetensors", image_encoder_dtype=torch.float32,
                         image_encoder_pretrained_model_name_or_path=str(folder / "image_encoder"))
    return pipe


def _ip_pair(name, flux_folder, flux_ip_folder):
    if name not in _ip_cache:
        _ip_cache[name] = tuple(_load_ip(p, flux_ip_folder) for p in _pair(name, flux_folder))
    ours, theirs = _ip_cache[name]
    for p in (ours, theirs):
        p.set_ip_adapter_scale(1.0)
    return ours, theirs


def _gens(kw):
    n = (len(kw["prompt"]) if isinstance(kw["prompt"], list) else 1) * kw.get("num_images_per_prompt", 1)
    return [gen(k) for k in range(n)]


@pytest.mark.parametrize("name,case", [("FluxPipeline", c) for c in IP_CASES] + [
    ("FluxImg2ImgPipeline", "true-cfg-batch2"), ("FluxInpaintPipeline", "image-batch2")])
def test_ip_adapter_parity_with_the_classic_classes(flux_folder, flux_ip_folder, name, case):
    ours, theirs = _ip_pair(name, flux_folder, flux_ip_folder)
    kw = {**IP_BASE, **KINDS[name], **IP_CASES[case]}
    a = ours(**kw, generator=_gens(kw)).images
    b = theirs(**kw, generator=_gens(kw)).images
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4
    ours.set_ip_adapter_scale(0.0)
    assert np.abs(ours(**kw, generator=_gens(kw)).images - a).max() > 1e-2  # the adapter matters: parity not trivial


def test_ip_adapter_negative_image_reaches_the_negative_rows(flux_folder, flux_ip_folder, count_calls):
    ours, _ = _ip_pair("FluxPipeline", flux_folder, flux_ip_folder)
    kw = {**IP_BASE, **IP_CASES["true-cfg-batch2"]}
    seen = []
    hook = ours.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(
        (k["hidden_states"].shape[0], [e.shape for e in k["joint_attention_kwargs"]["ip_adapter_image_embeds"]])),
        with_kwargs=True)
    try:
        black = ours(**kw, generator=_gens(kw)).images
    finally:
        hook.remove()
    assert seen == [(4, [torch.Size([4, 1, 32])])] * 3  # [negative; positive] rows batched in one call
    given = ours(**kw, negative_ip_adapter_image=NEG_REF, generator=_gens(kw)).images
    assert np.abs(given - black).max() > 1e-3


def test_ip_adapter_with_true_cfg_cutoff_at_batch_2_equals_each_prompt_alone(flux_folder, flux_ip_folder, count_calls):
    ours, _ = _ip_pair("FluxPipeline", flux_folder, flux_ip_folder)
    calls = count_calls(ours)
    prompts, negatives = ["a photo of a cat", "a red car"], ["blue", "a dog"]
    kw = {**IP_BASE, "num_inference_steps": 5, "true_cfg_scale": 3.0, "ip_adapter_image": REF,
          "negative_ip_adapter_image": NEG_REF, "callback_on_step_end": FluxCFGCutoffCallback(0.4)}
    both = ours(prompts, negative_prompt=negatives, generator=[gen(0), gen(1)], **kw)
    assert calls.rows == [4, 4, 4, 2, 2]  # the image embeddings shrink with the rows
    for k in range(2):
        alone = ours(prompts[k], negative_prompt=negatives[k], generator=gen(k), **kw)
        assert np.abs(both.images[k] - alone.images[0]).max() <= 1e-4


def test_ip_adapter_scale_cutoff_is_the_runs_on_flux(flux_folder, flux_ip_folder):
    from diffusers import callbacks as classic

    from stepdiff.callbacks import IPAdapterScaleCutoffCallback

    ours, theirs = _ip_pair("FluxPipeline", flux_folder, flux_ip_folder)
    kw = {**IP_BASE, "prompt": "a cat", "ip_adapter_image": REF, "num_inference_steps": 4}
    fresh = ours(**kw, generator=gen()).images
    cut = ours(**kw, generator=gen(), callback_on_step_end=IPAdapterScaleCutoffCallback(cutoff_step_ratio=0.5)).images
    assert np.array_equal(ours(**kw, generator=gen()).images, fresh)  # scale 0 belonged to the cut run only
    assert np.abs(cut - fresh).max() > 1e-3
    theirs_cut = theirs(**kw, generator=gen(),
                        callback_on_step_end=classic.IPAdapterScaleCutoffCallback(cutoff_step_ratio=0.5)).images
    assert np.abs(cut - theirs_cut).max() <= 1e-4  # within the run both do the same


@pytest.mark.parametrize("bad,message", [
    (dict(ip_adapter_image=[REF, REF]), "ip_adapter_image has 2 images but 1 IP-Adapters are loaded"),
    (dict(ip_adapter_image=REF, ip_adapter_image_embeds=[torch.zeros(1, 1, 32)]),
     "pass at most one of ip_adapter_image and ip_adapter_image_embeds"),
    (dict(ip_adapter_image=REF, negative_ip_adapter_image_embeds=torch.zeros(1, 1, 32)),
     r"negative_ip_adapter_image_embeds must be a list of 1 tensors \(one per loaded IP-Adapter\), got Tensor"),
    (dict(ip_adapter_image_embeds=[torch.zeros(2, 1, 32)]),
     r"ip_adapter_image_embeds\[0\] must be a tensor of shape \(1, images, dim\).*got \(2, 1, 32\)"),
    (dict(negative_prompt="red"), "this pipeline has an IP-Adapter loaded: pass ip_adapter_image"),
])
def test_ip_adapter_bad_inputs_fail_before_model_work(flux_folder, flux_ip_folder, count_calls, bad, message):
    ours, _ = _ip_pair("FluxPipeline", flux_folder, flux_ip_folder)
    calls, encoder = count_calls(ours), []
    hook = ours.image_encoder.register_forward_pre_hook(lambda *a: encoder.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            ours("a cat", **{**IP_BASE, **bad})
    finally:
        hook.remove()
    assert calls.calls == 0 and not encoder


def test_ip_adapter_embeds_without_an_image_encoder(flux_folder, flux_ip_folder, count_calls):
    """Loaded without an image encoder (as the classic tests do), a side the run uses needs its embeddings."""
    pipe = stepdiff.FluxPipeline.from_pretrained(flux_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(flux_ip_folder), weight_name="ip-adapter.safetensors",
                         image_encoder_pretrained_model_name_or_path=None)
    calls = count_calls(pipe)
    embeds = [torch.randn(1, 1, 32, generator=gen(5))]
    kw = {**IP_BASE, "prompt": "a cat", "negative_prompt": "red", "true_cfg_scale": 3.0, "ip_adapter_image_embeds": embeds}
    with pytest.raises(ValueError, match="negative_ip_adapter_image_embeds is needed for true CFG's negative rows"):
        pipe(**kw)
    with pytest.raises(ValueError, match="ip_adapter_image needs an image encoder"):
        pipe("a cat", **IP_BASE, ip_adapter_image=REF)
    assert calls.calls == 0
    out = pipe(**kw, negative_ip_adapter_image_embeds=embeds, generator=gen())
    assert out.record.rows_per_step == [2, 2, 2]
    pipe.unload_ip_adapter()
    plain = pipe("a cat", **{**IP_BASE, "negative_prompt": "red", "true_cfg_scale": 3.0}, generator=gen()).images
    assert np.abs(plain - out.images).max() > 1e-3
