"""stepdiff generate --init-image / --mask / --strength: image to image and inpainting from the command line,
on the shipped model (re-colour a shape, repaint the background), and bad input before any model work."""

import json

import numpy as np
import pytest
from PIL import Image

from stepdiff.shapes.dataset import Sample, render
from stepdiff.shapes.judge import judge

from .test_cli_hardening import one_error


@pytest.fixture
def pictures(tmp_path):
    source = render(Sample("red", "circle", "blue", 32, 32, 30))
    source.save(tmp_path / "source.png")
    shape = np.abs(np.asarray(source).astype(int) - np.array(source.getpixel((0, 0)))).sum(-1) > 60
    grown = np.asarray(Image.fromarray((shape * 255).astype(np.uint8)).resize((64, 64)))
    from PIL import ImageFilter

    near = np.asarray(Image.fromarray(grown).filter(ImageFilter.MaxFilter(3)))
    Image.fromarray(255 - near).save(tmp_path / "background_mask.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small_mask.png")
    Image.new("RGB", (60, 60), "red").save(tmp_path / "odd.png")
    (tmp_path / "notes.txt").write_text("not a picture")
    return tmp_path


def test_image_to_image_recolours_the_shape(run_cli, pictures):
    out = pictures / "green.png"
    code, stdout, err = run_cli("generate", "a green circle on a blue background", "--init-image", pictures / "source.png",
                                "--strength", "0.5", "--output", out)
    assert code == 0, err
    verdict = judge(np.asarray(Image.open(out).convert("RGB")))
    assert (verdict.color, verdict.shape, verdict.background) == ("green", "circle", "blue")
    meta = json.loads(Image.open(out).text["stepdiff"])
    assert meta["strength"] == 0.5 and meta["init_image"].endswith("source.png")
    assert meta["record"]["steps_total"] == 12  # int(25 * 0.5) steps, the last half of the schedule
    assert "Denoising strength: 0.5" in Image.open(out).text["parameters"]


def test_inpainting_repaints_the_background_only(run_cli, pictures):
    out = pictures / "yellow.png"
    code, _, err = run_cli("generate", "a red circle on a yellow background", "--init-image", pictures / "source.png",
                           "--mask", pictures / "background_mask.png", "--output", out)
    assert code == 0, err
    verdict = judge(np.asarray(Image.open(out).convert("RGB")))
    assert (verdict.color, verdict.shape, verdict.background) == ("red", "circle", "yellow")


@pytest.mark.parametrize("extra,needles", [
    (["--init-image", "missing.png"], ["--init-image", "does not exist"]),
    (["--init-image", "notes.txt"], ["--init-image", "not a readable picture"]),
    (["--init-image", "."], ["--init-image", "is a folder"]),
    (["--init-image", "source.png", "--mask", "small_mask.png"], ["--mask is 32x32 but --init-image is 64x64"]),
    (["--init-image", "source.png", "--mask", "missing.png"], ["--mask", "does not exist"]),
    (["--init-image", "source.png", "--strength", "0"], ["--strength must be a number in (0, 1], got 0.0"]),
    (["--init-image", "source.png", "--strength", "1.5"], ["--strength must be a number in (0, 1]"]),
    (["--init-image", "source.png", "--strength", "0.01"], ["--strength 0.01 with --steps 25 leaves no denoising step"]),
    (["--init-image", "source.png", "--size", "32x32"], ["--size 32x32 differs from --init-image's 64x64"]),
    (["--mask", "background_mask.png"], ["--mask needs --init-image"]),
    (["--strength", "0.5"], ["--strength needs --init-image"]),
    (["--init-image", "odd.png"], ["--init-image width must be a multiple of 8", "got 60"]),
])
def test_bad_image_flags_exit_2_before_loading(run_cli, pictures, monkeypatch, extra, needles):
    monkeypatch.chdir(pictures)

    def no_loading(*a, **k):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr("stepdiff.cli._load", no_loading)
    code, out, err = run_cli("generate", "a red circle on a blue background", *extra)
    one_error(code, err, *needles)
    assert not list(pictures.glob("stepdiff-*.png"))
