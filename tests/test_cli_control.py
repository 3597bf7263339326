"""stepdiff generate --control / --controlnet / --control-scale / --control-end: ControlNet from the command line,
on the shipped model with a tiny random ControlNet made for it, and every bad input before any model work."""

import json

import numpy as np
import pytest
from PIL import Image

from stepdiff.models import default_model
from stepdiff.shapes.dataset import Sample, silhouette

from .test_cli_hardening import one_error


@pytest.fixture(scope="module")
def shapes_controlnet(tmp_path_factory):
    from stepdiff.testing import make_tiny_controlnet

    return make_tiny_controlnet(tmp_path_factory.mktemp("shapes-cn"), default_model(), seed=3)


@pytest.fixture
def control(tmp_path):
    silhouette(Sample("white", "square", "black", 20, 40, 24)).save(tmp_path / "mask.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    return tmp_path


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_control_changes_the_image_and_is_recorded(run_cli, control, shapes_controlnet):
    prompt = "a red circle on a blue background"
    args = ("--steps", "4", "--seed", "1")
    code, _, err = run_cli("generate", prompt, *args, "--output", control / "plain.png")
    assert code == 0, err
    code, _, err = run_cli("generate", prompt, *args, "--output", control / "cn.png", "--control", control / "mask.png",
                           "--controlnet", shapes_controlnet, "--control-scale", "1.5", "--control-end", "0.5")
    assert code == 0, err
    assert np.abs(_pixels(control / "plain.png") - _pixels(control / "cn.png")).max() > 10
    meta = json.loads(Image.open(control / "cn.png").text["stepdiff"])
    assert meta["control"].endswith("mask.png") and meta["controlnet"] == str(shapes_controlnet)
    assert (meta["control_scale"], meta["control_end"]) == (1.5, 0.5)
    # Scale 0 is no control at all: the same pixels as the plain run.
    code, _, err = run_cli("generate", prompt, *args, "--output", control / "zero.png", "--control", control / "mask.png",
                           "--controlnet", shapes_controlnet, "--control-scale", "0")
    assert code == 0, err
    assert np.abs(_pixels(control / "plain.png") - _pixels(control / "zero.png")).max() <= 1


def test_control_with_image_to_image(run_cli, control, shapes_controlnet):
    Image.new("RGB", (64, 64), (30, 60, 230)).save(control / "init.png")
    code, _, err = run_cli("generate", "a red circle on a blue background", "--steps", "4", "--init-image",
                           control / "init.png", "--control", control / "mask.png", "--controlnet", shapes_controlnet,
                           "--output", control / "out.png")
    assert code == 0, err
    assert Image.open(control / "out.png").size == (64, 64)


@pytest.mark.parametrize("flag, value", [("--control-scale", "1"), ("--control-end", "0.5"), ("--controlnet", "x")])
def test_control_flags_need_control(run_cli, flag, value):
    code, _, err = run_cli("generate", "a red circle on a blue background", flag, value)
    one_error(code, err, f"{flag} needs --control")


@pytest.mark.parametrize("flag, value, needle", [
    ("--control-scale", "-1", "--control-scale must be a number in [0, 10], got -1.0"),
    ("--control-scale", "nan", "--control-scale must be a number in [0, 10], got nan"),
    ("--control-end", "0", "--control-end must be a number in (0, 1], got 0.0"),
    ("--control-end", "1.5", "--control-end must be a number in (0, 1], got 1.5"),
])
def test_bad_control_numbers(run_cli, control, shapes_controlnet, flag, value, needle):
    code, _, err = run_cli("generate", "a red circle on a blue background", "--control", control / "mask.png",
                           "--controlnet", shapes_controlnet, flag, value)
    one_error(code, err, needle)


def test_control_picture_of_the_wrong_size(run_cli, control, shapes_controlnet):
    code, _, err = run_cli("generate", "a red circle on a blue background", "--control", control / "small.png",
                           "--controlnet", shapes_controlnet)
    one_error(code, err, "--control is 32x32 but the output is 64x64")


def test_control_that_is_not_a_picture(run_cli, control, shapes_controlnet):
    (control / "notes.txt").write_text("not a picture")
    code, _, err = run_cli("generate", "a red circle on a blue background", "--control", control / "notes.txt",
                           "--controlnet", shapes_controlnet)
    one_error(code, err, "--control", "is not a readable picture")


def test_controlnet_for_another_model(run_cli, control, sd_controlnet_folder):
    code, _, err = run_cli("generate", "a red circle on a blue background", "--control", control / "mask.png",
                           "--controlnet", sd_controlnet_folder)
    one_error(code, err, "does not fit --model", "cross_attention_dim")


def test_controlnet_folder_that_is_not_one(run_cli, control, tmp_path):
    code, _, err = run_cli("generate", "a red circle on a blue background", "--control", control / "mask.png",
                           "--controlnet", tmp_path)
    one_error(code, err, "is not a ControlNet folder")
    code, _, err = run_cli("generate", "a red circle on a blue background", "--control", control / "mask.png",
                           "--controlnet", default_model() / "unet")
    one_error(code, err, "holds a 'UNet2DConditionModel', not a ControlNetModel")


def test_control_on_another_model_needs_its_controlnet(run_cli, control, sd_folder):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--control", control / "mask.png")
    one_error(code, err, "needs --controlnet DIR")


def test_control_with_mask_is_refused(run_cli, control, shapes_controlnet):
    Image.new("RGB", (64, 64)).save(control / "init.png")
    Image.new("L", (64, 64), 255).save(control / "m.png")
    code, _, err = run_cli("generate", "a red circle on a blue background", "--init-image", control / "init.png",
                           "--mask", control / "m.png", "--control", control / "mask.png", "--controlnet", shapes_controlnet)
    one_error(code, err, "--control with --mask")


def test_the_shipped_controlnet_puts_the_shape_where_the_silhouette_is(run_cli, tmp_path):
    """The default ControlNet (for the default model) moves the shape onto the silhouette; without it, the model puts
    it elsewhere. Judged from the pixels: the shape's region against the silhouette."""
    from stepdiff.shapes.judge import judge

    sample = Sample("white", "circle", "black", 18, 46, 26)  # low left: where this prompt's seed-0 shape is not
    silhouette(sample).save(tmp_path / "mask.png")
    target = np.asarray(silhouette(sample))[..., 0] > 127
    prompt = "a red circle on a blue background"
    code, _, err = run_cli("generate", prompt, "--seed", "0", "--control", tmp_path / "mask.png",
                           "--output", tmp_path / "cn.png")
    assert code == 0, err
    code, _, err = run_cli("generate", prompt, "--seed", "0", "--output", tmp_path / "plain.png")
    assert code == 0, err

    def iou(path):
        pixels = _pixels(path)
        red = np.abs(pixels - np.array([220, 20, 20])).sum(-1) < 120
        return (red & target).sum() / (red | target).sum()

    assert iou(tmp_path / "cn.png") > 0.75, iou(tmp_path / "cn.png")
    assert iou(tmp_path / "plain.png") < 0.5, iou(tmp_path / "plain.png")
    verdict = judge(Image.open(tmp_path / "cn.png"))
    assert (verdict.color, verdict.background) == ("red", "blue")
    meta = json.loads(Image.open(tmp_path / "cn.png").text["stepdiff"])
    assert meta["controlnet"].endswith("shapes-control-v1")
