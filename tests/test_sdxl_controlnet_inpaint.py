"""SDXL ControlNet inpainting on the shared loop: the official SDXL cutoffs at batch 2, callback tensors, the registry
and bad input. Parity with diffusers' StableDiffusionXLControlNetInpaintPipeline (4- and 9-channel UNets, one and two
ControlNets, batch 1 and 2), the control image's effect and the classic arguments and defaults are the SD tests of
test_controlnet_inpaint.py, parametrized over both families."""


import diffusers
import numpy as np
import pytest

import stepdiff
from stepdiff.callbacks import CFGCutoffCallback, SDXLCFGCutoffCallback, SDXLControlnetCFGCutoffCallback

from . import test_controlnet_inpaint as cn_inpaint
from .conftest import gen, test_image
from .test_controlnet_inpaint import _same_seed_gens

STEPS = 4
IMAGE, MASK = test_image()


def _pipes(unet, nets, request):
    return cn_inpaint._pipes(unet, nets, request, "sdxl")


_kw = cn_inpaint._kw


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


def test_auto_pipeline_and_from_pipe(request):
    net = cn_inpaint._controlnets(request, "sdxl")[0]
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
    (dict(denoising_start=1.5), ValueError, "denoising_start must be None or a number strictly between 0 and 1"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD, ids=[next(iter(k)) for k, _, _ in BAD])
def test_bad_input_fails_before_model_work(kwargs, error, message, request, count_calls):
    ours, _ = _pipes("4ch", 1, request)
    calls = count_calls(ours)
    with pytest.raises(error, match=message):
        ours(**_kw(1, ["a cat"], **kwargs))
    assert calls.calls == 0


@pytest.mark.parametrize("unet", ["4ch", "9ch"])
def test_refiner_hand_off_matches_the_classic_controlnet_inpainting(unet, request):
    """denoising_start on SDXL ControlNet inpainting: the image's latents continued without new noise, as the classic
    pipeline (which takes the image as pixels only)."""
    ours, theirs = _pipes(unet, 1, request)
    kw = dict(denoising_start=0.6, num_inference_steps=5)
    a = ours(**_kw(1, ["a cat"], **kw, generator=[gen(1)]))
    b = theirs(**_kw(1, ["a cat"], **kw, generator=[gen(1)])).images
    assert a.record.steps_total == 2 and np.abs(a.images - b).max() <= 1e-4
