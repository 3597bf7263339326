"""The procedural dataset, the pixel judge, and the training script (smoke run, resume)."""

import json

import numpy as np
import pytest
import torch

import stepdiff
from stepdiff.shapes.dataset import (
    COLORS,
    SHAPES,
    all_combos,
    caption,
    eval_pairs,
    held_out_combos,
    render,
    sample_batch,
    train_combos,
)
from stepdiff.shapes.judge import judge, parse_caption


def test_dataset_is_deterministic_and_well_formed():
    a, caps_a = sample_batch(np.random.default_rng(5), 16)
    b, caps_b = sample_batch(np.random.default_rng(5), 16)
    assert np.array_equal(a, b) and caps_a == caps_b
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8
    for cap in caps_a:
        color, shape, background = parse_caption(cap)
        assert color in COLORS and shape in SHAPES and background in COLORS and color != background
        assert cap == caption(color, shape, background)


def test_held_out_split_is_disjoint_and_covers_every_word():
    held, train = set(held_out_combos()), set(train_combos())
    assert held and not held & train and held | train == set(all_combos())
    for i, name in enumerate(("colour", "shape", "background")):
        values = {c[i] for c in train}
        assert values == (set(SHAPES) if name == "shape" else set(COLORS))
    assert len(eval_pairs()) == 216 and len({seed for _, seed in eval_pairs()}) == 216


def test_judge_is_exact_on_ground_truth():
    images, caps = sample_batch(np.random.default_rng(0), 300, all_combos())
    for image, cap in zip(images, caps):
        color, shape, background = parse_caption(cap)
        v = judge(image)
        assert (v.color, v.shape, v.background) == (color, shape, background), (cap, v)


def _varied_ground_truth(rng, kind):
    """A Sample that is rotated, scaled beyond the training sizes, or touching an edge."""
    from stepdiff.shapes.dataset import Sample

    combos = all_combos()
    color, shape, background = combos[int(rng.integers(len(combos)))]
    angle = float(rng.uniform(0, 360)) if kind == "rotated" else 0.0
    size = float(rng.uniform(12, 22)) if kind == "small" else float(rng.uniform(44, 58)) if kind == "large" else \
        float(rng.uniform(22, 36))
    margin = size / 2 * (1.42 if angle else 1.0) + (0.5 if kind == "edge" else 1.0)
    cx, cy = (float(rng.uniform(margin, 64 - margin)) for _ in range(2))
    if kind == "edge":  # flush against one of the four sides
        cx = margin if rng.random() < 0.5 else 64 - margin
        if rng.random() < 0.5:
            cx, cy = cy, cx
    return Sample(color, shape, background, cx, cy, size, angle)


@pytest.mark.parametrize("kind", ["rotated", "small", "large", "edge"])
def test_judge_is_exact_on_rotated_scaled_and_edge_ground_truth(kind):
    rng = np.random.default_rng(7)
    for _ in range(150):
        sample = _varied_ground_truth(rng, kind)
        v = judge(render(sample))
        assert (v.color, v.shape, v.background) == (sample.color, sample.shape, sample.background), (sample, v)


def _rounded_square(radius_fraction, size=34.0):
    from PIL import Image, ImageDraw

    big = Image.new("RGB", (256, 256), COLORS["white"])
    half, r = size / 2 * 4, radius_fraction * size * 4
    ImageDraw.Draw(big).rounded_rectangle((128 - half, 128 - half, 128 + half, 128 + half), radius=r, fill=COLORS["red"])
    return big.resize((64, 64), Image.Resampling.BOX)


def test_judge_does_not_flatter_soft_squares():
    """A square whose corners are rounded off by nearly half its side reads as a circle, not a square; stray
    pixels of the shape colour elsewhere do not stretch its box."""
    assert judge(_rounded_square(0.1)).shape == "square"
    assert judge(_rounded_square(0.45)).shape == "circle"
    from stepdiff.shapes.dataset import Sample

    image = np.array(render(Sample("red", "circle", "blue", 30, 30, 30)))
    image[60:62, 60:62] = COLORS["red"]  # a 2x2 glitch far from the shape
    assert judge(image).shape == "circle"


def test_judge_reports_missing_shape():
    from stepdiff.shapes.dataset import Sample

    blank = np.array(render(Sample("red", "circle", "blue", 32, 32, 22)))
    blank[:] = COLORS["blue"]
    assert judge(blank).shape == "none"


def test_smoke_training_and_resume(tmp_path):
    import stepdiff
    from tools.train_shapes import TrainConfig, train

    cfg = TrainConfig().smoke_version()
    model = train(cfg, tmp_path)
    first = json.loads((tmp_path / "train_time.json").read_text())
    assert first["vae_resumed_from_step"] == 0 and first["unet_resumed_from_step"] == 0
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "preview_decoder/config.json"):
        assert (model / name).is_file(), name
    pipe = stepdiff.AutoPipelineForText2Image.from_pretrained(model)
    out = pipe("a red circle on a blue background", num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    # A second run of the same folder resumes: the VAE is done, the UNet continues from its checkpoint.
    train(cfg, tmp_path)
    second = json.loads((tmp_path / "train_time.json").read_text())
    assert second["vae_resumed_from_step"] == cfg.vae_steps
    assert second["unet_resumed_from_step"] == cfg.checkpoint_every


def test_controlnet_smoke_training_resume_and_publish(tmp_path):
    """tools/train_control: a few steps on the shipped model, a resume from its checkpoint, then --publish's folder
    loads into a ControlNet pipeline."""
    from diffusers import ControlNetModel

    import stepdiff
    from tools.train_control import ControlConfig, publish, train_control

    cfg = ControlConfig().smoke_version()
    base = stepdiff.default_model()
    train_control(cfg, base, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "train_time.json").read_text())["resumed_from_step"] == 0
    train_control(cfg, base, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "train_time.json").read_text())["resumed_from_step"] == cfg.steps
    dest = publish(tmp_path / "run", tmp_path / "published")
    assert json.loads((dest / "stepdiff.json").read_text())["base_model"] == base.name
    with pytest.raises(FileExistsError, match="already exists"):
        publish(tmp_path / "run", dest)
    pipe = stepdiff.StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=ControlNetModel.from_pretrained(dest, torch_dtype=torch.float32))
    out = pipe("a red circle on a blue background", image=torch.zeros(1, 3, 64, 64), num_inference_steps=2,
               output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("prompt,unknown", [("a red circle", []), ("a pink circle", ["pink"])])
def test_unknown_words(prompt, unknown):
    from stepdiff.shapes.dataset import VOCABULARY
    from stepdiff.vocabulary import unknown_words

    found, known = unknown_words(None, prompt, list(VOCABULARY))
    assert found == unknown and "circle" in known


def test_publish_never_replaces_a_folder_unasked(tmp_path):
    from tools.publish_shapes import publish

    with pytest.raises(FileNotFoundError, match="run="):
        publish(tmp_path / "no-run", tmp_path / "dest", 7.5, "ddim")
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "model_index.json").write_text("{}")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="dest=.*overwrite"):
        publish(tmp_path / "run", dest, 7.5, "ddim")
    assert (dest / "keep.txt").read_text() == "mine"


class _DrawsSquaresAsCircles:
    """A stand-in pipeline that draws the prompt exactly, except that every square comes out a circle."""

    device = "cpu"

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, num_inference_steps, guidance_scale, generator, callback_on_step_end=None):
        from types import SimpleNamespace

        from stepdiff.shapes.dataset import Sample

        images = []
        for text in prompt:
            color, shape, background = parse_caption(text)
            images.append(render(Sample(color, "circle" if shape == "square" else shape, background, 32, 32, 30)))
        return SimpleNamespace(images=images, record=SimpleNamespace(model_rows=len(prompt)), steps_completed=1)


def test_evaluate_breaks_misses_down_by_shape_colour_and_confusion():
    from stepdiff.shapes.dataset import held_out_combos
    from stepdiff.shapes.evaluate import evaluate, format_breakdown

    row = {"setting": "fake", **evaluate(_DrawsSquaresAsCircles(), guidance=1.0, seeds_per_combo=2, batch=7)}
    squares = sum(s == "square" for _, s, _ in held_out_combos()) * 2
    assert row["per_shape"] == {"circle": 1.0, "square": 0.0, "triangle": 1.0}
    assert row["confusion"]["square"] == {"circle": squares, "square": 0, "triangle": 0, "none": 0}
    assert row["confusion"]["circle"]["circle"] == sum(row["confusion"]["circle"].values()) > 0
    assert row["color"] == 1.0 and row["per_color"] == {c: 1.0 for c in row["per_color"]}
    assert row["all"] == pytest.approx(1 - squares / row["n"])
    assert min(row["per_combo"].values()) == 0.0 and all("square" in k for k, v in row["per_combo"].items() if v == 0)
    text = format_breakdown(row)
    assert "| square | 0.0% | 0.0% |" in text and f"| square | {squares} | 0 | 0 | 0 |" in text
    assert "weakest combinations: a " in text


def test_smoke_preview_decoder_distillation_and_resume(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from stepdiff import default_model
    from stepdiff.preview import load_tiny_decoder, tiny_decode
    from tools.distill_preview import DistillConfig, distill

    vae = AutoencoderKL.from_pretrained(default_model() / "vae", torch_dtype=torch.float32)
    cfg = DistillConfig().smoke_version()
    folder = distill(cfg, vae, tmp_path)
    tiny = load_tiny_decoder(folder, latent_channels=4, scale_factor=4)  # shapes VAEs are 4x: 4x16x16 -> 64x64
    assert tiny_decode(tiny, torch.zeros(1, 4, 16, 16)).shape == (1, 3, 64, 64)
    report = json.loads((tmp_path / "preview_decoder.json").read_text())
    assert report["resumed_from_step"] == 0 and "decoder_vs_vae_db" in report and report["x0_latents"] == 0
    # With the model's pipeline, the x0 estimates of its runs are targets too, and their fidelity is reported.
    pipe = stepdiff.AutoPipelineForText2Image.from_pretrained(default_model())
    distill(cfg, pipe.vae, tmp_path, pipe)
    report = json.loads((tmp_path / "preview_decoder.json").read_text())
    assert report["resumed_from_step"] == cfg.checkpoint_every
    assert report["x0_latents"] == cfg.x0_runs * cfg.x0_prompts * cfg.x0_steps and "decoder_vs_vae_x0_db" in report
