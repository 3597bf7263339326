"""Image-to-image and inpainting: parity with the classic pipelines on identical tiny weights, the
base -> refiner hand-off, and what these kinds of run add (strength, masks, the known region)."""

import diffusers
import numpy as np
import pytest
import torch

import stepdiff
from stepdiff.callbacks import CFGCutoffCallback, SD3CFGCutoffCallback, SDCFGCutoffCallback, SDXLCFGCutoffCallback

from .conftest import gen, test_image

SCHEDULERS = {
    "euler": diffusers.EulerDiscreteScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpm++2m": diffusers.DPMSolverMultistepScheduler,
}
TOL = 1e-4


def _pair(ours_cls, theirs_cls, folder, scheduler=None):
    ours = ours_cls.from_pretrained(folder)
    kwargs = {"safety_checker": None} if "safety_checker" in theirs_cls.__init__.__code__.co_varnames else {}
    theirs = theirs_cls.from_pretrained(folder, **kwargs)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
        if scheduler is not None:
            p.scheduler = SCHEDULERS[scheduler].from_config(p.scheduler.config)
    return ours, theirs


def _both(ours, theirs, **kw):
    a = ours(generator=gen(0), output_type="np", num_inference_steps=5, **kw).images
    b = theirs(generator=gen(0), output_type="np", num_inference_steps=5, **kw).images
    return a, b


PROMPTS = {1: "a photo of a cat", 2: ["a photo of a cat", "a red car"]}
IMAGE, MASK = test_image()

CASES = [
    # (id, ours, theirs, folder fixture, extra call arguments)
    ("sd-img2img", stepdiff.StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline, "sd_folder",
     dict(image=IMAGE, strength=0.7)),
    ("sd-inpaint-4ch", stepdiff.StableDiffusionInpaintPipeline, diffusers.StableDiffusionInpaintPipeline, "sd_folder",
     dict(image=IMAGE, mask_image=MASK)),
    ("sd-inpaint-9ch", stepdiff.StableDiffusionInpaintPipeline, diffusers.StableDiffusionInpaintPipeline,
     "sd_inpaint_folder", dict(image=IMAGE, mask_image=MASK, strength=0.8)),
    ("sdxl-img2img", stepdiff.StableDiffusionXLImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline, "sdxl_folder",
     dict(image=IMAGE, strength=0.6)),
    ("sdxl-img2img-start", stepdiff.StableDiffusionXLImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline,
     "sdxl_folder", dict(image=IMAGE, denoising_start=0.5)),
    ("sdxl-inpaint-4ch", stepdiff.StableDiffusionXLInpaintPipeline, diffusers.StableDiffusionXLInpaintPipeline,
     "sdxl_folder", dict(image=IMAGE, mask_image=MASK)),
    ("sdxl-inpaint-9ch", stepdiff.StableDiffusionXLInpaintPipeline, diffusers.StableDiffusionXLInpaintPipeline,
     "sdxl_inpaint_folder", dict(image=IMAGE, mask_image=MASK, strength=0.7)),
    ("sdxl-inpaint-4ch-start", stepdiff.StableDiffusionXLInpaintPipeline, diffusers.StableDiffusionXLInpaintPipeline,
     "sdxl_folder", dict(image=IMAGE, mask_image=MASK, denoising_start=0.5)),
    ("sdxl-inpaint-9ch-start", stepdiff.StableDiffusionXLInpaintPipeline, diffusers.StableDiffusionXLInpaintPipeline,
     "sdxl_inpaint_folder", dict(image=IMAGE, mask_image=MASK, denoising_start=0.3)),
]


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity_with_the_classic_pipelines(request, case, batch, scheduler):
    _, ours_cls, theirs_cls, fixture, extra = case
    ours, theirs = _pair(ours_cls, theirs_cls, request.getfixturevalue(fixture), scheduler)
    a, b = _both(ours, theirs, prompt=PROMPTS[batch], **extra)
    assert a.shape[0] == batch and np.abs(a - b).max() <= TOL


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_img2img_parity(sd3_folder, batch, shift):
    ours, theirs = _pair(stepdiff.StableDiffusion3Img2ImgPipeline, diffusers.StableDiffusion3Img2ImgPipeline, sd3_folder)
    for p in (ours, theirs):
        p.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(p.scheduler.config, shift=shift)
    a, b = _both(ours, theirs, prompt=PROMPTS[batch], image=IMAGE, strength=0.6)
    assert np.abs(a - b).max() <= TOL


def test_num_images_per_prompt_parity(sd_folder):
    ours, theirs = _pair(stepdiff.StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline, sd_folder)
    a, b = _both(ours, theirs, prompt="a photo of a cat", image=IMAGE, num_images_per_prompt=2)
    assert a.shape[0] == 2 and np.abs(a - b).max() <= TOL


REFINERS = {
    "img2img": (stepdiff.StableDiffusionXLImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline, {}),
    "inpaint": (stepdiff.StableDiffusionXLInpaintPipeline, diffusers.StableDiffusionXLInpaintPipeline,
                dict(mask_image=MASK)),
}


@pytest.mark.parametrize("refiner_kind", list(REFINERS))
def test_base_to_refiner_hand_off_matches_the_classic_pipelines(sdxl_folder, refiner_kind):
    """denoising_end on the base, denoising_start on the refiner: the "mixture of denoisers" recipe."""
    base, base_d = _pair(stepdiff.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline, sdxl_folder)
    ours_cls, theirs_cls, extra = REFINERS[refiner_kind]
    refiner, refiner_d = _pair(ours_cls, theirs_cls, sdxl_folder)
    kw = dict(prompt="a photo of a cat", num_inference_steps=10, **extra)
    base_kw = dict(prompt=kw["prompt"], num_inference_steps=10)
    ours_latents = base(**base_kw, denoising_end=0.7, output_type="latent", generator=gen(0))
    theirs_latents = base_d(**base_kw, denoising_end=0.7, output_type="latent", generator=gen(0)).images
    assert ours_latents.record.steps_total == 7 and torch.allclose(ours_latents.images, theirs_latents, atol=TOL)
    a = refiner(**kw, denoising_start=0.7, image=ours_latents.images, output_type="np", generator=gen(1))
    b = refiner_d(**kw, denoising_start=0.7, image=theirs_latents, output_type="np", generator=gen(1)).images
    assert a.record.steps_total == 3 and np.abs(a.images - b).max() <= TOL


def _sd(cls, folder):
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_cutoff_callbacks_work_at_batch_2_on_every_image_pipeline(sd_folder, sdxl_folder, sd3_folder):
    runs = [
        (stepdiff.StableDiffusionImg2ImgPipeline, sd_folder, SDCFGCutoffCallback, dict(image=IMAGE)),
        (stepdiff.StableDiffusionInpaintPipeline, sd_folder, SDCFGCutoffCallback, dict(image=IMAGE, mask_image=MASK)),
        (stepdiff.StableDiffusionXLImg2ImgPipeline, sdxl_folder, SDXLCFGCutoffCallback, dict(image=IMAGE, strength=1.0)),
        (stepdiff.StableDiffusionXLInpaintPipeline, sdxl_folder, SDXLCFGCutoffCallback, dict(image=IMAGE, mask_image=MASK)),
        (stepdiff.StableDiffusion3Img2ImgPipeline, sd3_folder, SD3CFGCutoffCallback, dict(image=IMAGE, strength=1.0)),
    ]
    for cls, folder, callback, extra in runs:
        pipe = _sd(cls, folder)
        # Inpainting encodes the image once, with the first generator, as the classic pipelines do: there the
        # first row is the one whose randomness a single run reproduces.
        row = 1 if cls.repeat_image_for_generators else 0
        both = pipe(PROMPTS[2], num_inference_steps=4, output_type="np", generator=[gen(0), gen(1)],
                    callback_on_step_end=callback(cutoff_step_ratio=0.5), **extra)
        alone = pipe(PROMPTS[2][row], num_inference_steps=4, output_type="np", generator=gen(row),
                     callback_on_step_end=CFGCutoffCallback(cutoff_step_ratio=0.5), **extra)
        assert both.record.rows_per_step[-1] == 2, cls.__name__  # only the conditional rows after the cutoff
        assert np.abs(both.images[row] - alone.images[0]).max() <= TOL, cls.__name__


def test_interrupted_inpainting_keeps_the_unmasked_area(sd_folder):
    pipe = _sd(stepdiff.StableDiffusionInpaintPipeline, sd_folder)

    def stop(p, i, t, kw):
        if i == 1:
            p._interrupt = True
        return kw

    out = pipe("a photo of a cat", image=IMAGE, mask_image=MASK, num_inference_steps=6, output_type="latent",
               generator=gen(0), callback_on_step_end=stop, interrupt_output="denoised")
    assert out.interrupted
    run = pipe.steps("a photo of a cat", image=IMAGE, mask_image=MASK, num_inference_steps=6, generator=gen(0))
    for state in run:
        known = run.extras.image_latents
        keep = state.cond["mask"] < 0.5
        # the x0 estimate equals the image's own latents wherever the mask keeps the image
        assert torch.equal(state.denoised[keep.expand_as(state.denoised)], known[keep.expand_as(known)])
        break


def test_auto_pipelines_pick_the_kind(sd_folder, sdxl_folder, sd3_folder):
    assert type(stepdiff.AutoPipelineForImage2Image.from_pretrained(sd_folder)).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(stepdiff.AutoPipelineForInpainting.from_pretrained(sdxl_folder)).__name__ == "StableDiffusionXLInpaintPipeline"
    assert type(stepdiff.AutoPipelineForImage2Image.from_pretrained(sd3_folder)).__name__ == "StableDiffusion3Img2ImgPipeline"
    assert type(stepdiff.AutoPipelineForInpainting.from_pretrained(sd3_folder)).__name__ == "StableDiffusion3InpaintPipeline"
    text = _sd(stepdiff.StableDiffusionPipeline, sd_folder)
    img2img = stepdiff.AutoPipelineForImage2Image.from_pipe(text)
    assert type(img2img).__name__ == "StableDiffusionImg2ImgPipeline" and img2img.unet is text.unet


BAD = [
    (dict(image=IMAGE, strength=0.0), ValueError, r"strength must be a number in \(0, 1\], got 0.0"),
    (dict(image=IMAGE, strength=1.5), ValueError, r"strength must be a number in \(0, 1\], got 1.5"),
    (dict(image=IMAGE, strength="0.5"), TypeError, "strength must be a number"),
    (dict(image=IMAGE, strength=0.05), ValueError, "strength=0.05 leaves no denoising step at num_inference_steps=5"),
    (dict(image=None), ValueError, "image is required"),
    (dict(image="picture.png"), TypeError, "image must be a PIL image"),
    (dict(image=IMAGE, mask_image=None, inpaint=True), ValueError, "mask_image is required"),
    (dict(image=IMAGE, mask_image=test_image(16)[1], inpaint=True), ValueError, "mask_image is 16x16 but image is 32x32"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_image_inputs_fail_before_model_work(sd_folder, count_calls, kwargs, error, message):
    kwargs = dict(kwargs)
    cls = stepdiff.StableDiffusionInpaintPipeline if kwargs.pop("inpaint", False) else stepdiff.StableDiffusionImg2ImgPipeline
    pipe = _sd(cls, sd_folder)
    calls = count_calls(pipe)
    with pytest.raises(error, match=message):
        pipe("a photo of a cat", num_inference_steps=5, **kwargs)
    assert calls.calls == 0


GENERATOR_LIST = [c for c in CASES if c[0] in ("sd-img2img", "sd-inpaint-4ch", "sd-inpaint-9ch", "sdxl-inpaint-4ch")]


@pytest.mark.parametrize("case", GENERATOR_LIST, ids=[c[0] for c in GENERATOR_LIST])
def test_parity_with_one_generator_per_image(request, case):
    """The classic img2img pipelines repeat the image before encoding it (a posterior sample per generator); the
    inpainting ones encode it once with the first generator and repeat the latents. Both are kept."""
    _, ours_cls, theirs_cls, fixture, extra = case
    ours, theirs = _pair(ours_cls, theirs_cls, request.getfixturevalue(fixture))
    extra = {**extra, "strength": 0.8}  # 9-channel UNets encode the image only when strength < 1
    a, b = (p(prompt=PROMPTS[2], generator=[gen(0), gen(1)], output_type="np", num_inference_steps=3, **extra).images
            for p in (ours, theirs))
    assert np.abs(a - b).max() <= TOL
