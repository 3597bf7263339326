"""stepdiff generate --init-image / --mask / --strength: image to image and inpainting from the command line,
on the shipped model (re-colour a shape, repaint the background), and bad input before any model work."""

import json
import os
import threading

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
    (["--init-image", "odd.png"], ["--init-image width must be a positive multiple of 8", "got 60"]),
])
def test_bad_image_flags_exit_2_before_loading(run_cli, pictures, monkeypatch, extra, needles, loader):
    monkeypatch.chdir(pictures)

    def no_loading(*a, **k):
        raise AssertionError("the model must not load for bad input")

    loader(no_loading)
    code, out, err = run_cli("generate", "a red circle on a blue background", *extra)
    one_error(code, err, *needles)
    assert not list(pictures.glob("stepdiff-*.png"))


# ------------------------------------------------------------------------------------------- pictures read right (issue 24)


def test_a_16_bit_phone_picture_is_read_as_displayed_and_its_mask_fits(run_cli, tmp_path):
    """A 16-bit picture read as white, and a rotated one sideways, so that a mask drawn on the picture as displayed
    was refused as the wrong size. With --keep-unmasked (the default), the output outside the mask is the picture
    as read: here quarter and three-quarter greys, turned as the EXIF orientation says."""
    values = np.full((64, 72), 16384, np.uint16)  # stored 72 wide, 64 high
    values[:, 36:] = 49152
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: 64 wide, 72 high
    Image.fromarray(values).save(tmp_path / "photo.png", exif=exif)
    mask = np.zeros((72, 64), np.uint8)  # drawn on the picture as displayed
    mask[28:44, 24:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    code, _, err = run_cli("generate", "a red circle on a blue background", "--init-image", tmp_path / "photo.png",
                           "--mask", tmp_path / "mask.png", "--steps", "2", "--output", out)
    assert code == 0, err
    shown = np.rot90(np.round(values / 257).astype(np.uint8), -1)  # orientation 6, as a viewer shows it
    assert shown.shape == (72, 64) and set(np.unique(shown)) == {64, 191}
    result = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert result.shape == (72, 64, 3)
    far = np.ones((72, 64), bool)
    far[28 - 8 : 44 + 8, 24 - 8 : 40 + 8] = False  # beyond the feathered edge: the picture's own pixels
    assert np.array_equal(result[far], np.repeat(shown[far][:, None], 3, axis=1))


def _fifo(folder):
    os.mkfifo(folder / "pipe.png")
    return folder / "pipe.png"


def _animated(folder):
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green")]
    frames[0].save(folder / "moving.gif", save_all=True, append_images=frames[1:])
    return folder / "moving.gif"


def _huge(folder):
    from .test_read_image import png_header_only

    return png_header_only(folder / "huge.png", 20000, 20000)


@pytest.mark.parametrize("flag", ["--init-image", "--mask", "--control"])
@pytest.mark.parametrize(("make", "words"), [
    (_fifo, "is a named pipe (FIFO), not a regular file"),
    (_animated, "is an animated GIF of 2 frames; give a still picture"),
    (_huge, "is 400 megapixels; at most 67 megapixels (8192x8192) are read"),
])
def test_pictures_that_cannot_be_used_exit_2_in_one_line_before_loading(run_cli, pictures, monkeypatch, flag, make,
                                                                          words, loader):
    """Issue 24: a FIFO blocked forever, an animation used its first frame, a huge PNG exited 1 through the catch-all."""
    monkeypatch.chdir(pictures)
    loader(lambda *a, **k: pytest.fail("the model must not load for bad input"))
    bad = make(pictures)
    argv = {"--init-image": ["--init-image", bad], "--mask": ["--init-image", "source.png", "--mask", bad],
            "--control": ["--control", bad]}[flag]
    result = {}
    thread = threading.Thread(target=lambda: result.update(zip(("code", "out", "err"), run_cli(
        "generate", "a red circle on a blue background", *argv))), daemon=True)
    thread.start()
    thread.join(15)
    if thread.is_alive():  # the old reader waits on the FIFO: unblock it, then fail
        os.close(os.open(bad, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail(f"{flag} waited on a FIFO")
    one_error(result["code"], result["err"], f"{flag} {str(bad)!r} {words}")
    assert not list(pictures.glob("stepdiff-*.png"))
