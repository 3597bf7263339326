"""stepdiff.request: one validator per field, one FieldError, the rules between fields, what a request builds."""

from __future__ import annotations

import pytest
from PIL import Image

from stepdiff.request import (
    MAX_SEED,
    FieldError,
    GenerationRequest,
    SizeRule,
    check_guidance,
    check_seed,
    check_side,
    check_size,
    parse_interval,
)

FLAGS = {"seed": "--seed", "num_images": "--num-images", "guidance_scale": "--guidance", "mask_image": "--mask",
         "init_image": "--init-image", "strength": "--strength", "size": "--size", "steps": "--steps"}


@pytest.mark.parametrize(("fields", "field", "words"), [
    (dict(prompt=""), "prompt", "prompt must be a non-empty string, got ''"),
    (dict(prompt=5), "prompt", "prompt must be a non-empty string, got 5"),
    (dict(prompt="\udcff"), "prompt", "prompt is not valid UTF-8 text"),
    (dict(negative_prompt=["a"]), "negative_prompt", "negative_prompt must be a string, got ['a']"),
    (dict(seed=-1), "--seed", "--seed must be in [0, 2**64-1], got -1"),
    (dict(seed=1.5), "--seed", "--seed must be an integer in [0, 2**64-1], got 1.5"),
    (dict(seed=MAX_SEED, num_images=2), "--num-images", "runs past the largest seed, 2**64-1"),
    (dict(steps=0), "--steps", "--steps must be in [1, 10000], got 0"),
    (dict(steps=True), "--steps", "--steps must be an integer in [1, 10000], got True"),
    (dict(guidance_scale=float("nan")), "--guidance", "--guidance must be a number in [0, 100], got nan"),
    (dict(guidance_scale=10**400), "--guidance", "--guidance must be a number in [0, 100]"),
    (dict(cfg_cutoff=1.5), "cfg_cutoff", "cfg_cutoff must be a number in [0, 1], got 1.5"),
    (dict(cfg_cutoff_step=-1), "cfg_cutoff_step", "cfg_cutoff_step must be >= 0, got -1"),
    (dict(guidance_interval="0.9,0.1"), "guidance_interval", "START <= END"),
    (dict(guidance_interval=[0.1]), "guidance_interval", "two ratios START,END"),
    (dict(guidance_interval=[0, 2]), "guidance_interval[1]", "guidance_interval[1] must be a number in [0, 1], got 2"),
    (dict(cfg_cutoff=0.5, guidance_interval=(0, 1)), "guidance_interval",
     "give one of cfg_cutoff, cfg_cutoff_step and guidance_interval, not cfg_cutoff and guidance_interval"),
    (dict(scheduler="fastest"), "scheduler", "scheduler: unknown scheduler 'fastest'"),
    (dict(num_images=0), "--num-images", "--num-images must be >= 1, got 0"),
    (dict(strength=0.5), "--strength", "--strength needs --init-image"),
    (dict(control_scale=1.0), "control_scale", "control_scale needs control_image"),
    (dict(control_end=0.0, control_image=Image.new("RGB", (64, 64))), "control_end",
     "control_end must be a number in (0, 1], got 0.0"),
])
def test_a_bad_field_is_a_field_error_naming_the_field_the_value_and_what_is_allowed(fields, field, words):
    with pytest.raises(FieldError) as info:
        GenerationRequest(**{"prompt": "a cat", **fields}).validate(FLAGS)
    assert info.value.field == field and words in str(info.value) and info.value.allowed
    assert isinstance(info.value, ValueError)  # pytest.raises(ValueError) and the CLI's exit 2 keep working


def test_pictures_are_checked_against_each_other_and_the_model():
    picture, small = Image.new("RGB", (64, 64)), Image.new("L", (32, 32))
    with pytest.raises(FieldError, match="--mask is 32x32 but --init-image is 64x64"):
        GenerationRequest("a", init_image=picture, mask_image=small).validate(FLAGS)
    with pytest.raises(FieldError, match="--size 32x32 differs from --init-image's 64x64"):
        GenerationRequest("a", init_image=picture, width=32, height=32).validate(FLAGS)
    with pytest.raises(FieldError, match="--init-image width must be a positive multiple of 16, at least 16"):
        GenerationRequest("a", init_image=Image.new("RGB", (40, 48))).validate(FLAGS, size=SizeRule(16, 16))
    with pytest.raises(FieldError, match=r"--strength 0.01 with --steps 10 leaves no denoising step"):
        GenerationRequest("a", init_image=picture, strength=0.01, steps=10).validate(FLAGS)
    inpaint = GenerationRequest("a", init_image=picture, mask_image=Image.new("L", (64, 64))).validate()
    assert inpaint.strength == 1.0 and inpaint.kind == "inpaint"
    assert GenerationRequest("a", init_image=picture).validate().strength == 0.6


def test_one_parser_per_value_kind():
    assert parse_interval("0.2, 0.8") == parse_interval([0.2, 0.8]) == (0.2, 0.8)
    assert check_size(" 64 X 32 ") == (64, 32)
    assert check_seed(MAX_SEED) == MAX_SEED and check_guidance(7) == 7.0
    assert check_side(36) == 36
    with pytest.raises(FieldError, match="at most 128"):
        check_side(256, "width", SizeRule(8, 8, 128))
    with pytest.raises(FieldError, match="far beyond any size"):
        check_size("9" * 5000 + "x64")


def test_the_request_builds_the_call_the_guidance_and_the_metadata():
    from stepdiff.callbacks import CFGCutoffCallback, GuidanceIntervalCallback

    request = GenerationRequest("a cat", seed=5, num_images=2, guidance_interval="0.2,0.8").validate()
    request = request.with_model_defaults(default_guidance=5.0, native_size=64)
    kwargs = request.call_kwargs()
    assert kwargs["guidance_scale"] == 5.0 and (kwargs["width"], kwargs["height"]) == (64, 64)
    assert [g.initial_seed() for g in kwargs["generator"]] == [5, 6]
    assert [type(c) for c in request.guidance_callbacks()] == [GuidanceIntervalCallback]
    assert [type(c) for c in GenerationRequest("a", cfg_cutoff=0.4).guidance_callbacks()] == [CFGCutoffCallback]
    settings = request.image_settings("model", index=1)
    assert (settings.seed, settings.guidance_scale, settings.model) == (6, 5.0, "model")


def test_field_error_as_an_http_body():
    error = FieldError("guidance", 10**400, "a number in [0, 100]")
    body = error.to_dict()
    assert body["field"] == "guidance" and body["value"].startswith("1000") and body["allowed"] == "a number in [0, 100]"


def test_generate_takes_a_guidance_interval(run_cli, sd_folder, tmp_path, loader):
    """--guidance-interval comes with the request: no new checks in the CLI, the same message as batch's flag."""
    import json

    def no_loading(*a):
        raise AssertionError("the model must not load for a bad flag")

    loader(no_loading)
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--guidance-interval", "0.9,0.1")
    assert code == 2 and "--guidance-interval must be START,END with 0 <= START <= END <= 1, got '0.9,0.1'" in err
    loader(None)  # the real loader again
    out = tmp_path / "a.png"
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "4", "--guidance-interval", "0.5,1",
                           "--output", out)
    assert code == 0, err
    meta = json.loads(Image.open(out).text["stepdiff"])
    assert meta["guidance_interval"] == [0.5, 1.0] and meta["record"]["rows_per_step"] == [1, 1, 2, 2]
