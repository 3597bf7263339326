"""LoRA through diffusers' own loader mixins: load, several adapters with weights, fuse, unfuse, unload, on
SD, SDXL and SD3; parity with the classic pipelines, and LoRA still working around inference-mode model calls."""

import diffusers
import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import stepdiff

from .conftest import gen

TOL = 1e-4
FAMILIES = {
    "sd": (stepdiff.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, "unet", ["to_q", "to_k", "to_v", "to_out.0"]),
    "sdxl": (stepdiff.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline, "unet", ["to_q", "to_k", "to_v", "to_out.0"]),
    "sd3": (stepdiff.StableDiffusion3Pipeline, diffusers.StableDiffusion3Pipeline, "transformer", ["to_q", "to_k", "to_v"]),
}


def _make_lora(pipe, denoiser_name, targets, folder, seed):
    """A random LoRA for the pipeline's denoiser, saved in diffusers' format (what users download)."""
    denoiser = getattr(pipe, denoiser_name)
    torch.manual_seed(seed)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), adapter_name="tmp")
    layers = get_peft_model_state_dict(denoiser, adapter_name="tmp")
    denoiser.delete_adapters("tmp")
    type(pipe).save_lora_weights(folder, **{f"{denoiser_name}_lora_layers": layers}, safe_serialization=True)
    return folder


@pytest.fixture(params=list(FAMILIES))
def lora_case(request, tmp_path):
    ours_cls, theirs_cls, denoiser, targets = FAMILIES[request.param]
    folder = request.getfixturevalue(f"{request.param}_folder")
    kwargs = {"safety_checker": None} if theirs_cls is diffusers.StableDiffusionPipeline else {}
    theirs = theirs_cls.from_pretrained(folder, **kwargs)
    ours = ours_cls.from_pretrained(folder)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    loras = [_make_lora(theirs, denoiser, targets, tmp_path / f"lora{k}", seed=k) for k in range(2)]
    return ours, theirs, loras


def _img(pipe):
    return pipe("a photo of a cat", num_inference_steps=3, output_type="np", generator=gen(0)).images


def test_lora_load_weights_fuse_unfuse_unload_match_diffusers(lora_case):
    ours, theirs, (a, b) = lora_case
    plain = _img(ours)
    for p in (ours, theirs):
        p.load_lora_weights(a, adapter_name="a")
        p.load_lora_weights(b, adapter_name="b")
        p.set_adapters(["a", "b"], adapter_weights=[0.7, 0.5])
    loaded = _img(ours)
    assert np.abs(loaded - _img(theirs)).max() <= TOL and np.abs(loaded - plain).max() > 1e-3
    for p in (ours, theirs):
        p.fuse_lora()
    fused = _img(ours)
    assert np.abs(fused - _img(theirs)).max() <= TOL and np.abs(fused - loaded).max() <= 1e-3
    for p in (ours, theirs):
        p.unfuse_lora()
        p.unload_lora_weights()
    assert np.abs(_img(ours) - plain).max() <= 1e-4


def test_lora_loaded_after_a_run_in_inference_mode_still_fuses(lora_case):
    """Model calls run under torch.inference_mode; the weights must stay editable (fusing writes them in place)."""
    ours, _, (a, _) = lora_case
    _img(ours)
    ours.load_lora_weights(a)
    _img(ours)
    ours.fuse_lora()
    _img(ours)
    ours.unfuse_lora()
    assert all(not p.is_inference() for p in ours.denoiser.parameters())
