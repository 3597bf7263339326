"""Single-file checkpoints load offline, with no ``config=``: ``from_single_file(path)`` and ``stepdiff generate
--model file.safetensors`` derive every config from the file's tensor shapes and the family's conventions
(``stepdiff.single_file``). The files are written by ``save_single_file`` (original key layout, proven by diffusers'
own converters) from tiny models built as the released ones are (``make_tiny_standard``: CLIP's real tokenizer and
vocabulary, 64 channels per head, ...). Real-size configs are checked on meta-device models (no weights). Hub ids:
the local hub cache offline, one clear line when neither network nor cache has them."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import stepdiff
from stepdiff import single_file
from stepdiff.testing import make_tiny_standard, save_single_file

from .conftest import gen

CLASSES = {"v1": stepdiff.StableDiffusionPipeline, "xl": stepdiff.StableDiffusionXLPipeline,
           "sd3": stepdiff.StableDiffusion3Pipeline}


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    """variant -> (folder, single file) of a tiny standard model, made on first use."""
    made = {}

    def get(variant):
        if variant not in made:
            out = tmp_path_factory.mktemp(f"standard-{variant}")
            folder = make_tiny_standard(out / "folder", variant)
            made[variant] = folder, save_single_file(folder, out / f"tiny-{variant}.safetensors")
        return made[variant]

    return get


def _images(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np", generator=gen(0),
                **kw).images


@pytest.mark.parametrize("variant", ["v1", "xl", "sd3"])
def test_from_single_file_without_config_matches_the_folder(standard, variant):
    folder, checkpoint = standard(variant)
    cls = CLASSES[variant]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = cls.from_single_file(checkpoint)  # no config=, and HF_HUB_OFFLINE=1: nothing can come from a hub
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "T5" in str(w.message)]
    assert type(ours) is cls
    assert len(notes) == (variant == "sd3")  # SD3's T5 is left out, and says so: its tokenizer is not offline
    reference = cls.from_pretrained(folder, **({"text_encoder_3": None, "tokenizer_3": None} if variant == "sd3" else {}))

    derived = single_file.config_folder(checkpoint)
    for name, model in ours.components.items():
        if isinstance(model, torch.nn.Module):
            want, got = getattr(reference, name).state_dict(), model.state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
            config = json.loads((derived / name / "config.json").read_text())
            stored = json.loads((folder / name / "config.json").read_text())
            differ = {k: (v, stored.get(k)) for k, v in config.items()
                      if not k.startswith("_") and k != "architectures" and json.loads(json.dumps(stored.get(k, v))) != v}
            assert not differ, (name, differ)  # the shapes and the conventions give back the folder's config
    assert ours.tokenizer("a photo of a cat").input_ids == reference.tokenizer("a photo of a cat").input_ids
    assert type(ours.scheduler) is type(reference.scheduler)
    def settings(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert settings(ours.scheduler.config) == settings(reference.scheduler.config)
    assert np.abs(_images(ours) - _images(reference)).max() <= 1e-6


def test_sd3_file_t5_loads_when_a_tokenizer_is_given(standard):
    from transformers import AutoTokenizer

    folder, checkpoint = standard("sd3")
    tokenizer_3 = AutoTokenizer.from_pretrained(folder / "tokenizer_3")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "T5 left out" warning now
        ours = stepdiff.StableDiffusion3Pipeline.from_single_file(checkpoint, tokenizer_3=tokenizer_3)
    reference = stepdiff.StableDiffusion3Pipeline.from_pretrained(folder)
    assert ours.text_encoder_3 is not None and not ours.text_encoder_3.training
    assert np.abs(_images(ours) - _images(reference)).max() <= 1e-6


def test_the_clip_tokenizer_is_openai_clip(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(single_file.write_clip_tokenizer(tmp_path / "t", pad_token="!"))
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77 and tokenizer.pad_token_id == 0
    # the ids every SD user has seen: <|startoftext|> a photo of a cat <|endoftext|>, astronaut riding a horse
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("An astronaut riding a horse").input_ids == [49406, 550, 18376, 6765, 320, 4558, 49407]


# ------------------------------------------------------------------------------- real sizes, on the meta device


def _meta_checkpoint(components):
    """The original-layout names and shapes of real-size models built on the meta device (no weights), and the
    VAE's config."""
    from stepdiff import testing

    out, vae = {}, None
    for convert, model, *rest in components:
        out.update(convert(model.state_dict(), *rest))
        if convert is testing.ldm_layout._vae_to_ldm:
            vae = model.config
    return {k: tuple(v.shape) for k, v in out.items()}, vae


def _on_meta(cls, *args, **kwargs):
    with torch.device("meta"):
        return cls(*args, **kwargs)


def _real(variant):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stepdiff import testing

    def vae(**kw):
        kw = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
              "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, **kw}
        model = _on_meta(AutoencoderKL, **kw)
        return testing.ldm_layout._vae_to_ldm, model, dict(model.config)

    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
    big_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
    if variant == "sd15":
        unet = _on_meta(UNet2DConditionModel, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64)
        te = _on_meta(CLIPTextModel, clip_l)
        parts = [(testing.ldm_layout._unet_to_ldm, unet, dict(unet.config)), vae(sample_size=512),
                 (testing.ldm_layout._clip_to_ldm, te, "cond_stage_model.transformer.")]
        return parts, {"unet": unet.config, "text_encoder": clip_l}, "v1"
    if variant == "sd21":
        unet = _on_meta(UNet2DConditionModel, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True,
                        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=96)
        # OpenCLIP-H: 24 layers in the file, the penultimate one's output used (diffusers' config: 23)
        h24 = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, hidden_act="gelu", projection_dim=1024)
        te = _on_meta(CLIPTextModelWithProjection, h24)
        parts = [(testing.ldm_layout._unet_to_ldm, unet, dict(unet.config)), vae(sample_size=768),
                 (testing.ldm_layout._open_clip_to_ldm, te, "cond_stage_model.model.")]
        h23 = CLIPTextConfig(**{**h24.to_dict(), "num_hidden_layers": 23})
        return parts, {"unet": unet.config, "text_encoder": h23}, "v2"
    if variant == "sdxl":
        unet = _on_meta(UNet2DConditionModel, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                        projection_class_embeddings_input_dim=2816, sample_size=128,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        te, te2 = _on_meta(CLIPTextModel, clip_l), _on_meta(CLIPTextModelWithProjection, big_g)
        parts = [(testing.ldm_layout._unet_to_ldm, unet, dict(unet.config)), vae(sample_size=1024, scaling_factor=0.13025),
                 (testing.ldm_layout._clip_to_ldm, te, "conditioner.embedders.0.transformer."),
                 (testing.ldm_layout._open_clip_to_ldm, te2, "conditioner.embedders.1.model.")]
        return parts, {"unet": unet.config, "text_encoder": clip_l, "text_encoder_2": big_g}, "xl"
    transformer = _on_meta(SD3Transformer2DModel, sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                           attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                           caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                           pos_embed_max_size=192)
    te, te2 = _on_meta(CLIPTextModelWithProjection, clip_l), _on_meta(CLIPTextModelWithProjection, big_g)
    parts = [(testing.ldm_layout._sd3_transformer_to_ldm, transformer, dict(transformer.config)),
             vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
                 scaling_factor=1.5305, shift_factor=0.0609),
             (testing.ldm_layout._clip_to_ldm, te, "text_encoders.clip_l.transformer."),
             (testing.ldm_layout._clip_to_ldm, te2, "text_encoders.clip_g.transformer.")]
    return parts, {"transformer": transformer.config, "text_encoder": clip_l, "text_encoder_2": big_g}, "sd3"


@pytest.mark.parametrize("variant", ["sd15", "sd21", "sdxl", "sd3"])
def test_real_size_configs_are_derived_from_the_shapes(variant, tmp_path):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    parts, want, expected = _real(variant)
    shapes, want["vae"] = _meta_checkpoint(parts)
    theirs = infer_diffusers_model_type({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    assert theirs == {"v1": "v1", "v2": "v2", "xl": "xl_base", "sd3": "sd3"}[expected]  # diffusers agrees
    info = single_file.SingleFile(tmp_path / "x.safetensors", single_file.header._variant(tmp_path, shapes), shapes)
    assert info.variant == expected
    configs = single_file.derive_configs(info)
    for name, config in want.items():
        config = config if isinstance(config, dict) else config.to_dict()
        got = configs[name]
        differ = {k: (v, config.get(k)) for k, v in got.items()
                  if not k.startswith("_") and k not in ("architectures", "model_type", "bos_token_id", "eos_token_id",
                                                        "pad_token_id")
                  and json.loads(json.dumps(config.get(k))) != v}
        assert not differ, (name, differ)
    assert configs["vae"]["scaling_factor"] == {"v1": 0.18215, "v2": 0.18215, "xl": 0.13025, "sd3": 1.5305}[expected]
    assert configs["scheduler"]["_class_name"] == {"v1": "PNDMScheduler", "v2": "DDIMScheduler",
                                                   "xl": "EulerDiscreteScheduler",
                                                   "sd3": "FlowMatchEulerDiscreteScheduler"}[expected]


# --------------------------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("variant", ["v1", "xl", "sd3"])
def test_cli_same_image_from_the_file_and_the_folder(run_cli, standard, variant, tmp_path):
    folder, checkpoint = standard(variant)
    pictures = []
    for model in (checkpoint, folder):
        out = tmp_path / f"{model.name}.png"
        code, stdout, err = run_cli("generate", "a photo of a cat", "--model", model, "--steps", "2", "--size", "64x64",
                                    "--seed", "3", "--output", out)
        assert code == 0, err
        pictures.append(np.asarray(Image.open(out)).astype(int))
        if model == checkpoint and variant == "sd3":
            assert "warning: tiny-sd3.safetensors: SD3's T5 text encoder is left out" in err
    if variant == "sd3":  # the folder has T5; the file's T5 is left out: run the folder without it too
        assert not np.array_equal(pictures[0], pictures[1])
        no_t5 = tmp_path / "no-t5"
        shutil.copytree(folder, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
        index = json.loads((no_t5 / "model_index.json").read_text())
        index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
        (no_t5 / "model_index.json").write_text(json.dumps(index))
        code, _, err = run_cli("generate", "a photo of a cat", "--model", no_t5, "--steps", "2", "--size", "64x64",
                               "--seed", "3", "--output", tmp_path / "no-t5.png")
        assert code == 0, err
        pictures[1] = np.asarray(Image.open(tmp_path / "no-t5.png")).astype(int)
    assert np.abs(pictures[0] - pictures[1]).max() <= 1  # float rounding at most one level of 255


def test_cli_metadata_names_the_file(run_cli, standard, tmp_path):
    _, checkpoint = standard("v1")
    out = tmp_path / "a.png"
    code, _, err = run_cli("generate", "a cat", "--model", checkpoint, "--steps", "1", "--size", "64x64", "--output", out)
    assert code == 0, err
    assert str(checkpoint) in json.dumps(Image.open(out).text)


def _one_line_error(run_cli, *args):
    code, out, err = run_cli("generate", "a cat", "--steps", "1", *args)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_cli_bad_checkpoints_are_one_line_naming_the_file(run_cli, standard, tmp_path, capsys):
    from safetensors.torch import save_file

    _, checkpoint = standard("v1")
    capsys.readouterr()  # what making the tiny model printed

    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(b"\x00\x01not a safetensors header" * 10)
    err = _one_line_error(run_cli, "--model", garbled)
    assert "garbled.safetensors' is not a readable .safetensors file" in err and "expected a Stable Diffusion" in err

    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 4)}, str(tmp_path / "lora.safetensors"))
    assert "lora.safetensors' is a LoRA" in _one_line_error(run_cli, "--model", tmp_path / "lora.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)},
              str(tmp_path / "vae.safetensors"))
    assert "is a VAE alone" in _one_line_error(run_cli, "--model", tmp_path / "vae.safetensors")
    save_file({"some.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    err = _one_line_error(run_cli, "--model", tmp_path / "other.safetensors")
    assert "holds no model stepdiff knows (keys like some.weight)" in err

    # an SD file without its VAE, and an SD3 file without its text encoders
    from safetensors.torch import load_file

    state = load_file(str(checkpoint))
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, str(tmp_path / "novae.safetensors"))
    assert "holds an SD 1.x denoiser but no VAE" in _one_line_error(run_cli, "--model", tmp_path / "novae.safetensors")
    _, sd3 = standard("sd3")
    capsys.readouterr()
    state = load_file(str(sd3))
    save_file({k: v for k, v in state.items() if not k.startswith("text_encoders.")}, str(tmp_path / "sd3.safetensors"))
    err = _one_line_error(run_cli, "--model", tmp_path / "sd3.safetensors")
    assert "sd3.safetensors' is an SD3 checkpoint without its CLIP text encoders (clip_l, clip_g missing" in err

    (tmp_path / "notes.txt").write_text("hello")
    err = _one_line_error(run_cli, "--model", tmp_path / "notes.txt")
    assert "notes.txt' is neither a model folder nor a .safetensors file" in err


def test_cli_pickle_checkpoints_need_allow_pickle(run_cli, standard, tmp_path, capsys):
    from safetensors.torch import load_file

    folder, checkpoint = standard("v1")
    capsys.readouterr()  # what making the tiny model printed
    torch.save({"state_dict": load_file(str(checkpoint))}, tmp_path / "model.ckpt")  # the original .ckpt layout
    err = _one_line_error(run_cli, "--model", tmp_path / "model.ckpt")
    assert "model.ckpt' is a pickle checkpoint, which can run code when loaded" in err and "--allow-pickle" in err
    out = tmp_path / "trusted.png"
    code, _, err = run_cli("generate", "a cat", "--model", tmp_path / "model.ckpt", "--allow-pickle", "--steps", "1",
                           "--size", "64x64", "--output", out)
    assert code == 0, err
    assert out.is_file()


def test_cli_hub_ids_offline_without_a_cached_copy(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that no local folder named like the id exists
    err = _one_line_error(run_cli, "--model", "someone/some-model")
    assert ("'someone/some-model' is not a local folder or file; as a hub id it needs the hub, and stepdiff is offline "
            "here (HF_HUB_OFFLINE=1) with no copy of it in the local hub cache") in err
    assert "local model folder" in err and ".safetensors" in err
    err = _one_line_error(run_cli, "--model", tmp_path / "nowhere" / "model")
    assert "is not a folder, a .safetensors file or a hub id (owner/name): it does not exist" in err


def test_cli_hub_id_from_the_local_hub_cache(run_cli, standard, tmp_path, monkeypatch):
    """Offline, a hub id still loads when the hub cache has it, through diffusers' own download step."""
    from huggingface_hub import constants

    folder, _ = standard("v1")
    repo = tmp_path / "hub" / "models--tiny--standard-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    pictures = []
    for model in ("tiny/standard-sd", folder):
        out = tmp_path / f"{len(pictures)}.png"
        code, _, err = run_cli("generate", "a cat", "--model", model, "--steps", "1", "--size", "64x64", "--output", out)
        assert code == 0, err
        pictures.append(np.asarray(Image.open(out)))
    assert np.array_equal(pictures[0], pictures[1])


def test_library_family_mismatch_and_refusals(standard, tmp_path):
    _, checkpoint = standard("v1")
    with pytest.raises(ValueError, match=r"tiny-v1\.safetensors' is an SD 1\.x checkpoint, which "
                                         r"StableDiffusionXLPipeline cannot load: use stepdiff\.StableDiffusionPipeline"):
        stepdiff.StableDiffusionXLPipeline.from_single_file(checkpoint)
    from stepdiff.models import default_model

    shapes_file = save_single_file(default_model(), tmp_path / "shapes.safetensors")
    with pytest.raises(ValueError, match=r"shapes\.safetensors': its text_encoder has a vocabulary of \d+ tokens, not "
                                         r"CLIP's 49408"):
        stepdiff.StableDiffusionPipeline.from_single_file(shapes_file)


def test_cli_hub_id_with_no_reachable_hub(tmp_path):
    """The CLI keeps the network for a hub id when HF_HUB_OFFLINE is not set (it sets it for everything else), and
    says in one line when the hub cannot be reached: here a closed port on this machine (HF_ENDPOINT), so nothing
    leaves it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_DOWNLOAD_TIMEOUT="5",
               HF_HUB_ETAG_TIMEOUT="5")
    done = subprocess.run([sys.executable, "-m", "stepdiff.cli", "generate", "a cat", "--model", "someone/some-model"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "'someone/some-model' is not a local folder or file; as a hub id it needs the hub, which could not be " \
           "reached (" in err[0]
    assert "Connection refused" in err[0]  # the loopback port: the hub was asked for, at the address given
    assert "local model folder" in err[0] and "HF_HUB_OFFLINE=1" in err[0]


def test_batch_and_studio_take_a_single_file(run_cli, standard, tmp_path, capsys):
    from stepdiff.studio.server import limits_for

    folder, checkpoint = standard("v1")
    capsys.readouterr()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a photo of a cat", "steps": 1, "width": 64, "height": 64, "seed": 5}) + "\n")
    pictures = []
    for model in (checkpoint, folder):
        out = tmp_path / model.name
        code, stdout, err = run_cli("batch", rows, "--out", out, "--model", model)
        assert code == 0, err
        pictures.append(np.asarray(Image.open(next(out.glob("*.png")))).astype(int))
    assert np.abs(pictures[0] - pictures[1]).max() <= 1
    assert limits_for(checkpoint, 50).native_size == limits_for(folder, 50).native_size == 128
