"""Inpainting that keeps what is kept: stepdiff.images.keep_unmasked pastes the original pixels back outside the mask
(feathered edge); the library's pipelines keep the classic output by default; `stepdiff generate --mask` pastes back
unless --no-keep-unmasked, and says which in the metadata."""

import inspect
import json
import math

import diffusers
import numpy as np
import pytest
from PIL import Image, ImageFilter

import stepdiff
from stepdiff.images import KEEP_UNMASKED_FEATHER, keep_unmasked

from .conftest import gen, test_image
from .test_cli_hardening import one_error


def _far(mask: Image.Image, feather: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept pixels, repainted pixels) farther than the feathered edge reaches (3 * feather + 1 pixels) from the
    other side of the mask's edge."""
    white = np.asarray(mask.convert("L")) >= 128
    reach = 2 * math.ceil(3 * feather + 1) + 1

    def grow(region):
        return np.asarray(Image.fromarray((region * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(reach))) > 0

    return ~grow(white), ~grow(~white)


def _random(size=(96, 80), seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _blob_mask(size=(96, 80)):
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    return Image.fromarray((((xx - 44) ** 2 + (yy - 38) ** 2 < 24**2) * 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------ the library function


@pytest.mark.parametrize("feather", [0, 0.5, 1, 2, 3.5])
def test_outside_the_mask_the_original_inside_the_generated(feather):
    original, generated, mask = _random(seed=1), _random(seed=2), _blob_mask()
    out = np.asarray(keep_unmasked(original, generated, mask, feather=feather))
    kept, repainted = _far(mask, feather)
    assert kept.sum() > 2500 and repainted.sum() > 100
    assert np.array_equal(out[kept], np.asarray(original)[kept])
    assert np.array_equal(out[repainted], np.asarray(generated)[repainted])
    edge = ~kept & ~repainted
    if feather == 0:  # a hard edge: every pixel is one or the other, split at half grey as the pipelines split it
        white = np.asarray(mask) >= 128
        assert np.array_equal(out[white], np.asarray(generated)[white])
        assert np.array_equal(out[~white], np.asarray(original)[~white])
    else:  # a feathered edge: blends, between the two
        lo = np.minimum(np.asarray(original), np.asarray(generated)).astype(int)
        hi = np.maximum(np.asarray(original), np.asarray(generated)).astype(int)
        assert ((out[edge] >= lo[edge] - 1) & (out[edge] <= hi[edge] + 1)).all()
        differs = (out[edge] != np.asarray(original)[edge]).any(-1) & (out[edge] != np.asarray(generated)[edge]).any(-1)
        assert differs.sum() > 10


def test_the_mask_is_split_at_half_grey_as_the_pipelines_split_it():
    original, generated = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    mask = Image.fromarray(np.array([[127] * 4 + [128] * 4] * 8, dtype=np.uint8))
    out = np.asarray(keep_unmasked(original, generated, mask, feather=0))
    assert (out[:, :4] == (255, 0, 0)).all() and (out[:, 4:] == (0, 0, 255)).all()


def test_lists_as_the_pipelines_return_them_and_inputs_untouched():
    originals = [_random(seed=s) for s in (1, 2)]
    generated = [_random(seed=s) for s in (3, 4)]
    mask = _blob_mask()
    before = [np.asarray(im).copy() for im in originals + generated]
    out = keep_unmasked(originals, generated, mask)  # one mask for both
    assert isinstance(out, list) and len(out) == 2 and all(im.size == (96, 80) and im.mode == "RGB" for im in out)
    kept, repainted = _far(mask, KEEP_UNMASKED_FEATHER)
    for o, g, r in zip(originals, generated, out):
        assert np.array_equal(np.asarray(r)[kept], np.asarray(o)[kept])
        assert np.array_equal(np.asarray(r)[repainted], np.asarray(g)[repainted])
    assert all(np.array_equal(np.asarray(im), b) for im, b in zip(originals + generated, before))
    single = keep_unmasked(originals[0], generated, mask)  # one original for every generated image
    assert np.array_equal(np.asarray(single[1])[kept], np.asarray(originals[0])[kept])
    rgba = keep_unmasked(originals[0].convert("RGBA"), generated[0], mask.convert("RGB"))  # modes follow generated
    assert isinstance(rgba, Image.Image) and rgba.mode == "RGB"


@pytest.mark.parametrize("feather", [-1, -0.5, float("nan"), float("inf"), -math.inf])
def test_bad_feather_is_a_value_error_naming_it(feather):
    with pytest.raises(ValueError, match=r"^feather must be a number of pixels >= 0"):
        keep_unmasked(_random(), _random(), _blob_mask(), feather=feather)


@pytest.mark.parametrize("feather", ["2", True, None, [2]])
def test_a_feather_that_is_no_number_is_a_type_error_naming_it(feather):
    with pytest.raises(TypeError, match=r"^feather must be a number of pixels"):
        keep_unmasked(_random(), _random(), _blob_mask(), feather=feather)


@pytest.mark.parametrize("args,error,message", [
    ((_random(), _random((80, 80)), _blob_mask((80, 80))), ValueError, "original is 96x80 but generated is 80x80"),
    ((_random(), _random(), _blob_mask((80, 96))), ValueError, "mask is 80x96 but generated is 96x80"),
    ((_random(), [_random(), _random()], [_blob_mask()] * 3), ValueError, "mask is a list of 3 images but there are 2"),
    ((_random(), np.zeros((80, 96, 3)), _blob_mask()), TypeError, "generated must be a PIL image or a list of them"),
    ((_random(), [], _blob_mask()), TypeError, "generated must be a PIL image or a list of them"),
    (("picture.png", _random(), _blob_mask()), TypeError, "original must be a PIL image"),
])
def test_bad_pictures_name_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        keep_unmasked(*args)


# ------------------------------------------------------------------------------------------ the library's pipelines


def test_the_pipelines_keep_the_classic_output(sd_folder):
    """No paste-back by default, no new __call__ argument: the output is the classic pipeline's."""
    image, mask = test_image(32)
    ours = stepdiff.StableDiffusionInpaintPipeline.from_pretrained(sd_folder)
    theirs = diffusers.StableDiffusionInpaintPipeline.from_pretrained(sd_folder, safety_checker=None)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    for cls in (stepdiff.StableDiffusionInpaintPipeline, stepdiff.StableDiffusionXLInpaintPipeline):
        assert not {"keep_unmasked", "feather"} & set(inspect.signature(cls.__call__).parameters)
    kw = dict(prompt="a photo of a cat", image=image, mask_image=mask, num_inference_steps=4)
    a = np.asarray(ours(generator=gen(0), **kw).images[0]).astype(int)
    b = np.asarray(theirs(generator=gen(0), **kw).images[0]).astype(int)
    assert np.abs(a - b).max() <= 1  # the classic pixels (to float rounding)
    kept, _ = _far(mask, KEEP_UNMASKED_FEATHER)
    assert (a[kept] != np.asarray(image)[kept]).any()  # the VAE's version of the kept region, not pasted back
    back = np.asarray(keep_unmasked(image, ours(generator=gen(0), **kw).images, mask)[0])
    assert np.array_equal(back[kept], np.asarray(image)[kept])


# ------------------------------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def inpainted(tmp_path_factory):
    """The README's inpainting example on the shipped model, with and without paste-back (2 images each)."""
    from stepdiff.cli import main
    from stepdiff.shapes.dataset import Sample, render

    folder = tmp_path_factory.mktemp("keep")
    source = render(Sample("red", "circle", "blue", 32, 32, 30))
    source.save(folder / "source.png")
    mask = Image.new("L", source.size, 255)
    mask.paste(0, (14, 14, 50, 50))  # keep a square around the circle, repaint the rest
    mask.save(folder / "mask.png")
    outputs = {}
    for name, extra, count in (("default", [], 2), ("off", ["--no-keep-unmasked"], 2), ("on", ["--keep-unmasked"], 1)):
        code = main(["generate", "a red circle on a yellow background", "--init-image", str(folder / "source.png"),
                     "--mask", str(folder / "mask.png"), "--steps", "8", "--num-images", str(count),
                     "--output", str(folder / f"{name}.png"), *extra])
        assert code == 0
        outputs[name] = [folder / f"{name}-{i}.png" for i in (1, 2)] if count == 2 else [folder / f"{name}.png"]
    return source, mask, outputs


def test_cli_pastes_back_by_default(inpainted):
    source, mask, outputs = inpainted
    kept, repainted = _far(mask, KEEP_UNMASKED_FEATHER)
    assert kept.sum() > 200 and repainted.sum() > 1000
    for default, off in zip(outputs["default"], outputs["off"]):  # both images of a run
        pasted, raw = np.asarray(Image.open(default)), np.asarray(Image.open(off))
        assert np.array_equal(pasted[kept], np.asarray(source)[kept])  # the original's own pixels
        assert not np.array_equal(raw[kept], np.asarray(source)[kept])  # the VAE's version of them
        assert np.array_equal(pasted[repainted], raw[repainted])  # inside the mask: the generated pixels
    on = Image.open(outputs["on"][0])  # --keep-unmasked, the default, said out loud
    assert np.array_equal(np.asarray(on)[kept], np.asarray(source)[kept]) and json.loads(on.text["stepdiff"])["keep_unmasked"]
    assert not np.array_equal(np.asarray(Image.open(outputs["off"][0])), np.asarray(Image.open(outputs["off"][1])))


def test_cli_records_it_in_the_metadata(inpainted):
    _, _, outputs = inpainted
    on, off = Image.open(outputs["default"][0]), Image.open(outputs["off"][0])
    record = json.loads(on.text["stepdiff"])
    assert record["keep_unmasked"] is True and record["keep_unmasked_feather"] == KEEP_UNMASKED_FEATHER
    assert f"Keep unmasked: feather {KEEP_UNMASKED_FEATHER:g}" in on.text["parameters"]
    record = json.loads(off.text["stepdiff"])
    assert record["keep_unmasked"] is False and record["keep_unmasked_feather"] is None
    assert "Keep unmasked: no" in off.text["parameters"]


def test_cli_image_to_image_has_no_paste_back_field(run_cli, tmp_path):
    from stepdiff.shapes.dataset import Sample, render

    render(Sample("red", "circle", "blue", 32, 32, 30)).save(tmp_path / "source.png")
    code, _, err = run_cli("generate", "a green circle on a blue background", "--init-image", tmp_path / "source.png",
                           "--steps", "4", "--output", tmp_path / "out.png")
    assert code == 0, err
    out = Image.open(tmp_path / "out.png")
    assert json.loads(out.text["stepdiff"])["keep_unmasked"] is None and "Keep unmasked" not in out.text["parameters"]


@pytest.mark.parametrize("flag", ["--keep-unmasked", "--no-keep-unmasked"])
def test_cli_keep_flags_need_a_mask(run_cli, tmp_path, monkeypatch, flag, loader):
    from stepdiff.shapes.dataset import Sample, render

    render(Sample("red", "circle", "blue", 32, 32, 30)).save(tmp_path / "source.png")

    def no_loading(*a, **k):
        raise AssertionError("the model must not load for bad input")

    loader(no_loading)
    for extra in ([], ["--init-image", tmp_path / "source.png"]):
        code, _, err = run_cli("generate", "a red circle", *extra, flag, "--output", tmp_path / "x.png")
        one_error(code, err, f"{flag} needs --mask")
    assert not (tmp_path / "x.png").exists()


def test_cli_help_says_it(run_cli):
    code, out, _ = run_cli("generate", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "--keep-unmasked, --no-keep-unmasked" in text
    assert f"with a {KEEP_UNMASKED_FEATHER:g}-pixel feathered edge" in text
