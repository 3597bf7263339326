"""``from_single_file`` on a checkpoint in the original single-file key layout (CompVis/LDM for SD, SGM for SDXL, SD3's),
written offline from the tiny folders by ``stepdiff.testing.save_single_file``: the same images as
``from_pretrained`` on the folder, and as diffusers' own ``from_single_file`` on the same file."""

import shutil

import diffusers
import numpy as np
import pytest
import torch

import stepdiff
from stepdiff.testing import make_tiny_sd3, make_tiny_sdxl, save_single_file

from .conftest import gen

CLASSES = {"sd": (stepdiff.StableDiffusionPipeline, diffusers.StableDiffusionPipeline),
           "sdxl": (stepdiff.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline),
           "sd3": (stepdiff.StableDiffusion3Pipeline, diffusers.StableDiffusion3Pipeline)}
FOLDERS = {"sd": "sd_folder", "sdxl": "sdxl_wide_folder", "sd3": "sd3_wide_folder"}


@pytest.fixture(scope="module")
def sdxl_wide_folder(tmp_path_factory):
    """Tiny SDXL whose second text encoder is wider than the first, as in real SDXL (768 vs 1280): diffusers tells
    the two apart in a single file by width only (see test_sdxl_text_encoders_of_one_width_are_refused)."""
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-wide"), text_encoder_2_width=48)


@pytest.fixture(scope="module")
def sd3_wide_folder(tmp_path_factory):
    """Tiny SD3 as diffusers' single-file loader expects it: CLIP-G wider than CLIP-L, CLIP-L's projection the
    identity (the loader puts the identity there)."""
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3-wide"), text_encoder_2_width=48, identity_text_projection=True)


def _configs_only(folder, out):
    """The folder without its weights, like a ``config=`` repo that holds configs, tokenizers and the scheduler:
    every weight must then come from the single file."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


def _images(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a cat", num_inference_steps=2, output_type="np", generator=gen(0), **kw).images


@pytest.mark.parametrize("family", list(CLASSES))
def test_from_single_file_matches_from_pretrained_and_diffusers(request, family, tmp_path):
    folder = request.getfixturevalue(FOLDERS[family])
    ours_cls, theirs_cls = CLASSES[family]
    checkpoint = save_single_file(folder, tmp_path / "model.safetensors")
    configs = _configs_only(folder, tmp_path / "configs")
    kwargs = {"safety_checker": None} if family == "sd" else {}

    ours = ours_cls.from_single_file(str(checkpoint), config=str(configs), **kwargs)
    assert type(ours) is ours_cls
    reference = ours_cls.from_pretrained(folder)
    models = {k: m for k, m in ours.components.items() if isinstance(m, torch.nn.Module)}
    assert len(models) == {"sd": 3, "sdxl": 4, "sd3": 5}[family]
    for name, model in models.items():
        got, want = model.state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
        assert not model.training, name  # as from_pretrained; diffusers leaves SD3's single-file T5 training
    out = _images(ours)
    assert np.abs(out - _images(reference)).max() <= 1e-6
    theirs = theirs_cls.from_single_file(str(checkpoint), config=str(configs), **kwargs)
    for model in theirs.components.values():
        if isinstance(model, torch.nn.Module):
            model.eval()  # without this, dropout in diffusers' single-file T5 gives other images on every call
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


def test_folders_diffusers_cannot_load_back_from_one_file_are_refused(sdxl_folder, sd3_folder, tmp_path):
    with pytest.raises(ValueError, match="both text encoders .* are 32 wide.*text_encoder_2_width"):
        save_single_file(sdxl_folder, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="both text encoders .* are 32 wide"):
        save_single_file(sd3_folder, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    folder = make_tiny_sd3(tmp_path / "sd3", text_encoder_2_width=48)
    with pytest.raises(ValueError, match="CLIP-L's text_projection .* is not the identity.*identity_text_projection"):
        save_single_file(folder, tmp_path / "m.safetensors")


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
