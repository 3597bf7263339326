"""Folder loading through from_pretrained, save_pretrained, .to(), AutoPipeline, wrong family."""

import json
import shutil

import pytest
import torch

import stepdiff

from .conftest import gen


def test_auto_pipeline_picks_family(sd_folder, sdxl_folder):
    assert type(stepdiff.AutoPipelineForText2Image.from_pretrained(sd_folder)) is stepdiff.StableDiffusionPipeline
    assert type(stepdiff.AutoPipelineForText2Image.from_pretrained(sdxl_folder)) is stepdiff.StableDiffusionXLPipeline


def test_wrong_family_names_right_class(sd_folder, sdxl_folder):
    with pytest.raises(ValueError, match="use stepdiff.StableDiffusionPipeline"):
        stepdiff.StableDiffusionXLPipeline.from_pretrained(sd_folder)
    with pytest.raises(ValueError, match="use stepdiff.StableDiffusionXLPipeline"):
        stepdiff.StableDiffusionPipeline.from_pretrained(sdxl_folder)


def test_save_and_reload_round_trip(sd_pipe, tmp_path):
    before = sd_pipe("a cat", num_inference_steps=3, generator=gen(), output_type="latent").images
    sd_pipe.save_pretrained(tmp_path / "copy")
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    again = stepdiff.AutoPipelineForText2Image.from_pretrained(tmp_path / "copy")
    again.set_progress_bar_config(disable=True)
    after = again("a cat", num_inference_steps=3, generator=gen(), output_type="latent").images
    assert torch.equal(before, after)


def test_to_dtype_and_torch_dtype(sd_folder):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder, torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    pipe.to("cpu", torch.float32)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder.*never from a model hub"):
        stepdiff.AutoPipelineForText2Image.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        stepdiff.StableDiffusionPipeline.from_pretrained("some-org/some-model")


def test_missing_model_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        stepdiff.AutoPipelineForText2Image.from_pretrained(tmp_path)


def test_unknown_class_name(sd_folder, tmp_path):
    folder = shutil.copytree(sd_folder, tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'KandinskyPipeline'.*supports"):
        stepdiff.AutoPipelineForText2Image.from_pretrained(folder)


def test_corrupt_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        stepdiff.AutoPipelineForText2Image.from_pretrained(tmp_path)
