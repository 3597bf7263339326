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
