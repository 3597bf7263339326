"""SDXL ControlNet inpainting on the shared loop: parity with diffusers' StableDiffusionXLControlNetInpaintPipeline on
tiny models (4- and 9-channel UNets, one and two ControlNets, batch 1 and 2), the official SDXL cutoffs at batch 2,
callback tensors, the classic arguments and defaults, the registry and bad input."""

import inspect

import diffusers
import numpy as np
import pytest
from diffusers import ControlNetModel

import stepdiff
from stepdiff.callbacks import CFGCutoffCallback, SDXLCFGCutoffCallback, SDXLControlnetCFGCutoffCallback

from .conftest import control_image, gen, test_image
from .test_controlnet_inpaint import _same_seed_gens

STEPS = 4
IMAGE, MASK = test_image()
CONTROL = [control_image(seed=5), control_image(seed=6)]
UNETS = {"4ch": "sdxl_folder", "9ch": "sdxl_inpaint_folder"}
_cache: dict = {}


def _controlnets(request):
    if "nets" not in _cache:
        from stepdiff.testing import make_tiny_controlnet

        second = make_tiny_controlnet(request.getfixturevalue("tmp_path_factory").mktemp("sdxl-cn-inpaint-2"),
                                      request.getfixturevalue("sdxl_folder"), seed=1)
        _cache["nets"] = [ControlNetModel.from_pretrained(request.getfixturevalue("sdxl_controlnet_folder")),
                          ControlNetModel.from_pretrained(second)]
    return _cache["nets"]


def _pipes(unet, nets, request):
    key = (unet, nets)
    if key not in _cache:
        cns = _controlnets(request)
        folder = request.getfixturevalue(UNETS[unet])
        controlnet = cns[0] if nets == 1 else cns
        pair = (stepdiff.StableDiffusionXLControlNetInpaintPipeline.from_pretrained(folder, controlnet=controlnet),
                diffusers.StableDiffusionXLControlNetInpaintPipeline.from_pretrained(folder, controlnet=controlnet))
        for p in pair:
            p.set_progress_bar_config(disable=True)
        _cache[key] = pair
    return _cache[key]


def _kw(nets, prompts, **kw):
    return {
        "prompt": prompts, "image": IMAGE, "mask_image": MASK, "control_image": CONTROL[0] if nets == 1 else CONTROL,
        "generator": [gen(i) for i in range(len(prompts))], "num_inference_steps": STEPS, "output_type": "np", **kw,
    }


PARITY = {
    "batch1": dict(prompts=["a photo of a cat"]),  # the classic defaults (scale 1.0, strength 0.9999)
    "batch2-strength": dict(prompts=["a photo of a cat", "a red car"], negative_prompt=["blue", "dog"], strength=0.75),
    "batch2-guess-window": dict(prompts=["a cat", "a dog"], guess_mode=True, control_guidance_end=0.5,
                                controlnet_conditioning_scale=0.6),
}
PARITY_RUNS = [(unet, nets, case) for unet in UNETS for case in PARITY for nets in (1, 2)
               if nets == 1 or case != "batch1"]


@pytest.mark.parametrize("unet,nets,case", PARITY_RUNS, ids=[f"{u}-{n}net-{c}" for u, n, c in PARITY_RUNS])
def test_matches_diffusers(unet, nets, case, request):
    ours, theirs = _pipes(unet, nets, request)
    args = dict(PARITY[case])
    prompts = args.pop("prompts")
    a = ours(**_kw(nets, prompts, **args)).images
    b = theirs(**_kw(nets, prompts, **args)).images
    assert a.shape == b.shape and a.shape[0] == len(prompts)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("unet", UNETS)
def test_the_control_image_matters(unet, request):
    """The tiny ControlNets' residuals change the repainted region, so the parity above is not trivial."""
    ours, _ = _pipes(unet, 2, request)
    base = ours(**_kw(2, ["a cat"])).images
    off = ours(**_kw(2, ["a cat"], controlnet_conditioning_scale=0.0)).images
    assert np.abs(base - off)[:, :, 16:].max() > 1e-2  # the white (right) half of MASK is repainted


OFFICIAL = {
    "CFGCutoffCallback": lambda: CFGCutoffCallback(cutoff_step_ratio=0.5),
    "SDXLCFGCutoffCallback": lambda: SDXLCFGCutoffCallback(cutoff_step_ratio=0.5),
    "SDXLControlnetCFGCutoffCallback": lambda: SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.5),
}


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_cutoffs_at_batch_2_equal_each_prompt_alone(name, request):
    ours, _ = _pipes("4ch", 1, request)
    gens = _same_seed_gens(advance=True)  # 4-channel UNet: the image is encoded before the noise
    both = ours(**_kw(1, ["a cat", "a dog"], generator=gens, callback_on_step_end=OFFICIAL[name]()))
    assert both.record.rows_per_step[-1] == 2 and both.record.rows_per_step[0] == 4
    for i, prompt in enumerate(["a cat", "a dog"]):
        alone = ours(**_kw(1, [prompt], generator=[gen(0)], callback_on_step_end=OFFICIAL[name]())).images
        assert np.abs(both.images[i] - alone[0]).max() <= 1e-4


def test_callback_tensors_are_one_row_per_image(request):
    ours, _ = _pipes("9ch", 1, request)
    seen = {}

    def look(pipe, i, t, kw):
        seen.update({k: tuple(v.shape) for k, v in kw.items()})
        return {}

    names = ["control_image", "image", "mask", "masked_image_latents", "add_text_embeds", "add_time_ids", "denoised"]
    ours(**_kw(1, ["a cat", "a dog"], callback_on_step_end=look, callback_on_step_end_tensor_inputs=names))
    assert seen["control_image"] == seen["image"] == (2, 3, 32, 32)
    assert seen["mask"][0] == seen["masked_image_latents"][0] == seen["add_text_embeds"][0] == 2
    assert seen["denoised"][0] == 2
    assert set(diffusers.StableDiffusionXLControlNetInpaintPipeline._callback_tensor_inputs) <= set(
        stepdiff.StableDiffusionXLControlNetInpaintPipeline._callback_tensor_inputs)


def test_arguments_and_defaults_are_the_classic_ones():
    ours = inspect.signature(stepdiff.StableDiffusionXLControlNetInpaintPipeline.__call__).parameters
    theirs = inspect.signature(diffusers.StableDiffusionXLControlNetInpaintPipeline.__call__).parameters
    classic_names = [n for n in theirs if n not in ("kwargs", "callback_on_step_end_tensor_inputs")]
    assert [n for n in ours if n in theirs] == [n for n in theirs if n in ours]  # same order
    for name in classic_names:
        assert name in ours, name
        assert ours[name].default == theirs[name].default, name


def test_auto_pipeline_and_from_pipe(request):
    net = _controlnets(request)[0]
    folder = request.getfixturevalue("sdxl_folder")
    pipe = stepdiff.AutoPipelineForInpainting.from_pretrained(folder, controlnet=net)
    assert type(pipe) is stepdiff.StableDiffusionXLControlNetInpaintPipeline and pipe.controlnet is net
    text = stepdiff.AutoPipelineForText2Image.from_pretrained(folder, controlnet=net)
    assert type(text) is stepdiff.StableDiffusionXLControlNetPipeline
    assert type(stepdiff.AutoPipelineForInpainting.from_pipe(text)) is stepdiff.StableDiffusionXLControlNetInpaintPipeline
    assert type(stepdiff.AutoPipelineForInpainting.from_pipe(pipe, controlnet=None)) is stepdiff.StableDiffusionXLInpaintPipeline


BAD = [
    (dict(control_image=None), ValueError, r"control_image \(the control image\) is required"),
    (dict(mask_image=None), ValueError, "mask_image"),
    (dict(strength=1.5), ValueError, "strength"),
    (dict(denoising_start=0.5), NotImplementedError, "denoising_start is not supported"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD, ids=[next(iter(k)) for k, _, _ in BAD])
def test_bad_input_fails_before_model_work(kwargs, error, message, request, count_calls):
    ours, _ = _pipes("4ch", 1, request)
    calls = count_calls(ours)
    with pytest.raises(error, match=message):
        ours(**_kw(1, ["a cat"], **kwargs))
    assert calls.calls == 0


def test_sdxl_inpainting_without_controlnet_refuses_denoising_start_too(sdxl_folder, count_calls):
    pipe = stepdiff.StableDiffusionXLInpaintPipeline.from_pretrained(sdxl_folder)
    calls = count_calls(pipe)
    with pytest.raises(NotImplementedError, match="denoising_start is not supported by stepdiff's SDXL inpainting"):
        pipe("a cat", image=IMAGE, mask_image=MASK, denoising_start=0.5, num_inference_steps=STEPS)
    assert calls.calls == 0
