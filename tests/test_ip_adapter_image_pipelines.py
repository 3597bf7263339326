"""IP-Adapter on SD and SDXL image-to-image and inpainting (plain and with a ControlNet): parity with diffusers on tiny models,
the official cutoff callbacks at batch 2 (each image equals its prompt run alone), run-scoped scales, bad input."""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ControlNetModel
from diffusers import callbacks as classic

import stepdiff
from stepdiff.callbacks import CFGCutoffCallback, IPAdapterScaleCutoffCallback, SDCFGCutoffCallback
from stepdiff.testing import make_tiny_ip_adapter

from .conftest import control_image, gen, test_image
from .test_controlnet_inpaint import _same_seed_gens

STEPS = 4
REF = PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
IMAGE, MASK = test_image()
# kind: (stepdiff class, diffusers class, base folder fixture, whether it takes a ControlNet, call arguments)
KINDS = {
    "img2img": (stepdiff.StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline, "sd_folder", False,
                dict(image=IMAGE, strength=0.75)),
    "inpaint-4ch": (stepdiff.StableDiffusionInpaintPipeline, diffusers.StableDiffusionInpaintPipeline, "sd_folder", False,
                    dict(image=IMAGE, mask_image=MASK)),
    "inpaint-9ch": (stepdiff.StableDiffusionInpaintPipeline, diffusers.StableDiffusionInpaintPipeline,
                    "sd_inpaint_folder", False, dict(image=IMAGE, mask_image=MASK, strength=0.75)),
    "controlnet-img2img": (stepdiff.StableDiffusionControlNetImg2ImgPipeline,
                           diffusers.StableDiffusionControlNetImg2ImgPipeline, "sd_folder", True,
                           dict(image=IMAGE, control_image=control_image())),
    "controlnet-inpaint-9ch": (stepdiff.StableDiffusionControlNetInpaintPipeline,
                               diffusers.StableDiffusionControlNetInpaintPipeline, "sd_inpaint_folder", True,
                               dict(image=IMAGE, mask_image=MASK, control_image=control_image())),
    "sdxl-img2img": (stepdiff.StableDiffusionXLImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline,
                     "sdxl_folder", False, dict(image=IMAGE, strength=0.75)),
    "sdxl-inpaint": (stepdiff.StableDiffusionXLInpaintPipeline, diffusers.StableDiffusionXLInpaintPipeline,
                     "sdxl_folder", False, dict(image=IMAGE, mask_image=MASK, strength=0.75)),
    "sdxl-controlnet-img2img": (stepdiff.StableDiffusionXLControlNetImg2ImgPipeline,
                                diffusers.StableDiffusionXLControlNetImg2ImgPipeline, "sdxl_folder", True,
                                dict(image=IMAGE, control_image=control_image())),
    "sdxl-controlnet-inpaint": (stepdiff.StableDiffusionXLControlNetInpaintPipeline,
                                diffusers.StableDiffusionXLControlNetInpaintPipeline, "sdxl_folder", True,
                                dict(image=IMAGE, mask_image=MASK, control_image=control_image(), strength=0.75)),
}
_cache: dict = {}


def _ip_folder(request, family="sd"):
    if ("ip", family) not in _cache:
        tmp = request.getfixturevalue("tmp_path_factory").mktemp(f"{family}-ip-images")
        _cache["ip", family] = make_tiny_ip_adapter(tmp, request.getfixturevalue(f"{family}_folder"))
    return _cache["ip", family]


def _load(cls, kind, request, ip=True):
    _, _, fixture, controlnet, _ = KINDS[kind]
    family = "sdxl" if kind.startswith("sdxl") else "sd"
    kwargs = {}
    if controlnet:
        kwargs["controlnet"] = ControlNetModel.from_pretrained(request.getfixturevalue(f"{family}_controlnet_folder"))
    if cls.__module__.startswith("diffusers") and "safety_checker" in cls.__init__.__code__.co_varnames:
        kwargs["safety_checker"] = None
    pipe = cls.from_pretrained(request.getfixturevalue(fixture), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if ip:
        pipe.load_ip_adapter(str(_ip_folder(request, family)), subfolder="", weight_name="ip-adapter.safetensors")
    return pipe


def _pipes(kind, request):
    if kind not in _cache:
        _cache[kind] = tuple(_load(cls, kind, request) for cls in KINDS[kind][:2])
    return _cache[kind]


def _kw(kind, prompts, **kw):
    return {"prompt": prompts, "ip_adapter_image": REF, "generator": [gen(i) for i in range(len(prompts))],
            "num_inference_steps": STEPS, "output_type": "np", **KINDS[kind][4], **kw}


PARITY = [("img2img", 1), ("img2img", 2), ("inpaint-4ch", 2), ("inpaint-9ch", 1), ("controlnet-img2img", 1),
          ("controlnet-inpaint-9ch", 2), ("sdxl-img2img", 2), ("sdxl-inpaint", 1), ("sdxl-controlnet-img2img", 2),
          ("sdxl-controlnet-inpaint", 2)]


@pytest.mark.parametrize("kind,batch", PARITY, ids=[f"{k}-batch{b}" for k, b in PARITY])
def test_matches_diffusers(kind, batch, request):
    ours, theirs = _pipes(kind, request)
    prompts = ["a photo of a cat", "a red car"][:batch]
    a = ours(**_kw(kind, prompts)).images
    b = theirs(**_kw(kind, prompts)).images
    ours.set_ip_adapter_scale(0.0)
    try:
        no_ip = ours(**_kw(kind, prompts)).images
    finally:
        ours.set_ip_adapter_scale(1.0)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4
    assert np.abs(a - no_ip).max() > 1e-2  # the tiny adapter matters, so the parity is not trivial


def test_embeds_path_matches_image_path(request):
    ours, theirs = _pipes("inpaint-9ch", request)
    embeds = ours.prepare_ip_adapter_image_embeds(REF, None, torch.device("cpu"), 1, True)  # [negative, positive]
    a = ours(**_kw("inpaint-9ch", ["a cat"])).images
    b = ours(**_kw("inpaint-9ch", ["a cat"], ip_adapter_image=None, ip_adapter_image_embeds=embeds)).images
    c = theirs(**_kw("inpaint-9ch", ["a cat"], ip_adapter_image=None, ip_adapter_image_embeds=embeds)).images
    assert np.abs(a - b).max() <= 1e-6 and np.abs(b - c).max() <= 1e-4


@pytest.mark.parametrize("kind", ["img2img", "inpaint-4ch"])
def test_ip_scale_cutoff_matches_diffusers_within_the_run_and_ends_with_it(kind, request):
    """The classic IPAdapterScaleCutoffCallback gives the same images on both; on diffusers the zero scale stays set
    after the run (the next run silently has no IP-Adapter), here the next run starts from the caller's scale."""
    ours, theirs = _pipes(kind, request)
    fresh = ours(**_kw(kind, ["a cat"])).images
    cut = {}
    for name, pipe in (("ours", ours), ("theirs", theirs)):
        cb = classic.IPAdapterScaleCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
        cut[name] = pipe(**_kw(kind, ["a cat"], callback_on_step_end=cb)).images
    try:
        assert np.abs(cut["ours"] - cut["theirs"]).max() <= 1e-4 and np.abs(cut["ours"] - fresh).max() > 1e-3
        assert np.abs(theirs(**_kw(kind, ["a cat"])).images - fresh).max() > 1e-3  # diffusers: scale 0 leaked
        assert np.array_equal(ours(**_kw(kind, ["a cat"])).images, fresh)
    finally:
        theirs.set_ip_adapter_scale(1.0)


OFFICIAL = {
    "CFGCutoffCallback": lambda: CFGCutoffCallback(cutoff_step_ratio=0.5),
    "SDCFGCutoffCallback": lambda: SDCFGCutoffCallback(cutoff_step_ratio=0.5),
    "IPAdapterScaleCutoffCallback": lambda: IPAdapterScaleCutoffCallback(cutoff_step_index=1),
    "both": lambda: [SDCFGCutoffCallback(cutoff_step_ratio=0.5), IPAdapterScaleCutoffCallback(cutoff_step_index=1)],
}
BATCH_SAFE = [("img2img", "CFGCutoffCallback"), ("img2img", "IPAdapterScaleCutoffCallback"),
              ("inpaint-4ch", "SDCFGCutoffCallback"), ("inpaint-9ch", "both"),
              ("controlnet-inpaint-9ch", "IPAdapterScaleCutoffCallback"), ("controlnet-inpaint-9ch", "both"),
              ("sdxl-img2img", "IPAdapterScaleCutoffCallback"), ("sdxl-inpaint", "CFGCutoffCallback")]


@pytest.mark.parametrize("kind,name", BATCH_SAFE, ids=[f"{k}-{n}" for k, n in BATCH_SAFE])
def test_official_callbacks_at_batch_2_equal_each_prompt_alone(kind, name, request):
    ours, _ = _pipes(kind, request)
    gens = [gen(0), gen(1)]
    if "inpaint" in kind:  # the classic inpainting encodes the image once, with the first generator
        gens = _same_seed_gens(advance=kind == "inpaint-4ch" or KINDS[kind][4].get("strength", 1.0) < 1)
    both = ours(**_kw(kind, ["a cat", "a dog"], generator=gens, callback_on_step_end=OFFICIAL[name]()))
    plain = ours(**_kw(kind, ["a cat", "a dog"])).images
    assert np.abs(both.images - plain).max() > 1e-3  # the callback changed something
    for i, prompt in enumerate(["a cat", "a dog"]):
        seed = 0 if "inpaint" in kind else i
        alone = ours(**_kw(kind, [prompt], generator=[gen(seed)], callback_on_step_end=OFFICIAL[name]())).images
        assert np.abs(both.images[i] - alone[0]).max() <= 1e-4


@pytest.mark.parametrize("kind", ["img2img"])
def test_classic_cfg_cutoff_with_ip_adapter_crashes_on_diffusers_at_batch_2_not_here(kind, request):
    """The IP-Adapter embeddings stay [negative, positive] on diffusers, out of any callback's reach."""
    ours, theirs = _pipes(kind, request)
    cb = classic.SDCFGCutoffCallback(cutoff_step_ratio=0.5)
    with pytest.raises(RuntimeError, match="size of tensor"):
        theirs(**_kw(kind, ["a cat", "a dog"], callback_on_step_end=cb))
    out = ours(**_kw(kind, ["a cat", "a dog"], callback_on_step_end=cb))
    assert out.record.rows_per_step[-1] == 2


# ------------------------------------------------------------------ bad input, before any model work

@pytest.mark.parametrize("kind", ["img2img", "controlnet-inpaint-9ch"])
def test_bad_ip_adapter_input_fails_before_model_work(kind, request, count_calls):
    ours, _ = _pipes(kind, request)
    calls = count_calls(ours)
    for kwargs, message in [
        (dict(ip_adapter_image=None), "has an IP-Adapter loaded: pass ip_adapter_image"),
        (dict(ip_adapter_image=[REF, REF]), "ip_adapter_image has 2 images but 1 IP-Adapters are loaded"),
        (dict(ip_adapter_image_embeds=[torch.zeros(2, 1, 32)]), "at most one of ip_adapter_image and ip_adapter_image_embeds"),
        (dict(ip_adapter_image=None, ip_adapter_image_embeds=[torch.zeros(2, 32)]), r"ip_adapter_image_embeds\[0\] must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            ours(**_kw(kind, ["a cat"], **kwargs))
    assert calls.calls == 0


def test_ip_adapter_image_without_an_adapter_is_refused(request):
    pipe = _load(stepdiff.StableDiffusionInpaintPipeline, "inpaint-4ch", request, ip=False)
    with pytest.raises(ValueError, match=r"ip_adapter_image needs an IP-Adapter: call pipe.load_ip_adapter"):
        pipe(**_kw("inpaint-4ch", ["a cat"]))
