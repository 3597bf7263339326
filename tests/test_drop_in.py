"""Everyday code written for the classic pipelines: guidance-distilled (LCM) UNets, encode_prompt, legacy
scheduler configs, Align-Your-Steps timesteps, FreeU and QKV fusion, SD3's mu; parity on identical weights."""

import warnings

import diffusers
import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, UNet2DConditionModel

import stepdiff
from stepdiff.callbacks import CFGCutoffCallback

from .conftest import gen

TOL = 1e-4


def _pair(ours_cls, theirs_cls, folder):
    ours = ours_cls.from_pretrained(folder)
    kwargs = {"safety_checker": None} if theirs_cls is diffusers.StableDiffusionPipeline else {}
    theirs = theirs_cls.from_pretrained(folder, **kwargs)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


def _both(ours, theirs, **kw):
    kw = {"prompt": "a photo of a cat", "num_inference_steps": 4, "output_type": "np", **kw}
    return ours(generator=gen(0), **kw), theirs(generator=gen(0), **kw).images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_guidance_distilled_unet_matches_and_runs_one_row_per_image(request, family):
    folder = request.getfixturevalue(f"{family}_folder")
    classes = {"sd": (stepdiff.StableDiffusionPipeline, diffusers.StableDiffusionPipeline),
               "sdxl": (stepdiff.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline)}[family]
    ours, theirs = _pair(*classes, folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**ours.unet.config, "time_cond_proj_dim": 32})
    for p in (ours, theirs):
        p.unet = unet
        p.scheduler = LCMScheduler.from_config(p.scheduler.config)
    out, expected = _both(ours, theirs, guidance_scale=6.0)
    assert np.abs(out.images - expected).max() <= TOL
    out = ours("a photo of a cat", num_inference_steps=4, guidance_scale=6.0, callback_on_step_end=CFGCutoffCallback(0.5),
               output_type="np", generator=gen(0))  # nothing to cut: the same images, still one row per image
    assert np.abs(out.images - expected).max() <= TOL
    assert out.record.rows_per_step == [1, 1, 1, 1] and out.record.guidance == "distilled"


def test_encode_prompt_has_the_classic_signature_and_values(sd_folder, sdxl_folder, sd3_folder):
    ours, theirs = _pair(stepdiff.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, sd_folder)
    a = ours.encode_prompt("a photo of a cat", "cpu", 2, True, negative_prompt="a dog")
    b = theirs.encode_prompt("a photo of a cat", "cpu", 2, True, negative_prompt="a dog")
    assert all(torch.allclose(x, y, atol=TOL) for x, y in zip(a, b)) and a[0].shape[0] == 2
    assert ours.encode_prompt("a photo of a cat", "cpu", 1, False)[1] is None
    # precomputed embeddings go back into the pipeline, as classic code does
    pe, ne = ours.encode_prompt("a photo of a cat", "cpu", 1, True)
    direct = ours("a photo of a cat", num_inference_steps=3, output_type="np", generator=gen(0)).images
    via = ours(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=3, output_type="np", generator=gen(0)).images
    assert np.abs(direct - via).max() <= TOL
    for ours_cls, theirs_cls, folder in ((stepdiff.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline, sdxl_folder),
                                         (stepdiff.StableDiffusion3Pipeline, diffusers.StableDiffusion3Pipeline, sd3_folder)):
        ours, theirs = _pair(ours_cls, theirs_cls, folder)
        kw = dict(prompt="a photo of a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                  negative_prompt="a dog", prompt_2=None)
        if ours_cls is stepdiff.StableDiffusion3Pipeline:
            kw["prompt_3"] = None
        a, b = ours.encode_prompt(**kw), theirs.encode_prompt(**kw)
        assert len(a) == 4 and all(torch.allclose(x, y, atol=TOL) for x, y in zip(a, b)), ours_cls.__name__


def test_legacy_scheduler_config_is_normalised_with_a_warning(sd_folder):
    ours, theirs = _pair(stepdiff.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, sd_folder)
    components = {k: v for k, v in ours.components.items()}
    components["scheduler"] = diffusers.DDIMScheduler()  # steps_offset 0, clip_sample True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = stepdiff.StableDiffusionPipeline(**components)
    assert any("steps_offset" in str(w.message) for w in caught) and any("clip_sample" in str(w.message) for w in caught)
    assert ours.scheduler.config.steps_offset == 1 and ours.scheduler.config.clip_sample is False
    theirs = diffusers.StableDiffusionPipeline(**{**theirs.components, "scheduler": diffusers.DDIMScheduler()})
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    out, expected = _both(ours, theirs)
    assert np.abs(out.images - expected).max() <= TOL


def test_align_your_steps_timesteps_without_num_inference_steps(sd_folder):
    from diffusers.schedulers import AysSchedules

    ours, theirs = _pair(stepdiff.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, sd_folder)
    for p in (ours, theirs):
        p.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(p.scheduler.config)
    ts = AysSchedules["StableDiffusionTimesteps"]
    out, expected = _both(ours, theirs, num_inference_steps=None, timesteps=ts)
    assert np.abs(out.images - expected).max() <= TOL and out.record.steps_total == len(ts)
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        ours("a photo of a cat", num_inference_steps=None)


def test_freeu_and_qkv_fusion_match(sd_folder):
    ours, theirs = _pair(stepdiff.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, sd_folder)
    for p in (ours, theirs):
        p.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    out, expected = _both(ours, theirs)
    assert np.abs(out.images - expected).max() <= TOL
    plain = ours("a photo of a cat", num_inference_steps=4, output_type="np", generator=gen(0)).images
    ours.disable_freeu()
    assert not np.array_equal(plain, ours("a photo of a cat", num_inference_steps=4, output_type="np", generator=gen(0)).images)
    before = ours("a photo of a cat", num_inference_steps=4, output_type="np", generator=gen(0)).images
    ours.fuse_qkv_projections()
    fused = ours("a photo of a cat", num_inference_steps=4, output_type="np", generator=gen(0)).images
    ours.unfuse_qkv_projections()
    assert np.abs(before - fused).max() <= 1e-4


def test_vae_slicing_and_tiling_keep_the_images(sd_folder):
    ours = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder)
    ours.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a photo of a cat", "a red car"], num_inference_steps=3, output_type="np")
    plain = ours(generator=gen(0), **kw).images
    ours.vae.enable_slicing()  # diffusers 0.42 moved slicing and tiling onto the VAE
    assert np.abs(ours(generator=gen(0), **kw).images - plain).max() <= 1e-4


def test_sd3_mu_is_passed_to_the_scheduler(sd3_folder):
    ours, theirs = _pair(stepdiff.StableDiffusion3Pipeline, diffusers.StableDiffusion3Pipeline, sd3_folder)
    for p in (ours, theirs):
        p.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(p.scheduler.config, use_dynamic_shifting=True)
    out, expected = _both(ours, theirs, mu=0.8)
    assert np.abs(out.images - expected).max() <= TOL
    with pytest.raises(ValueError, match="mu must be None or a finite number"):
        ours("a photo of a cat", mu=float("nan"))


def test_textual_inversion_matches(sd_folder, tmp_path):
    from safetensors.torch import save_file

    ours, theirs = _pair(stepdiff.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, sd_folder)
    torch.manual_seed(0)
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "toy.safetensors")  # a two-vector embedding
    for p in (ours, theirs):
        p.load_textual_inversion(tmp_path / "toy.safetensors", token="<toy>")
    out, expected = _both(ours, theirs, prompt="a photo of a <toy>")
    assert np.abs(out.images - expected).max() <= TOL
    plain = ours("a photo of a cat", num_inference_steps=4, output_type="np", generator=gen(0)).images
    assert np.abs(out.images - plain).max() > 1e-3


def test_sd3_skip_layer_guidance_matches(sd3_folder):
    ours, theirs = _pair(stepdiff.StableDiffusion3Pipeline, diffusers.StableDiffusion3Pipeline, sd3_folder)
    kw = dict(num_inference_steps=10, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
              skip_layer_guidance_stop=0.5)
    out, expected = _both(ours, theirs, **kw)
    assert np.abs(out.images - expected).max() <= TOL
    # steps 1-4 run the conditional rows once more with layer 1 skipped
    assert out.record.rows_per_step == [2, 3, 3, 3, 3, 2, 2, 2, 2, 2] and out.record.guidance == "cfg+slg"
    with pytest.raises(ValueError, match=r"skip_guidance_layers must be a non-empty list of layer indices in \[0, 2\)"):
        ours("a cat", skip_guidance_layers=[5])


# ---------------------------------------------------------------- gaps found by the classic library's own fast tests

def _inpaint_inputs(size=32):
    from .conftest import test_image

    image, mask = test_image(size)
    return image, mask


@pytest.mark.parametrize("unet", ["4ch", "9ch"])
def test_inpainting_image_given_as_latents(request, unet):
    """(1) ``image`` as VAE latents (with ``masked_image_latents`` and a picture-size mask) was refused by the size
    check (latent size against the mask's picture size); it equals the run from the picture, randomness included."""
    folder = request.getfixturevalue("sd_folder" if unet == "4ch" else "sd_inpaint_folder")
    pipe = stepdiff.StableDiffusionInpaintPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image, mask_image = _inpaint_inputs()
    kw = dict(prompt="a photo of a cat", num_inference_steps=3, strength=0.9, output_type="np")
    from_picture = pipe(image=image, mask_image=mask_image, generator=gen(0), **kw).images
    # As the classic test: the image's latents drawn with the generator, then the noise, then the masked image's.
    picture = pipe.image_processor.preprocess(image)
    mask = pipe.mask_processor.preprocess(mask_image)
    g = gen(0)
    latents = pipe._encode_vae_image(picture, g)
    torch.randn((1, 4, 16, 16), generator=g)
    masked = pipe._encode_vae_image(picture * (mask < 0.5), g)
    g = gen(0)
    torch.randn((1, 4, 16, 16), generator=g)  # the posterior sample the run from latents does not draw
    from_latents = pipe(image=latents, mask_image=mask, masked_image_latents=masked, generator=g, **kw).images
    assert np.abs(from_picture - from_latents).max() <= TOL
    with pytest.raises(ValueError, match=r"latents cannot be resized"):
        pipe(image=latents, mask_image=mask, masked_image_latents=masked, height=64, **kw)
    if unet == "9ch":
        with pytest.raises(ValueError, match="pass masked_image_latents too"):
            pipe(image=latents, mask_image=mask, **kw)


@pytest.mark.parametrize("cls", ["StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline"])
def test_strength_leaving_no_step_raises_under_pndm(sd_folder, count_calls, cls):
    """(2) PNDM's schedule has one timestep more than it has steps: a strength that leaves 0 steps ran that lone
    timestep instead of raising, as the classic pipelines do."""
    pipe = getattr(stepdiff, cls).from_pretrained(sd_folder)
    pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    calls = count_calls(pipe)
    image, mask = _inpaint_inputs()
    extra = {"mask_image": mask} if "Inpaint" in cls else {}
    with pytest.raises(ValueError, match="strength=0.01 leaves no denoising step at num_inference_steps=2"):
        pipe("a cat", image=image, strength=0.01, num_inference_steps=2, **extra)
    assert calls.calls == 0
    out = pipe("a cat", image=image, strength=0.5, num_inference_steps=2, output_type="latent", **extra)
    assert out.record.steps_total == 2  # 1 step left: PNDM's last two timesteps, as in the classic pipelines


def test_image_processor_is_assignable(sd_folder):
    """(3) ``pipe.image_processor = ...`` (the classic test_latents_input) failed: a read-only property."""
    from diffusers.image_processor import VaeImageProcessor

    pipe = stepdiff.StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    processor = VaeImageProcessor(do_resize=False, do_normalize=False)
    pipe.image_processor = processor
    assert pipe.image_processor is processor
    picture = torch.rand(1, 3, 32, 32, generator=gen(3))
    out = pipe("a cat", image=picture, num_inference_steps=2, generator=gen(0), output_type="np").images
    g = gen(0)
    latents = pipe.vae.encode(picture).latent_dist.sample(g) * pipe.vae.config.scaling_factor
    same = pipe("a cat", image=latents, num_inference_steps=2, generator=g, output_type="np").images
    assert np.abs(out - same).max() <= TOL
    inpaint = stepdiff.StableDiffusionInpaintPipeline.from_pretrained(sd_folder)
    inpaint.mask_processor = processor
    assert inpaint.mask_processor is processor


@pytest.mark.parametrize("family,cls", [
    ("sd", "StableDiffusionInpaintPipeline"), ("sdxl", "StableDiffusionXLPipeline"),
    ("sdxl", "StableDiffusionXLImg2ImgPipeline"), ("sd", "StableDiffusionControlNetPipeline"),
    ("sdxl", "StableDiffusionXLControlNetPipeline"), ("sd3", "StableDiffusion3InpaintPipeline"),
])
def test_encode_prompt_on_a_pipeline_holding_only_its_text_encoders(request, family, cls, count_calls):
    """(4) The classic test_encode_prompt_works_in_isolation: a pipeline built with its text encoders only (every other
    component None, controlnet included) runs encode_prompt; SDXL read unet.config there, and the ControlNet
    constructors refused controlnet=None. Its embeddings then drive a pipeline built without text encoders."""
    from diffusers import ControlNetModel

    folder = request.getfixturevalue(f"{family}_folder")
    kwargs = {}
    if "ControlNet" in cls:
        kwargs["controlnet"] = ControlNetModel.from_pretrained(request.getfixturevalue(f"{family}_controlnet_folder"))
    full = getattr(stepdiff, cls).from_pretrained(folder, **kwargs)
    full.set_progress_bar_config(disable=True)
    components = dict(full.components)
    text_only = getattr(stepdiff, cls)(**{k: (v if ("text" in k or "tokenizer" in k) else None)
                                          for k, v in components.items()})
    encoded = text_only.encode_prompt("a photo of a cat", device="cpu", num_images_per_prompt=1,
                                      do_classifier_free_guidance=True, negative_prompt="a dog")
    expected = full.encode_prompt("a photo of a cat", device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=True, negative_prompt="a dog")
    assert len(encoded) == len(expected) and all(torch.equal(a, b) for a, b in zip(encoded, expected))
    denoiser = "transformer" if family == "sd3" else "unet"
    with pytest.raises(ValueError, match=f"built without {denoiser}"):
        text_only("a cat", num_inference_steps=2)
    # The embeddings drive a pipeline without text encoders to the full pipeline's picture.
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    no_text = getattr(stepdiff, cls)(**{k: (None if ("text" in k or "tokenizer" in k) else v)
                                        for k, v in components.items()})
    no_text.set_progress_bar_config(disable=True)
    image, mask = _inpaint_inputs()
    extra = {"sd": {}, "sdxl": {}, "sd3": {}}[family]
    if "Inpaint" in cls:
        extra.update(image=image, mask_image=mask, strength=1.0)
    elif "Img2Img" in cls:
        extra.update(image=image, strength=1.0)
    if "ControlNet" in cls:
        extra["image"] = torch.rand(1, 3, 32, 32, generator=gen(5))
    kw = dict(num_inference_steps=2, output_type="np", negative_prompt=None, **extra)
    a = no_text(**dict(zip(names, encoded)), generator=gen(0), **kw).images
    b = full("a photo of a cat", negative_prompt="a dog", generator=gen(0),
             **{k: v for k, v in kw.items() if k != "negative_prompt"}).images
    assert np.abs(a - b).max() <= TOL


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_prompt_over_77_tokens_warns_with_what_was_cut(request, family):
    """(5) A prompt over 77 CLIP tokens is cut; the classic pipelines say so, with the cut part, on their module's
    logger (so diffusers' verbosity settings apply); stepdiff said nothing."""
    import logging

    from diffusers.utils import logging as dlogging

    name = {"sd": "stable_diffusion.pipeline_stable_diffusion", "sdxl": "stable_diffusion_xl.pipeline_stable_diffusion_xl",
            "sd3": "stable_diffusion_3.pipeline_stable_diffusion_3"}[family]
    logger = dlogging.get_logger(f"diffusers.pipelines.{name}")
    cls = {"sd": stepdiff.StableDiffusionPipeline, "sdxl": stepdiff.StableDiffusionXLPipeline,
           "sd3": stepdiff.StableDiffusion3Pipeline}[family]
    pipe = cls.from_pretrained(request.getfixturevalue(f"{family}_folder"))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        long = pipe.encode_prompt(" ".join(["cat"] * 100), device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=True)
        clip = [r for r in records if "CLIP can only handle sequences up to 77 tokens" in r]
        # 100 words + the start and end tokens: 102 tokens, of which the 77th to the 101st (25) are cut
        assert len(clip) >= 1 and clip[0].rsplit(": ", 1)[1].count("cat") == 25, records
        records.clear()
        short = pipe.encode_prompt(" ".join(["cat"] * 25), device="cpu", num_images_per_prompt=1,
                                   do_classifier_free_guidance=True)
        assert records == [] and long[0].shape == short[0].shape
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_torch_dtype_deprecation_warning_reaches_the_caller(sd_folder):
    """(6) diffusers deprecates ``torch_dtype`` for ``dtype`` with a FutureWarning, which from_pretrained swallowed;
    stepdiff's own float32 default goes as ``dtype`` and warns about nothing."""
    with pytest.warns(FutureWarning, match="Please use `dtype` instead"):
        pipe = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder, torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16  # still honoured
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder).unet.dtype == torch.float32
        assert stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder, dtype=torch.float16).unet.dtype == torch.float16


@pytest.mark.parametrize("ours_name,folder", [
    ("StableDiffusionInpaintPipeline", "sd_folder"), ("StableDiffusionXLInpaintPipeline", "sdxl_folder"),
    ("StableDiffusion3InpaintPipeline", "sd3_folder"),
])
def test_encode_vae_image_as_the_classic_helper(request, ours_name, folder):
    """(7) ``_encode_vae_image(image, generator)`` (private, but the classic tests and user code call it) was missing
    on the inpainting pipelines; it gives the classic one's latents, one generator per row when a list."""
    folder = request.getfixturevalue(folder)
    ours = getattr(stepdiff, ours_name).from_pretrained(folder)
    theirs = getattr(diffusers, ours_name).from_pretrained(folder)
    images = torch.rand(2, 3, 32, 32, generator=gen(2)) * 2 - 1
    for generator in (lambda: gen(0), lambda: [gen(0), gen(1)]):
        a = ours._encode_vae_image(images, generator())
        b = theirs._encode_vae_image(images, generator())
        assert a.shape == b.shape and (a - b).abs().max() <= TOL
