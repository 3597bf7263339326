"""ControlNet inpainting on the shared loop: parity with diffusers' StableDiffusionControlNetInpaintPipeline on tiny
models (4- and 9-channel UNets, one and two ControlNets, batch 1 and 2, with a CFG cutoff), the classic cutoff's
crash reproduced and fixed, the official callbacks at batch 2, the registry and bad input."""

import inspect

import diffusers
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers import callbacks as classic

import stepdiff
from stepdiff.callbacks import CFGCutoffCallback, SDCFGCutoffCallback

from .conftest import control_image, gen, test_image

STEPS = 4
IMAGE, MASK = test_image()
CONTROL = [control_image(seed=5), control_image(seed=6)]
UNETS = {"4ch": "sd_folder", "9ch": "sd_inpaint_folder"}
# family: (stepdiff class, diffusers class, base folder fixture per UNet); test_sdxl_controlnet_inpaint uses "sdxl"
FAMILIES = {
    "sd": (stepdiff.StableDiffusionControlNetInpaintPipeline, diffusers.StableDiffusionControlNetInpaintPipeline, UNETS),
    "sdxl": (stepdiff.StableDiffusionXLControlNetInpaintPipeline, diffusers.StableDiffusionXLControlNetInpaintPipeline,
             {"4ch": "sdxl_folder", "9ch": "sdxl_inpaint_folder"}),
}
_cache: dict = {}


def _controlnets(request, family="sd"):
    if ("nets", family) not in _cache:
        from stepdiff.testing import make_tiny_controlnet

        second = make_tiny_controlnet(
            request.getfixturevalue("tmp_path_factory").mktemp(f"{family}-cn-inpaint-2"),
            request.getfixturevalue(f"{family}_folder"), seed=1,
        )
        _cache["nets", family] = [ControlNetModel.from_pretrained(request.getfixturevalue(f"{family}_controlnet_folder")),
                                  ControlNetModel.from_pretrained(second)]
    return _cache["nets", family]


def _pipes(unet, nets, request, family="sd"):
    """(stepdiff pipeline, diffusers pipeline) on the same weights; ``unet``: "4ch" or "9ch"; ``nets``: 1 or 2."""
    key = (family, unet, nets)
    if key not in _cache:
        cns = _controlnets(request, family)
        ours_cls, theirs_cls, folders = FAMILIES[family]
        folder = request.getfixturevalue(folders[unet])
        controlnet = cns[0] if nets == 1 else cns
        extra = {"safety_checker": None} if family == "sd" else {}
        ours = ours_cls.from_pretrained(folder, controlnet=controlnet)
        theirs = theirs_cls.from_pretrained(folder, controlnet=controlnet, **extra)
        for p in (ours, theirs):
            p.set_progress_bar_config(disable=True)
        _cache[key] = (ours, theirs)
    return _cache[key]


def _kw(nets, prompts, **kw):
    return {
        "prompt": prompts, "image": IMAGE, "mask_image": MASK, "control_image": CONTROL[0] if nets == 1 else CONTROL,
        "generator": [gen(i) for i in range(len(prompts))], "num_inference_steps": STEPS, "output_type": "np", **kw,
    }


def _same_seed_gens(advance: bool) -> list[torch.Generator]:
    """Generators for a batch-2 run whose rows each equal their prompt run alone with ``[gen(0)]``. Inpainting, as
    the classic pipelines, encodes the image once with the first generator (before the noise when the UNet has 4
    channels or strength < 1): the second row's generator starts where that draw leaves ``gen(0)``."""
    second = gen(0)
    if advance:
        torch.randn((1, 4, 16, 16), generator=second)  # the VAE posterior sample of the 32x32 image
    return [gen(0), second]


PARITY = {
    "batch1": dict(prompts=["a photo of a cat"]),  # the classic defaults (SD: scale 0.5, strength 1; SDXL: 1.0, 0.9999)
    "batch2-strength": dict(prompts=["a photo of a cat", "a red car"], negative_prompt=["blue", "dog"], strength=0.75),
    "batch2-guess-window": dict(prompts=["a cat", "a dog"], guess_mode=True, control_guidance_end=0.5,
                                controlnet_conditioning_scale=0.9),
    "resized": dict(prompts=["a cat"], control_image=control_image(48), height=40, width=40),
}


PARITY_RUNS = [(family, unet, nets, case) for family in FAMILIES for unet in UNETS for case in PARITY for nets in (1, 2)
               if nets == 1 or case in ("batch2-strength", "batch2-guess-window")]


@pytest.mark.parametrize("family,unet,nets,case", PARITY_RUNS,
                         ids=[f"{f}-{u}-{n}net-{c}" for f, u, n, c in PARITY_RUNS])
def test_matches_diffusers(family, unet, nets, case, request):
    ours, theirs = _pipes(unet, nets, request, family)
    args = dict(PARITY[case])
    prompts = args.pop("prompts")
    if "control_image" in args and nets == 2:
        args["control_image"] = [args["control_image"]] * 2
    a = ours(**_kw(nets, prompts, **args)).images
    b = theirs(**_kw(nets, prompts, **args)).images
    assert a.shape == b.shape and a.shape[0] == len(prompts)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("unet", UNETS)
def test_the_control_image_matters(unet, family, request):
    """The tiny ControlNets' residuals change the repainted region, so the parity above is not trivial."""
    ours, _ = _pipes(unet, 2, request, family)
    base = ours(**_kw(2, ["a cat"])).images
    off = ours(**_kw(2, ["a cat"], controlnet_conditioning_scale=0.0)).images
    assert np.abs(base - off)[:, :, 16:].max() > 1e-2  # the white (right) half of MASK is repainted


class ControlNetInputs:
    """(rows, channels) of the latents each ControlNet call sees."""

    def __init__(self, pipe):
        nets = pipe.controlnet.nets if hasattr(pipe.controlnet, "nets") else [pipe.controlnet]
        self.seen = [[] for _ in nets]
        self.handles = [
            net.register_forward_pre_hook(lambda m, args, k=k: self.seen[k].append(tuple(args[0].shape[:2])))
            for k, net in enumerate(nets)
        ]

    def close(self):
        for h in self.handles:
            h.remove()


def test_controlnets_see_the_4_channel_latents_with_a_9_channel_unet(request, count_calls):
    ours, _ = _pipes("9ch", 2, request)
    spy, unet_rows = ControlNetInputs(ours), count_calls(ours)
    try:
        ours(**_kw(2, ["a cat", "a dog"], callback_on_step_end=CFGCutoffCallback(0.5)))
    finally:
        spy.close()
    assert spy.seen == [[(4, 4)] * 3 + [(2, 4)]] * 2
    assert unet_rows.rows == [4, 4, 4, 2]


# ------------------------------------------------------------------ CFG cutoffs

class _CorrectCutoff(classic.PipelineCallback):
    """What a correct classic cutoff on this pipeline would do: keep the conditional half of the text embeddings,
    of every ControlNet's image and of the mask tensors. The classic pipeline does not read ``mask`` or
    ``masked_image_latents`` back from a callback, so their storage is replaced in place (test code only)."""

    tensor_inputs = ["prompt_embeds", "control_image", "mask", "masked_image_latents"]  # noqa: RUF012

    def callback_fn(self, pipeline, step_index, timestep, kw):
        if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
            pipeline._guidance_scale = 0.0
            kw["prompt_embeds"] = kw["prompt_embeds"].chunk(2)[1]
            image = kw["control_image"]
            kw["control_image"] = [v.chunk(2)[1] for v in image] if isinstance(image, list) else image.chunk(2)[1]
            for name in ("mask", "masked_image_latents"):
                kw[name].data = kw[name].data.chunk(2)[1].clone()
        return kw


CUTOFF_RUNS = [("4ch", 1, 1), ("4ch", 2, 2), ("9ch", 1, 2), ("9ch", 2, 1)]


@pytest.mark.parametrize("unet,nets,batch", CUTOFF_RUNS, ids=[f"{u}-{n}net-batch{b}" for u, n, b in CUTOFF_RUNS])
def test_cfg_cutoff_matches_diffusers(unet, nets, batch, request):
    ours, theirs = _pipes(unet, nets, request)
    prompts = ["a photo of a cat", "a red car"][:batch]
    cb = _CorrectCutoff(cutoff_step_ratio=0.5)
    b = theirs(**_kw(nets, prompts, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs)).images
    a = ours(**_kw(nets, prompts, callback_on_step_end=CFGCutoffCallback(0.5)))
    assert a.record.rows_per_step == [2 * batch] * 3 + [batch]
    assert np.abs(a.images - b).max() <= 1e-4


@pytest.mark.parametrize("unet,batch", [("4ch", 2), ("9ch", 1)])
def test_classic_sd_cutoff_crashes_on_diffusers_and_is_batch_safe_here(unet, batch, request):
    """SDCFGCutoffCallback halves the text embeddings only: the control image (and the mask tensors) keep their
    doubled batch and diffusers crashes in the ControlNet. Here the same classic object is batch-safe."""
    ours, theirs = _pipes(unet, 1, request)
    prompts = ["a photo of a cat", "a red car"][:batch]
    cb = classic.SDCFGCutoffCallback(cutoff_step_ratio=0.5)
    with pytest.raises(RuntimeError, match="size of tensor"):
        theirs(**_kw(1, prompts, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs))
    gens = _same_seed_gens(advance=unet == "4ch")[:batch]
    out = ours(**_kw(1, prompts, generator=gens, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs))
    assert out.record.rows_per_step == [2 * batch] * 3 + [batch]
    for i, prompt in enumerate(prompts):
        alone = ours(**_kw(1, [prompt], generator=[gen(0)], callback_on_step_end=CFGCutoffCallback(0.5))).images
        assert np.abs(out.images[i] - alone[0]).max() <= 1e-4


OFFICIAL = {
    "CFGCutoffCallback": lambda: CFGCutoffCallback(cutoff_step_ratio=0.5),
    "SDCFGCutoffCallback": lambda: SDCFGCutoffCallback(cutoff_step_ratio=0.5),
}


@pytest.mark.parametrize("unet,name", [("4ch", "CFGCutoffCallback"), ("9ch", "SDCFGCutoffCallback"),
                                       ("9ch", "CFGCutoffCallback")])
def test_official_cutoffs_at_batch_2_equal_each_prompt_alone(unet, name, request):
    ours, _ = _pipes(unet, 2, request)
    cb = OFFICIAL[name]()
    gens = _same_seed_gens(advance=True)
    both = ours(**_kw(2, ["a cat", "a dog"], generator=gens, strength=0.75, callback_on_step_end=cb))
    assert both.record.rows_per_step == [4, 4, 2]  # strength 0.75 of 4 steps: 3 steps, cutoff after the second
    for i, prompt in enumerate(["a cat", "a dog"]):
        alone = ours(**_kw(2, [prompt], generator=[gen(0)], strength=0.75, callback_on_step_end=OFFICIAL[name]())).images
        assert np.abs(both.images[i] - alone[0]).max() <= 1e-4


def test_callback_tensors_are_one_row_per_image(request):
    ours, _ = _pipes("9ch", 2, request)
    seen = {}

    def look(pipe, i, t, kw):
        seen.update({k: [tuple(x.shape) for x in v] if isinstance(v, list) else tuple(v.shape) for k, v in kw.items()})
        return kw

    names = ["control_image", "image", "mask", "masked_image_latents", "prompt_embeds"]
    ours(**_kw(2, ["a cat", "a dog"], callback_on_step_end=look, callback_on_step_end_tensor_inputs=names))
    assert seen["control_image"] == seen["image"] == [(2, 3, 32, 32)] * 2
    assert seen["mask"] == (2, 1, 16, 16) and seen["masked_image_latents"] == (2, 4, 16, 16)
    assert seen["prompt_embeds"][0] == 2


# ------------------------------------------------------------------ the classic interface and the registry

@pytest.mark.parametrize("family,scale,strength", [("sd", 0.5, 1.0), ("sdxl", 1.0, 0.9999)])
def test_arguments_and_defaults_are_the_classic_ones(family, scale, strength):
    ours_cls, theirs_cls, _ = FAMILIES[family]
    ours = inspect.signature(ours_cls.__call__).parameters
    theirs = inspect.signature(theirs_cls.__call__).parameters
    classic_names = [n for n in theirs if n not in ("kwargs", "callback_on_step_end_tensor_inputs")]
    assert [n for n in ours if n in theirs] == [n for n in theirs if n in ours]  # same order
    for name in classic_names:
        assert name in ours, name
        assert ours[name].default == theirs[name].default, name
    assert ours["controlnet_conditioning_scale"].default == scale and ours["strength"].default == strength
    assert set(theirs_cls._callback_tensor_inputs) <= set(ours_cls._callback_tensor_inputs)


def test_auto_pipeline_for_inpainting_with_controlnet(request, sd_folder):
    net = _controlnets(request)[0]
    pipe = stepdiff.AutoPipelineForInpainting.from_pretrained(sd_folder, controlnet=net)
    assert type(pipe) is stepdiff.StableDiffusionControlNetInpaintPipeline and pipe.controlnet is net
    assert stepdiff.pipelines.StableDiffusionControlNetInpaintPipeline is stepdiff.StableDiffusionControlNetInpaintPipeline
    assert "StableDiffusionControlNetInpaintPipeline" in stepdiff.__all__
    text = stepdiff.AutoPipelineForText2Image.from_pretrained(sd_folder, controlnet=net)
    assert type(stepdiff.AutoPipelineForInpainting.from_pipe(text)) is stepdiff.StableDiffusionControlNetInpaintPipeline
    # controlnet=None drops the ControlNet, as in diffusers: the plain pipeline of the kind, same components.
    for auto, plain in ((stepdiff.AutoPipelineForInpainting, stepdiff.StableDiffusionInpaintPipeline),
                        (stepdiff.AutoPipelineForImage2Image, stepdiff.StableDiffusionImg2ImgPipeline),
                        (stepdiff.AutoPipelineForText2Image, stepdiff.StableDiffusionPipeline)):
        dropped = auto.from_pipe(pipe, controlnet=None)
        assert type(dropped) is plain and dropped.unet is pipe.unet and "controlnet" not in dropped.components


# ------------------------------------------------------------------ bad input, before any model work

BAD = [
    (1, dict(control_image=None), ValueError, r"control_image \(the control image\) is required"),
    (1, dict(control_image="edges.png"), TypeError, "control_image must be a PIL image"),
    (1, dict(control_image=control_image(48)), ValueError, "control_image is 48x48 but image is 32x32"),
    (1, dict(control_image=torch.rand(1, 1, 32, 32)), ValueError, "control_image has 1 channels .* the ControlNet takes 3"),
    (1, dict(control_image=torch.rand(3, 3, 32, 32)), ValueError, "control_image holds 3 control images but the call has 1"),
    (2, dict(control_image=CONTROL[0]), TypeError, "with 2 ControlNets, control_image must be a list of 2"),
    (2, dict(controlnet_conditioning_scale=[0.5]), ValueError, "controlnet_conditioning_scale has 1 values"),
    (1, dict(control_guidance_start=0.5, control_guidance_end=0.5), ValueError, "must satisfy 0 <= start < end <= 1"),
    (1, dict(image=None), ValueError, "image is required"),
    (1, dict(mask_image=None), ValueError, "mask_image is required"),
    (1, dict(mask_image=test_image(16)[1]), ValueError, "mask_image is 16x16 but image is 32x32"),
    (1, dict(strength=0.0), ValueError, r"strength must be a number in \(0, 1\]"),
    (1, dict(padding_mask_crop=8), NotImplementedError, "padding_mask_crop is not supported"),
]


@pytest.mark.parametrize("nets,kwargs,error,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_fails_before_model_work(nets, kwargs, error, message, request, count_calls):
    ours, _ = _pipes("4ch", nets, request)
    calls = count_calls(ours)
    with pytest.raises(error, match=message):
        ours(**_kw(nets, ["a cat"], **kwargs))
    assert calls.calls == 0


def test_controlnet_for_another_base_model_is_refused(sd_inpaint_folder, sdxl_controlnet_folder):
    net = ControlNetModel.from_pretrained(sdxl_controlnet_folder)
    with pytest.raises(ValueError, match="controlnet does not fit this base model: its cross_attention_dim is 64"):
        stepdiff.StableDiffusionControlNetInpaintPipeline.from_pretrained(sd_inpaint_folder, controlnet=net)
