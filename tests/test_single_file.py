"""``from_single_file`` on a checkpoint in the original single-file key layout (CompVis/LDM for SD, SGM for SDXL),
written offline from the tiny folders by ``stepdiff.testing.save_single_file``: the same images as
``from_pretrained`` on the folder, and as diffusers' own ``from_single_file`` on the same file."""

import shutil

import diffusers
import numpy as np
import pytest
import torch

import stepdiff
from stepdiff.testing import make_tiny_sdxl, save_single_file

from .conftest import gen

CLASSES = {"sd": (stepdiff.StableDiffusionPipeline, diffusers.StableDiffusionPipeline),
           "sdxl": (stepdiff.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline)}


@pytest.fixture(scope="module")
def sdxl_wide_folder(tmp_path_factory):
    """Tiny SDXL whose second text encoder is wider than the first, as in real SDXL (768 vs 1280): diffusers tells
    the two apart in a single file by width only (see test_sdxl_text_encoders_of_one_width_are_refused)."""
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-wide"), text_encoder_2_width=48)


def _configs_only(folder, out):
    """The folder without its weights, like a ``config=`` repo that holds configs, tokenizers and the scheduler:
    every weight must then come from the single file."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


def _images(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a cat", num_inference_steps=2, output_type="np", generator=gen(0), **kw).images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_from_single_file_matches_from_pretrained_and_diffusers(request, family, tmp_path):
    folder = request.getfixturevalue({"sd": "sd_folder", "sdxl": "sdxl_wide_folder"}[family])
    ours_cls, theirs_cls = CLASSES[family]
    checkpoint = save_single_file(folder, tmp_path / "model.safetensors")
    configs = _configs_only(folder, tmp_path / "configs")
    kwargs = {"safety_checker": None} if family == "sd" else {}

    ours = ours_cls.from_single_file(str(checkpoint), config=str(configs), **kwargs)
    assert type(ours) is ours_cls
    reference = ours_cls.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder", *(("text_encoder_2",) if family == "sdxl" else ())):
        got, want = getattr(ours, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    out = _images(ours)
    assert np.abs(out - _images(reference)).max() <= 1e-6
    theirs = theirs_cls.from_single_file(str(checkpoint), config=str(configs), **kwargs)
    assert np.abs(out - _images(theirs)).max() <= 1e-4


def test_single_file_keys_are_in_the_original_layout(sd_folder, tmp_path):
    from safetensors import safe_open

    with safe_open(str(save_single_file(sd_folder, tmp_path / "m.safetensors")), "pt") as f:
        keys = set(f.keys())
    # the names diffusers' own detection looks for in an SD 1.x checkpoint
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}


def test_sdxl_text_encoders_of_one_width_are_refused(sdxl_folder, tmp_path):
    with pytest.raises(ValueError, match="both SDXL text encoders .* are 32 wide"):
        save_single_file(sdxl_folder, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_pickle_single_files_are_refused_unless_allowed(sd_folder, tmp_path):
    from safetensors.torch import load_file

    checkpoint = save_single_file(sd_folder, tmp_path / "model.safetensors")
    torch.save({"state_dict": load_file(str(checkpoint))}, tmp_path / "model.ckpt")  # the original .ckpt layout
    configs = _configs_only(sd_folder, tmp_path / "configs")
    with pytest.raises(OSError, match=r"model\.ckpt' is not a \.safetensors file.*allow_pickle=True"):
        stepdiff.StableDiffusionPipeline.from_single_file(tmp_path / "model.ckpt", config=str(configs))
    pipe = stepdiff.StableDiffusionPipeline.from_single_file(
        tmp_path / "model.ckpt", config=str(configs), safety_checker=None, allow_pickle=True,
    )
    want = load_file(str(sd_folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(pipe.unet.state_dict()[k], want[k]) for k in want)
