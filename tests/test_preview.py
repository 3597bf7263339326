"""Previews: built-in tables, table choice, least-squares fit, PreviewCallback, bad input."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from stepdiff.preview import (
    FITTED_TABLE_FILE,
    LatentRGBTable,
    PreviewCallback,
    builtin_tables,
    contact_sheet,
    fit_latent_rgb,
    preview_psnr,
    table_for,
)

from .conftest import gen


def test_builtin_tables_cover_four_families_with_sources():
    tables = builtin_tables()
    assert {n: t.channels for n, t in tables.items()} == {"sd15": 4, "sdxl": 4, "sd3": 16, "flux": 16}
    assert all("github.com" in t.source for t in tables.values())


def _fake_pipe(channels, scaling, folder=None):
    return SimpleNamespace(config=SimpleNamespace(_name_or_path=folder),
                           vae=SimpleNamespace(config=SimpleNamespace(latent_channels=channels, scaling_factor=scaling)))


@pytest.mark.parametrize("channels,scaling,expected", [(4, 0.18215, "sd15"), (4, 0.13025, "sdxl"), (16, 1.5305, "sd3"),
                                                       (16, 0.3611, "flux")])
def test_table_chosen_from_vae_config(channels, scaling, expected):
    assert table_for(_fake_pipe(channels, scaling)).name == expected


def test_fitted_table_in_model_folder_comes_first(tmp_path):
    fitted = LatentRGBTable("mine", ((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0)), (0, 0, 0), "test")
    fitted.save(tmp_path)
    assert json.loads((tmp_path / FITTED_TABLE_FILE).read_text())["name"] == "mine"
    assert table_for(_fake_pipe(4, 0.18215, str(tmp_path))) == fitted


def test_no_table_for_unknown_channel_count():
    with pytest.raises(ValueError, match="no built-in latent-to-RGB table has 8 channels"):
        table_for(_fake_pipe(8, 1.0))


class LinearVAE:
    """A VAE whose decoder is exactly linear per latent pixel: the fit must recover it."""

    def __init__(self, factors, bias, scaling):
        self.factors, self.bias = torch.tensor(factors), torch.tensor(bias)
        self.config = SimpleNamespace(scaling_factor=scaling, shift_factor=None)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.enc = torch.randn(6, 4, generator=gen(5))

    def encode(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 4)
        features = torch.cat([pooled, pooled**2], dim=1)  # 6 features: the 4 latent channels are full rank
        mean = torch.einsum("nchw,cl->nlhw", features, self.enc)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, mode=lambda: mean))

    def decode(self, z, return_dict=True):
        # rgb = (z * scaling) @ factors + bias, then nearest upsampling by 4
        rgb = torch.einsum("nlhw,lr->nrhw", z * self.config.scaling_factor, self.factors) + self.bias[:, None, None]
        sample = rgb.repeat_interleave(4, -1).repeat_interleave(4, -2)
        return (sample,) if not return_dict else SimpleNamespace(sample=sample)


def test_fit_recovers_an_exactly_linear_decoder():
    factors = [[0.3, 0.1, 0.0], [-0.2, 0.4, 0.1], [0.1, -0.1, 0.5], [0.0, 0.2, -0.3]]
    vae = LinearVAE(factors, [0.1, -0.05, 0.02], scaling=0.5)
    images = torch.rand(16, 3, 32, 32, generator=gen(1)) * 2 - 1
    table = fit_latent_rgb(vae, images)
    assert np.allclose(table.factors, factors, atol=1e-4)
    assert np.allclose(table.bias, [0.1, -0.05, 0.02], atol=1e-4)
    latents = vae.encode(images).latent_dist.mean * 0.5
    assert preview_psnr(vae, table, latents) > 60


def test_fit_beats_builtin_tables_on_a_real_vae(sd_pipe):
    images = torch.rand(24, 3, 32, 32, generator=gen(2)) * 2 - 1
    images = torch.nn.functional.avg_pool2d(images, 8).repeat_interleave(8, -1).repeat_interleave(8, -2)  # blocky
    table = fit_latent_rgb(sd_pipe.vae, images[:16])
    latents = sd_pipe.vae.encode(images[16:]).latent_dist.mean * sd_pipe.vae.config.scaling_factor
    fitted = preview_psnr(sd_pipe.vae, table, latents)
    assert all(fitted > preview_psnr(sd_pipe.vae, t, latents) for t in builtin_tables().values() if t.channels == 4)


def test_preview_callback_writes_frames_animation_sheet(pipe, tmp_path):
    seen = []
    cb = PreviewCallback(folder=tmp_path / "frames", every=2, animation=tmp_path / "a.gif",
                         contact_sheet=tmp_path / "sheet.png", on_image=lambda im, i, t: seen.append(i))
    pipe("a cat", num_inference_steps=5, generator=gen(), callback_on_step_end=cb)
    assert sorted(int(p.stem) for p in (tmp_path / "frames").glob("*.png")) == [0, 2, 4]
    assert seen == [0, 2, 4]
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == 3
    sheet = Image.open(tmp_path / "sheet.png")
    w, h = cb.frames[0][1].size
    assert sheet.size == (3 * w, h + 12)


@pytest.mark.parametrize("source", ["denoised", "latents"])
@pytest.mark.parametrize("method", ["linear", "vae"])
def test_previews_only_observe(sd_pipe, source, method):
    plain = sd_pipe("a cat", num_inference_steps=4, generator=gen(), output_type="np").images
    cb = PreviewCallback(source=source, method=method)
    with_preview = sd_pipe("a cat", num_inference_steps=4, generator=gen(), output_type="np", callback_on_step_end=cb).images
    assert np.array_equal(plain, with_preview)
    assert len(cb.frames) == 4


def test_vae_method_matches_final_image(sd_pipe):
    cb = PreviewCallback(source="latents", method="vae")
    out = sd_pipe("a cat", num_inference_steps=3, generator=gen(), callback_on_step_end=cb)
    assert np.abs(np.asarray(cb.frames[-1][1], dtype=int) - np.asarray(out.images[0], dtype=int)).max() <= 1


def test_denoised_preview_is_cleaner_than_noisy_latents_early(sd_pipe):
    """At the first step the x0 estimate is far from noise; the noisy latents are mostly noise."""
    frames = {}
    for source in ("denoised", "latents"):
        cb = PreviewCallback(source=source, method="vae")
        sd_pipe("a cat", num_inference_steps=10, generator=gen(), callback_on_step_end=cb)
        frames[source] = np.asarray(cb.frames[0][1], dtype=float)
    final_cb = PreviewCallback(source="latents", method="vae")
    sd_pipe("a cat", num_inference_steps=10, generator=gen(), callback_on_step_end=final_cb)
    final = np.asarray(final_cb.frames[-1][1], dtype=float)
    assert np.abs(frames["denoised"] - final).mean() < np.abs(frames["latents"] - final).mean()


def test_preview_after_interrupt_still_writes_animation(sd_pipe, tmp_path):
    def stop(p, i, t, kw):
        if i == 1:
            p._interrupt = True
        return kw

    cb = PreviewCallback(animation=tmp_path / "a.webp")
    sd_pipe("a cat", num_inference_steps=6, generator=gen(), callback_on_step_end=[cb, stop])
    assert Image.open(tmp_path / "a.webp").n_frames == 2


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(every=0), ValueError, "every must be an int >= 1, got 0"),
    (dict(source="noise"), ValueError, "source must be one of"),
    (dict(method="fast"), ValueError, "method must be one of"),
    (dict(animation="x.mp4"), ValueError, "animation must end in one of"),
    (dict(contact_sheet="/nonexistent-dir/s.png"), FileNotFoundError, "does not exist"),
])
def test_bad_preview_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        PreviewCallback(**kwargs)


def test_preview_folder_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        PreviewCallback(folder=tmp_path / "f")


def test_table_channel_mismatch_fails_before_generation(sd_pipe, count_calls):
    calls = count_calls(sd_pipe)
    table = builtin_tables()["sd3"]
    with pytest.raises(ValueError, match="has 16 channels but this model's latents have 4"):
        sd_pipe("a cat", num_inference_steps=2, callback_on_step_end=PreviewCallback(table=table))
    assert calls.calls == 0


def test_contact_sheet_needs_frames():
    with pytest.raises(ValueError, match="at least one frame"):
        contact_sheet([])


def test_cli_preview_flags(sd_folder, tmp_path, capsys):
    from stepdiff.cli import main

    code = main(["generate", "a cat", "--model", str(sd_folder), "--steps", "4", "--output", str(tmp_path / "x.png"),
                 "--preview-dir", str(tmp_path / "pv"), "--preview-every", "2", "--preview-source", "latents",
                 "--animation", str(tmp_path / "a.gif"), "--contact-sheet", str(tmp_path / "s.png")])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "pv").iterdir()) == ["0.png", "2.png", "3.png"]
    assert Image.open(tmp_path / "a.gif").n_frames == 3 and (tmp_path / "s.png").is_file()
    assert main(["generate", "a cat", "--model", str(sd_folder), "--preview-every", "0"]) == 2


def test_cli_fit_preview_writes_table(sd_folder, tmp_path, capsys):
    import shutil

    from stepdiff.cli import main

    folder = shutil.copytree(sd_folder, tmp_path / "m")
    assert main(["fit-preview", str(folder), "--count", "32"]) == 0
    out = capsys.readouterr().out
    assert "fitted" in out and "sd15" in out
    table = LatentRGBTable.load(folder / FITTED_TABLE_FILE)
    assert table.channels == 4 and table.name == "fitted:m"
    assert main(["fit-preview", str(tmp_path / "missing")]) == 2


# --- tiny preview decoder (AutoencoderTiny) ---


@pytest.fixture
def sd_with_tiny(sd_folder, tmp_path):
    """The tiny SD model folder with a preview_decoder/ beside its components."""
    import shutil

    from stepdiff.preview import PREVIEW_DECODER_DIR
    from stepdiff.testing import make_tiny_preview_decoder

    folder = shutil.copytree(sd_folder, tmp_path / "with-tiny")
    make_tiny_preview_decoder(folder / PREVIEW_DECODER_DIR, latent_channels=4, scale_factor=2)
    return folder


def _sd(folder):
    import stepdiff

    p = stepdiff.StableDiffusionPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


def test_tiny_preview_uses_model_folder_decoder_at_full_size(sd_with_tiny):
    pipe = _sd(sd_with_tiny)
    cb = PreviewCallback(method="tiny")
    out = pipe("a cat", num_inference_steps=3, generator=gen(), callback_on_step_end=cb)
    assert cb.resolved_method == "tiny" and len(cb.frames) == 3
    assert cb.frames[0][1].size == out.images[0].size  # tiny decoders upsample to image size, unlike the table


@pytest.mark.parametrize("with_decoder,expected", [(True, "tiny"), (False, "linear")])
def test_auto_picks_tiny_when_present_else_linear(sd_with_tiny, sd_folder, with_decoder, expected):
    pipe = _sd(sd_with_tiny if with_decoder else sd_folder)
    cb = PreviewCallback(method="auto")
    pipe("a cat", num_inference_steps=2, generator=gen(), callback_on_step_end=cb)
    assert cb.resolved_method == expected


def test_tiny_preview_matches_the_decoder_and_only_observes(sd_with_tiny):
    from diffusers import AutoencoderTiny

    from stepdiff.preview import PREVIEW_DECODER_DIR

    pipe = _sd(sd_with_tiny)
    plain = pipe("a cat", num_inference_steps=3, generator=gen(), output_type="np").images
    seen = []
    cb = PreviewCallback(method="tiny", source="latents")

    def grab(p, i, t, kw):
        seen.append(kw["latents"].clone())
        return kw

    out = pipe("a cat", num_inference_steps=3, generator=gen(), output_type="np", callback_on_step_end=[grab, cb],
               callback_on_step_end_tensor_inputs=["latents"]).images
    assert np.array_equal(plain, out)
    decoder = AutoencoderTiny.from_pretrained(sd_with_tiny / PREVIEW_DECODER_DIR)
    expected = decoder.decode(seen[-1][:1]).sample.clamp(-1, 1)[0]
    expected = ((expected + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(cb.frames[-1][1], dtype=int) - expected.astype(int)).max() <= 1


def test_tiny_decode_undoes_the_decoders_scaling_and_shift(tmp_path):
    from diffusers import AutoencoderTiny

    from stepdiff.preview import tiny_decode
    from stepdiff.testing import make_tiny_preview_decoder

    decoder = AutoencoderTiny.from_pretrained(make_tiny_preview_decoder(tmp_path / "d", scaling_factor=1.5, shift_factor=0.1))
    latents = torch.randn(2, 4, 8, 8, generator=gen(3))
    expected = decoder.decode(latents / 1.5 + 0.1).sample.clamp(-1, 1)
    assert torch.allclose(tiny_decode(decoder, latents), expected)


def test_tiny_without_decoder_fails_before_generation(sd_pipe, count_calls):
    calls = count_calls(sd_pipe)
    with pytest.raises(FileNotFoundError, match="has no preview_decoder/ and no tiny_decoder was given"):
        sd_pipe("a cat", num_inference_steps=2, callback_on_step_end=PreviewCallback(method="tiny"))
    assert calls.calls == 0


@pytest.mark.parametrize("make,message", [
    (dict(latent_channels=16, scale_factor=2), "decodes 16-channel latents but this model's latents have 4 channels"),
    (dict(latent_channels=4, scale_factor=8), "upsamples latents 8x but this model's VAE is 2x"),
])
def test_mismatched_tiny_decoder_fails_before_generation(sd_pipe, count_calls, tmp_path, make, message):
    from stepdiff.testing import make_tiny_preview_decoder

    folder = make_tiny_preview_decoder(tmp_path / "taesd", **make)
    calls = count_calls(sd_pipe)
    with pytest.raises(ValueError, match=message):
        sd_pipe("a cat", num_inference_steps=2, callback_on_step_end=PreviewCallback(method="tiny", tiny_decoder=folder))
    assert calls.calls == 0


def test_tiny_decoder_folder_errors(sd_folder, sd_pipe, tmp_path):
    from stepdiff.preview import load_tiny_decoder

    with pytest.raises(FileNotFoundError, match="tiny_decoder: .* is not an AutoencoderTiny folder"):
        PreviewCallback(method="tiny", tiny_decoder=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds a 'AutoencoderKL', not an AutoencoderTiny"):
        load_tiny_decoder(sd_folder / "vae")
    with pytest.raises(ValueError, match="tiny_decoder is only used with method='tiny' or 'auto'"):
        PreviewCallback(method="linear", tiny_decoder=sd_folder / "vae")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(FileNotFoundError, match="has no .safetensors weights"):
        load_tiny_decoder(empty)


def test_cli_tiny_preview(sd_with_tiny, sd_folder, tmp_path, capsys):
    from stepdiff.cli import main
    from stepdiff.preview import PREVIEW_DECODER_DIR

    base = ["generate", "a cat", "--steps", "2", "--overwrite", "--output", str(tmp_path / "x.png"), "--preview-dir"]
    assert main([*base, str(tmp_path / "a"), "--model", str(sd_with_tiny)]) == 0, capsys.readouterr().err
    assert main([*base, str(tmp_path / "b"), "--model", str(sd_folder), "--preview-method", "tiny",
                 "--preview-decoder", str(sd_with_tiny / PREVIEW_DECODER_DIR)]) == 0, capsys.readouterr().err
    assert (tmp_path / "a" / "1.png").is_file() and (tmp_path / "b" / "1.png").is_file()
    assert main([*base, str(tmp_path / "c"), "--model", str(sd_folder), "--preview-method", "tiny"]) == 2
    assert "no preview_decoder/" in capsys.readouterr().err
