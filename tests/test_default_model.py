"""The model that ships in the package: loads offline, draws what it is asked, CLI defaults to it."""

import json

import pytest
from PIL import Image

import stepdiff
from stepdiff.cli import main
from stepdiff.preview import FITTED_TABLE_FILE, table_for
from stepdiff.shapes.judge import judge

from .conftest import gen


@pytest.fixture(scope="module")
def shipped():
    pipe = stepdiff.AutoPipelineForText2Image.from_pretrained(stepdiff.default_model())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_layout_and_size():
    folder = stepdiff.default_model()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"][1] == "DDIMScheduler"
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert weights <= 25 * 1024 * 1024
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    info = json.loads((folder / "stepdiff.json").read_text())
    assert "circle" in info["vocabulary"] and info["guidance_scale"] > 1


def test_loads_in_float32_and_draws_the_prompt(shipped):
    assert shipped.unet.dtype == shipped.text_encoder.dtype == shipped.vae.dtype
    images = shipped(["a red circle on a blue background", "a yellow square on a black background"],
                     num_inference_steps=25, generator=[gen(0), gen(1)]).images
    verdicts = [judge(i) for i in images]
    assert (verdicts[0].color, verdicts[0].background) == ("red", "blue")
    assert (verdicts[1].color, verdicts[1].background) == ("yellow", "black")


def test_fitted_preview_table_is_used(shipped):
    assert (stepdiff.default_model() / FITTED_TABLE_FILE).is_file()
    assert table_for(shipped).name == f"fitted:{stepdiff.models.DEFAULT_MODEL_NAME}"


def test_shipped_tiny_preview_decoder_is_faithful(shipped):
    """The shipped preview_decoder/ stays close to the VAE decode of held-out latents. Issue 15's goal is 28 dB;
    shapes-v2's decoder reads 30.5 dB on 256 held-out renders (its distillation report; shapes-v1's read 28.4), so
    the floor here is 28 dB. On what previews show by default, the x0 estimates of runs on held-out prompts, it reads
    25.9 dB over every step of 8 runs (the decoder before x0 targets: 22.3): the floor there is 24 dB."""
    import math

    import numpy as np
    import torch

    from stepdiff.pipelines.base import decode_with_vae
    from stepdiff.preview import images_to_tensor, load_tiny_decoder, tiny_decode, tiny_decoder_folder
    from stepdiff.shapes.dataset import EVAL_SEED_BASE, all_combos, sample_batch

    folder = tiny_decoder_folder(shipped)
    assert folder is not None and folder.name == "preview_decoder"
    tiny = load_tiny_decoder(folder, shipped.latent_channels(), shipped.vae_scale_factor)
    images = images_to_tensor(sample_batch(np.random.default_rng(EVAL_SEED_BASE + 11), 48, all_combos())[0])
    with torch.no_grad():
        latents = shipped.vae.encode(images).latent_dist.mean * shipped.vae.config.scaling_factor
        target = decode_with_vae(shipped.vae, latents).float().clamp(-1, 1)
    mse = torch.nn.functional.mse_loss(tiny_decode(tiny, latents), target).item()
    assert 10 * math.log10(4 / mse) >= 28.0
    from tools.distill_preview import held_out_x0, tiny_vs_vae_db

    assert tiny_vs_vae_db(shipped.vae, tiny, held_out_x0(shipped, runs=3)) >= 24.0


def test_cli_previews_shipped_model_with_tiny_decoder_by_default(tmp_path, capsys):
    """The default --preview-method auto picks the model's tiny decoder: the last frame (source latents) is the
    final picture within a few levels, much closer than the linear table's."""
    import numpy as np
    from PIL import Image

    def last_frame_error(extra, name):
        out = tmp_path / f"{name}.png"
        args = ["generate", "a red square on a blue background", "--steps", "25", "--output", str(out),
                "--preview-dir", str(tmp_path / name), "--preview-source", "latents", *extra]
        assert main(args) == 0, capsys.readouterr().err
        frame = Image.open(tmp_path / name / "24.png").convert("RGB").resize((64, 64), Image.Resampling.BOX)
        return np.abs(np.asarray(frame, dtype=float) - np.asarray(Image.open(out).convert("RGB"), dtype=float)).mean()

    tiny, linear = last_frame_error([], "auto"), last_frame_error(["--preview-method", "linear"], "linear")
    assert tiny < 12 and tiny < linear / 2


def test_cli_uses_shipped_model_by_default(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "a green triangle on a white background", "--steps", "10", "--output", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    assert "Model: shapes-v3" in image.text["parameters"] and "Sampler: DDIM" in image.text["parameters"]
    assert "CFG scale: 7.5" in image.text["parameters"]


def test_cli_warns_with_known_words(tmp_path, capsys):
    assert main(["generate", "a pink circle", "--steps", "2", "--output", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err
    assert "does not know pink and ignores it; it knows: a, background, black, blue, circle" in err


def test_cli_size_too_small_for_model(capsys):
    assert main(["generate", "a red circle", "--size", "8x8"]) == 2
    err = capsys.readouterr().err
    assert "--size width must be a positive multiple of 8, at least 16 for this model, got 8" in err
    assert len(err.strip().splitlines()) == 1


def test_convergence_stop_with_euler_keeps_the_picture(tmp_path, capsys):
    """The README's recipe: Euler + StopOnConvergence() ends early, says why, and still draws the prompt."""
    out = tmp_path / "c.png"
    assert main(["generate", "a red circle on a blue background", "--scheduler", "euler", "--steps", "25",
                 "--stop-on-convergence", "--output", str(out)]) == 0
    image = Image.open(out)
    meta = json.loads(image.text["stepdiff"])
    assert meta["interrupted"] is True and meta["steps_completed"] < 25
    assert meta["stop_reason"] == "converged: x0 changed < 0.05 for 3 steps"
    verdict = judge(image)
    assert (verdict.color, verdict.shape, verdict.background) == ("red", "circle", "blue")
