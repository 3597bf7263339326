"""Single-file checkpoints (what A1111, ComfyUI and model sites share) and hub ids, offline.

A single ``.safetensors`` file in the original key layout holds the weights of SD 1.x/2.x (CompVis/LDM names),
SDXL (Stability's SGM names) or SD3 (MMDiT), but not the configs that diffusers' ``from_single_file`` needs:
diffusers fetches those from a hub repo (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0, ...). Here they are
derived offline instead: every size the weights fix (channels, levels, layers, attention depth, context and
embedding widths, vocabulary, latent channels) is read from the tensor shapes in the file's header, and what no
shape tells (the number of attention heads, activations, the VAE's scaling factor, the scheduler, the native
sample size) comes from the conventions of the family's released models, written down in ``_CONVENTIONS``. The
CLIP tokenizers are built from OpenAI's CLIP BPE vocabulary, shipped in ``data/bpe_simple_vocab_16e6.txt.gz``
(MIT license; the file open_clip and CLIP ship). The weights themselves are converted by diffusers' own
``from_single_file``, given the derived folder as ``config=``.

What cannot be had offline: SD3's T5 tokenizer (a SentencePiece model nobody ships in a package), so an SD3 file's
T5 encoder is left out, with a warning, unless a ``tokenizer_3`` is passed; text encoders that a file leaves out
(``sd3_medium.safetensors`` has none); SD 2.x files load as 2.1-v (v-prediction, 768 px), as in diffusers, unless
the file says otherwise (a ``v_pred`` key or ``modelspec.prediction_type`` metadata).
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "PICKLE_SUFFIXES", "SingleFile", "config_folder", "derive_configs", "inspect", "is_hub_id", "model_shape",
    "offline_kwargs", "read_shapes", "resolve_model", "write_clip_tokenizer",
]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_UNET = "model.diffusion_model."
_FAMILY_OF = {"v1": "sd", "v2": "sd", "xl": "sdxl", "sd3": "sd3"}
_FAMILY_NAME = {"v1": "SD 1.x", "v2": "SD 2.x", "xl": "SDXL", "sd3": "SD3"}
_EXPECTED = (
    "expected a Stable Diffusion checkpoint in the original single-file layout: SD 1.x/2.x (model.diffusion_model.*, "
    "first_stage_model.*, cond_stage_model.*), SDXL (conditioner.embedders.*) or SD3 (model.diffusion_model."
    "joint_blocks.*, text_encoders.*)"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_CLIP_VOCAB = 49408  # OpenAI's CLIP BPE: 256 bytes x 2, 48894 merges, start and end of text
_CLIP_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

# What no tensor shape tells, as the family's released models have it (their diffusers configs). Head counts
# follow the original configs: SD 1.x 8 heads per attention; SD 2.x, SDXL and SD3 64 channels per head (CLIP and
# OpenCLIP encoders too).
_CONVENTIONS: dict[str, dict[str, Any]] = {
    "v1": {
        "unet": {"sample_size": 64, "heads": 8},
        "vae": {"sample_size": 512, "scaling_factor": 0.18215},
        "text_encoder": {"hidden_act": "quick_gelu"},
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "scheduler": {"_class_name": "PNDMScheduler", **_CLIP_BETAS, "clip_sample": False, "set_alpha_to_one": False,
                      "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon"},
    },
    "v2": {
        "unet": {"sample_size": 96, "head_channels": 64, "upcast_attention": True},
        "vae": {"sample_size": 768, "scaling_factor": 0.18215},
        "text_encoder": {"hidden_act": "gelu"},
        "tokenizer": {"pad_token": "!"},
        "scheduler": {"_class_name": "DDIMScheduler", **_CLIP_BETAS, "clip_sample": False, "set_alpha_to_one": False,
                      "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "v_prediction"},
    },
    "xl": {
        "unet": {"sample_size": 128, "head_channels": 64},
        "vae": {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": {"hidden_act": "quick_gelu"},
        "text_encoder_2": {"hidden_act": "gelu"},
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "tokenizer_2": {"pad_token": "!"},
        "scheduler": {"_class_name": "EulerDiscreteScheduler", **_CLIP_BETAS, "interpolation_type": "linear",
                      "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
                      "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                      "use_karras_sigmas": False},
    },
    "sd3": {
        "transformer": {"sample_size": 128, "head_channels": 64},
        "vae": {"sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609, "force_upcast": True},
        "text_encoder": {"hidden_act": "quick_gelu"},
        "text_encoder_2": {"hidden_act": "gelu"},
        "text_encoder_3": {"dense_act_fn": "gelu_new", "layer_norm_epsilon": 1e-6,
                           "relative_attention_max_distance": 128},
        "tokenizer": {"pad_token": "<|endoftext|>"},
        "tokenizer_2": {"pad_token": "!"},
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    },
}


def conventions(variant: str) -> dict[str, Any]:
    """The settings no tensor shape tells for ``variant`` ("v1", "v2", "xl", "sd3"): a copy to change."""
    return copy.deepcopy(_CONVENTIONS[variant])


# ------------------------------------------------------------------------------------------------ reading a file


@dataclass
class SingleFile:
    """What a checkpoint's header says: its key layout's family and variant, and every tensor's shape."""

    path: Path
    variant: str  # "v1" (SD 1.x), "v2" (SD 2.x), "xl" (SDXL), "sd3"
    shapes: dict[str, tuple[int, ...]] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def family(self) -> str:
        return _FAMILY_OF[self.variant]

    @property
    def has_t5(self) -> bool:
        return any(k.startswith("text_encoders.t5xxl.") for k in self.shapes)


def _where(path: str | os.PathLike) -> str:
    return repr(str(path))


def read_shapes(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every tensor's name and shape, and the file's metadata, from the header alone (a pickle checkpoint, only with
    ``allow_pickle``, is read with ``torch.load(weights_only=True, mmap=True)``)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise OSError(
                f"{_where(path)} is a pickle checkpoint, which can run code when loaded; stepdiff loads only safetensors "
                "by default. Pass allow_pickle=True (CLI: --allow-pickle) if you trust this file, or convert it to "
                ".safetensors"
            )
        import torch

        try:
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise ValueError(f"{_where(path)} is not a readable checkpoint ({' '.join(str(e).split())[:200]}); "
                             f"{_EXPECTED}") from None
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{_where(path)} holds a {type(state).__name__}, not a dict of tensors; {_EXPECTED}")
        return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}, {}
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{_where(path)} is neither a model folder nor a .safetensors file; {_EXPECTED}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{_where(path)} is not a readable .safetensors file ({' '.join(str(e).split())[:200]}); "
                         f"{_EXPECTED}") from None
    return shapes, metadata


def _other_kind(keys: list[str]) -> str | None:
    """What a file that is not a whole SD/SDXL/SD3 checkpoint holds, where its keys say."""
    def some(*parts: str) -> bool:
        return any(any(p in k for p in parts) for k in keys)

    if some("lora_unet_", "lora_te", ".lora_down.", ".lora_A.", "lora.down"):
        return "a LoRA (load it onto a model with load_lora_weights)"
    if some("control_model.", "controlnet_cond_embedding"):
        return "a ControlNet (pass it with --controlnet / controlnet=, a ControlNet folder)"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "a FLUX model, which stepdiff does not run"
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.")) for k in keys):
        return "a VAE alone, not a whole model"
    if any(k.startswith(("down_blocks.", "transformer_blocks.")) for k in keys):
        return "one diffusers-format model's weights (a UNet or transformer alone), not a whole model"
    if some("string_to_param", "emb_params"):
        return "a textual-inversion embedding (load it with load_textual_inversion)"
    return None


def _variant(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    keys = list(shapes)
    if _UNET + "joint_blocks.0.x_block.attn.qkv.weight" in shapes:
        variant = "sd3"
    elif _UNET + "input_blocks.0.0.weight" in shapes:
        if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
            variant = "xl"
        elif any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            raise ValueError(f"{_where(path)} is an SDXL refiner (one OpenCLIP text encoder, conditioner.embedders.0."
                             "model.*), which stepdiff does not load from a single file; use an SDXL base checkpoint")
        elif any(k.startswith("cond_stage_model.model.") for k in keys):
            variant = "v2"
        elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
            variant = "v1"
        elif any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
            raise ValueError(f"{_where(path)} holds an SDXL UNet and CLIP-L but not the second text encoder "
                             "(conditioner.embedders.1.model.*); " + _EXPECTED)
        else:
            raise ValueError(f"{_where(path)} holds a UNet (model.diffusion_model.*) but no text encoder "
                             "(cond_stage_model.* or conditioner.embedders.*), which stepdiff cannot load offline; "
                             "use a checkpoint that includes its text encoder, or a model folder")
    else:
        other = _other_kind(keys)
        sample = ", ".join(sorted(keys)[:3]) if keys else "no tensors at all"
        what = f"is {other}" if other else f"holds no model stepdiff knows (keys like {sample})"
        raise ValueError(f"{_where(path)} {what}; {_EXPECTED}")
    vae = _vae_prefix(shapes)
    if vae is None:
        raise ValueError(f"{_where(path)} holds an {_FAMILY_NAME[variant]} denoiser but no VAE (first_stage_model.*); "
                         "stepdiff loads single files that include their VAE")
    if variant == "sd3":
        missing = [name for name in ("clip_l", "clip_g") if not any(k.startswith(f"text_encoders.{name}.") for k in keys)]
        if missing:
            raise ValueError(
                f"{_where(path)} is an SD3 checkpoint without its CLIP text encoders ({', '.join(missing)} missing: "
                "text_encoders.clip_l.*, text_encoders.clip_g.*), which stepdiff cannot load offline; use a file "
                "that includes them (such as sd3_medium_incl_clips.safetensors) or a model folder"
            )
    return variant


@functools.lru_cache(maxsize=16)
def _inspect(path: str, mtime_ns: int, size: int, allow_pickle: bool) -> SingleFile:
    shapes, metadata = read_shapes(path, allow_pickle)
    return SingleFile(Path(path), _variant(Path(path), shapes), shapes, metadata)


def inspect(path: str | os.PathLike, allow_pickle: bool = False) -> SingleFile:
    """Read and check a single-file checkpoint's header: a clear ``ValueError`` (or ``OSError`` for a pickle file
    without ``allow_pickle``) naming the file and what was expected, before any weight loads."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError as e:
        raise FileNotFoundError(f"{_where(path)} cannot be read: {e.strerror or e}") from None
    if not path.is_file():
        raise IsADirectoryError(f"{_where(path)} is not a file")
    return _inspect(str(path), stat.st_mtime_ns, stat.st_size, allow_pickle)


# -------------------------------------------------------------------------------------------- deriving configs


def _vae_prefix(shapes: dict[str, tuple[int, ...]]) -> str | None:
    for prefix in ("first_stage_model.", "vae."):
        if prefix + "encoder.conv_in.weight" in shapes:
            return prefix
    return None


def _count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """How many numbered children ``prefix{i}.`` the keys have (0, 1, ... with no gap)."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in shapes):
        n += 1
    return n


def _shape(info: SingleFile, key: str) -> tuple[int, ...]:
    try:
        return info.shapes[key]
    except KeyError:
        raise ValueError(f"{_where(info.path)} looks like an {_FAMILY_NAME[info.variant]} checkpoint but has no "
                         f"tensor {key!r}; the file is incomplete or not in the original layout") from None


def _unet_config(info: SingleFile, conv: dict[str, Any]) -> dict[str, Any]:
    s, p = info.shapes, _UNET
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (channels, transformer depth; 0 = no attention)
    i = 1
    while any(k.startswith(f"{p}input_blocks.{i}.") for k in s):
        if f"{p}input_blocks.{i}.0.op.weight" in s:
            levels.append([])
        else:
            channels = _shape(info, f"{p}input_blocks.{i}.0.out_layers.3.weight")[0]
            depth = _count(s, f"{p}input_blocks.{i}.1.transformer_blocks.")
            levels[-1].append((channels, depth))
        i += 1
    if not levels[0]:
        raise ValueError(f"{_where(info.path)}: its UNet has no input blocks (model.diffusion_model.input_blocks.1.*)")
    per_block = len(levels[0])
    channels = [level[0][0] for level in levels]
    depths = [max(d for _, d in level) for level in levels]
    attention = [k for k in s if k.startswith(p) and k.endswith(".attn2.to_k.weight")]
    if not attention:
        raise ValueError(f"{_where(info.path)}: its UNet has no cross-attention (attn2) layers; {_EXPECTED}")
    first = sorted(attention)[0].rsplit(".transformer_blocks.", 1)[0]
    up_attention = []
    for level in range(len(levels)):  # the up path, from the deepest level
        blocks = range(level * (per_block + 1), (level + 1) * (per_block + 1))
        up_attention.append(any(f"{p}output_blocks.{b}.1.proj_in.weight" in s for b in blocks))
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": conv["sample_size"],
        "in_channels": _shape(info, f"{p}input_blocks.0.0.weight")[1],
        "out_channels": _shape(info, f"{p}out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "cross_attention_dim": s[sorted(attention)[0]][1],
        "use_linear_projection": len(_shape(info, f"{first}.proj_in.weight")) == 2,
        "norm_num_groups": 32,
    }
    if "heads" in conv:
        config["attention_head_dim"] = conv["heads"]
    else:
        config["attention_head_dim"] = [max(1, c // conv["head_channels"]) for c in channels]
    if any(d > 1 for d in depths):
        config["transformer_layers_per_block"] = [max(1, d) for d in depths]
    if conv.get("upcast_attention"):
        config["upcast_attention"] = True
    if f"{p}label_emb.0.0.weight" in s:  # SDXL: pooled text embedding + 6 size/crop numbers, each embedded
        adm = s[f"{p}label_emb.0.0.weight"][1]
        pooled = _shape(info, "conditioner.embedders.1.model.text_projection")[1]
        if (adm - pooled) % 6 or adm <= pooled:
            raise ValueError(f"{_where(info.path)}: its UNet's added embedding takes {adm} numbers, which is not the "
                             f"pooled text embedding ({pooled}) plus 6 time embeddings")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(adm - pooled) // 6,
                      projection_class_embeddings_input_dim=adm)
    return config


def _vae_config(info: SingleFile, conv: dict[str, Any]) -> dict[str, Any]:
    s, p = info.shapes, _vae_prefix(info.shapes)
    levels = _count(s, f"{p}encoder.down.")
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(info, f"{p}encoder.conv_in.weight")[1],
        "out_channels": _shape(info, f"{p}decoder.conv_out.weight")[0],
        "latent_channels": _shape(info, f"{p}decoder.conv_in.weight")[1],
        "block_out_channels": [_shape(info, f"{p}encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels)],
        "layers_per_block": _count(s, f"{p}encoder.down.0.block."),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 32,
        "use_quant_conv": f"{p}quant_conv.weight" in s,
        "use_post_quant_conv": f"{p}post_quant_conv.weight" in s,
        "mid_block_add_attention": f"{p}encoder.mid.attn_1.q.weight" in s,
    }
    config.update(conv)
    return config


def _heads(info: SingleFile, width: int, what: str, per_head: int = 64) -> int:
    if width % per_head:
        raise ValueError(f"{_where(info.path)}: its {what} is {width} wide, not a multiple of {per_head} (the channels per "
                         "attention head of every released CLIP encoder), so its head count is unknown")
    return width // per_head


def _clip_config(info: SingleFile, prefix: str, conv: dict[str, Any], projection: bool) -> dict[str, Any]:
    """A transformers-layout CLIP text encoder under ``prefix`` (``...text_model.*``)."""
    t = prefix + "text_model."
    vocab, hidden = _shape(info, t + "embeddings.token_embedding.weight")
    config = {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab, "hidden_size": hidden,
        "max_position_embeddings": _shape(info, t + "embeddings.position_embedding.weight")[0],
        "num_hidden_layers": _count(info.shapes, t + "encoder.layers."),
        "intermediate_size": _shape(info, t + "encoder.layers.0.mlp.fc1.weight")[0],
        "num_attention_heads": _heads(info, hidden, f"text encoder ({prefix}*)"),
        "projection_dim": info.shapes.get(prefix + "text_projection.weight", (hidden,))[0],
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
    config.update(conv)
    return config


def _open_clip_config(info: SingleFile, prefix: str, conv: dict[str, Any], projection: bool,
                      drop_last: bool) -> dict[str, Any]:
    """An OpenCLIP text encoder under ``prefix`` (``token_embedding``, ``transformer.resblocks.*``). SD 2.x uses the
    penultimate layer's output, so its encoder has one layer less than the file (as diffusers' configs have it)."""
    vocab, hidden = _shape(info, prefix + "token_embedding.weight")
    config = {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab, "hidden_size": hidden,
        "max_position_embeddings": _shape(info, prefix + "positional_embedding")[0],
        "num_hidden_layers": _count(info.shapes, prefix + "transformer.resblocks.") - int(drop_last),
        "intermediate_size": _shape(info, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        "num_attention_heads": _heads(info, hidden, f"text encoder ({prefix}*)"),
        "projection_dim": info.shapes.get(prefix + "text_projection", (hidden, hidden))[1],
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
    config.update(conv)
    return config


def _t5_config(info: SingleFile, conv: dict[str, Any]) -> dict[str, Any]:
    t = "text_encoders.t5xxl.transformer."
    embed = t + ("encoder.embed_tokens.weight" if t + "encoder.embed_tokens.weight" in info.shapes else "shared.weight")
    vocab, width = _shape(info, embed)
    bias = _shape(info, t + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = t + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in info.shapes
    config = {
        "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": vocab, "d_model": width,
        "num_layers": _count(info.shapes, t + "encoder.block."), "num_heads": bias[1],
        "relative_attention_num_buckets": bias[0],
        "d_kv": _shape(info, t + "encoder.block.0.layer.0.SelfAttention.q.weight")[0] // bias[1],
        "d_ff": _shape(info, t + f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0],
        "feed_forward_proj": "gated-gelu" if gated else "relu", "is_gated_act": gated,
        "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": False,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    }
    config.update(conv)
    return config


def _sd3_transformer_config(info: SingleFile, conv: dict[str, Any]) -> dict[str, Any]:
    s, p = info.shapes, _UNET
    hidden, in_channels, patch, _ = _shape(info, p + "x_embedder.proj.weight")
    layers = _count(s, p + "joint_blocks.")
    positions = _shape(info, p + "pos_embed")[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"{_where(info.path)}: its position embedding has {positions} rows, not a square grid")
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": min(conv["sample_size"], side * patch),
        "patch_size": patch, "in_channels": in_channels, "num_layers": layers,
        "attention_head_dim": conv["head_channels"],
        "num_attention_heads": _heads(info, hidden, "transformer", conv["head_channels"]),
        "joint_attention_dim": _shape(info, p + "context_embedder.weight")[1],
        "caption_projection_dim": _shape(info, p + "context_embedder.weight")[0],
        "pooled_projection_dim": _shape(info, p + "y_embedder.mlp.0.weight")[1],
        "out_channels": _shape(info, p + "final_layer.linear.weight")[0] // (patch * patch),
        "pos_embed_max_size": side,
        "qk_norm": "rms_norm" if p + "joint_blocks.0.x_block.attn.ln_q.weight" in s else None,
        "dual_attention_layers": [i for i in range(layers) if f"{p}joint_blocks.{i}.x_block.attn2.qkv.weight" in s],
    }


def _prediction_type(info: SingleFile, default: str) -> str:
    if "v_pred" in info.shapes:  # the marker some SD 2.x/SDXL v-prediction files carry
        return "v_prediction"
    spec = info.metadata.get("modelspec.prediction_type", "").strip().lower()
    return {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}.get(spec, default)


def derive_configs(info: SingleFile) -> dict[str, dict[str, Any]]:
    """The diffusers-format configs of the checkpoint: ``model_index`` and one per component (``tokenizer*``:
    the tokenizer settings), from its tensor shapes and its family's conventions."""
    conv = conventions(info.variant)
    configs: dict[str, dict[str, Any]] = {}
    configs["vae"] = _vae_config(info, conv["vae"])
    scheduler = dict(conv["scheduler"])
    if "prediction_type" in scheduler:
        scheduler["prediction_type"] = _prediction_type(info, scheduler["prediction_type"])
    configs["scheduler"] = scheduler
    if info.variant == "v1":
        configs["unet"] = _unet_config(info, conv["unet"])
        configs["text_encoder"] = _clip_config(info, "cond_stage_model.transformer.", conv["text_encoder"], False)
    elif info.variant == "v2":
        configs["unet"] = _unet_config(info, conv["unet"])
        configs["text_encoder"] = _open_clip_config(info, "cond_stage_model.model.", conv["text_encoder"], False, True)
    elif info.variant == "xl":
        configs["unet"] = _unet_config(info, conv["unet"])
        configs["text_encoder"] = _clip_config(info, "conditioner.embedders.0.transformer.", conv["text_encoder"], False)
        configs["text_encoder_2"] = _open_clip_config(
            info, "conditioner.embedders.1.model.", conv["text_encoder_2"], True, False)
    else:
        configs["transformer"] = _sd3_transformer_config(info, conv["transformer"])
        configs["text_encoder"] = _clip_config(info, "text_encoders.clip_l.transformer.", conv["text_encoder"], True)
        configs["text_encoder"]["projection_dim"] = configs["text_encoder"]["hidden_size"]  # diffusers: the identity
        configs["text_encoder_2"] = _clip_config(info, "text_encoders.clip_g.transformer.", conv["text_encoder_2"], True)
        if info.has_t5:
            configs["text_encoder_3"] = _t5_config(info, conv["text_encoder_3"])
    for name in ("text_encoder", "text_encoder_2"):
        if name in configs:
            vocab = configs[name]["vocab_size"]
            if vocab != _CLIP_VOCAB:
                raise ValueError(
                    f"{_where(info.path)}: its {name} has a vocabulary of {vocab} tokens, not CLIP's {_CLIP_VOCAB}, so "
                    "the CLIP tokenizer stepdiff ships does not fit it; load this model from a folder with its "
                    "tokenizer (or pass config= a folder that has one)"
                )
            tokenizer = "tokenizer" + name[len("text_encoder"):]
            configs[tokenizer] = {**conv[tokenizer], "model_max_length": configs[name]["max_position_embeddings"]}
    configs["model_index"] = _model_index(info.variant, configs)
    return configs


def _model_index(variant: str, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import diffusers

    def text(name: str) -> list[str]:
        return ["transformers", configs[name]["architectures"][0]]

    index: dict[str, Any] = {"_diffusers_version": diffusers.__version__,
                             "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
                             "text_encoder": text("text_encoder"), "tokenizer": ["transformers", "CLIPTokenizer"]}
    if variant in ("v1", "v2"):
        index.update(_class_name="StableDiffusionPipeline", unet=["diffusers", "UNet2DConditionModel"],
                     safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                     requires_safety_checker=False)
    elif variant == "xl":
        index.update(_class_name="StableDiffusionXLPipeline", unet=["diffusers", "UNet2DConditionModel"],
                     text_encoder_2=text("text_encoder_2"), tokenizer_2=["transformers", "CLIPTokenizer"],
                     feature_extractor=[None, None], image_encoder=[None, None], force_zeros_for_empty_prompt=True)
    else:
        three = "text_encoder_3" in configs
        index.update(_class_name="StableDiffusion3Pipeline", transformer=["diffusers", "SD3Transformer2DModel"],
                     text_encoder_2=text("text_encoder_2"), tokenizer_2=["transformers", "CLIPTokenizer"],
                     text_encoder_3=["transformers", "T5EncoderModel"] if three else [None, None],
                     tokenizer_3=["transformers", "T5TokenizerFast"] if three else [None, None],
                     feature_extractor=[None, None], image_encoder=[None, None])
    return index


# ----------------------------------------------------------------------------------------- the config folder


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[str]]:
    """OpenAI's CLIP vocabulary and merges, built from the BPE file as CLIP's own tokenizer builds them."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    data = resources.files("stepdiff").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(data).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = [*byte_tokens, *(t + "</w>" for t in byte_tokens), *("".join(m.split()) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(out: str | os.PathLike, pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> Path:
    """A CLIP tokenizer folder (the released SD models' tokenizers: OpenAI's 49408-token BPE vocabulary, padded
    with ``pad_token``: ``<|endoftext|>`` for CLIP-L in SD 1.x, SDXL and SD3, ``!`` for the OpenCLIP encoders)."""
    from transformers import CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_bpe()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token=pad_token,
                                  model_max_length=model_max_length)
    tokenizer.save_pretrained(out)
    return out


_FOLDERS: dict[tuple, Path] = {}


def _remove_folders() -> None:
    for folder in _FOLDERS.values():
        shutil.rmtree(folder.parent, ignore_errors=True)


def write_config_folder(info: SingleFile, out: str | os.PathLike) -> Path:
    """The derived configs as a weights-free diffusers folder: what ``from_single_file(config=...)`` reads."""
    out = Path(out)
    configs = derive_configs(info)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(configs.pop("model_index"), indent=2))
    for name, config in configs.items():
        if name.startswith("tokenizer"):
            write_clip_tokenizer(out / name, **config)
            continue
        (out / name).mkdir(exist_ok=True)
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        (out / name / filename).write_text(json.dumps(config, indent=2))
    return out


def config_folder(path: str | os.PathLike, allow_pickle: bool = False) -> Path:
    """The derived config folder of a checkpoint, written once per process into a temporary folder (removed at
    exit): model_index.json, each component's config, the scheduler and the CLIP tokenizers."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
        key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = None
    folder = _FOLDERS.get(key)  # type: ignore[arg-type]
    if folder is None or not (folder / "model_index.json").is_file():
        info = inspect(resolved, allow_pickle)
        if not _FOLDERS:
            import atexit

            atexit.register(_remove_folders)
        folder = write_config_folder(info, Path(tempfile.mkdtemp(prefix="stepdiff-single-file-")) / "configs")
        _FOLDERS[key] = folder  # type: ignore[index]
    return folder


def model_shape(path: str | os.PathLike, allow_pickle: bool = False):
    """``stepdiff.limits.ModelShape`` of a checkpoint: its derived configs, and the file's size as the weights."""
    from dataclasses import replace

    from .limits import ModelShape

    path = Path(path)
    return replace(ModelShape.from_folder(config_folder(path, allow_pickle)), weight_bytes=path.stat().st_size)


def offline_kwargs(path: str | os.PathLike, pipeline_class: type, kwargs: dict[str, Any],
                   allow_pickle: bool = False) -> tuple[dict[str, Any], list[str]]:
    """``from_single_file``'s keyword arguments for loading ``path`` with no hub: ``config=`` the derived folder,
    SD3's T5 left out where no ``tokenizer_3`` is given (the notes say so). Checks that the file's family is the
    class's before anything loads."""
    info = inspect(path, allow_pickle)
    family = getattr(pipeline_class, "family", "")
    if family and family != info.family:
        from .pipelines.registry import REGISTRY, pipeline_for

        kind = next((e.kind for e in REGISTRY if e.name == pipeline_class.__name__), "text2image")
        right = pipeline_for(info.family, kind) or pipeline_for(info.family, "text2image")
        raise ValueError(
            f"{_where(info.path)} is an {_FAMILY_NAME[info.variant]} checkpoint, which {pipeline_class.__name__} cannot "
            f"load: use stepdiff.{right.name if right else 'AutoPipelineForText2Image'}"
        )
    kwargs = dict(kwargs)
    notes: list[str] = []
    kwargs["config"] = str(config_folder(info.path, allow_pickle))
    if info.variant == "sd3" and kwargs.get("tokenizer_3") is None:
        if info.has_t5 and "text_encoder_3" not in kwargs:
            notes.append(
                f"{info.path.name}: SD3's T5 text encoder is left out (its SentencePiece tokenizer is not available "
                "offline); prompts are encoded by CLIP-L and CLIP-G only. Pass tokenizer_3= (a T5TokenizerFast) to "
                "use the file's T5, or load a model folder"
            )
        kwargs.setdefault("text_encoder_3", None)
        kwargs["tokenizer_3"] = None
    return kwargs, notes


# ------------------------------------------------------------------------------------------------- --model


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a hub repo id (``owner/name``) rather than a local path."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "~")) and ".." not in text


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _root_cause(e: BaseException) -> str:
    """The first error in the chain (a refused connection, a DNS failure), in a few words."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return f"{type(e).__name__}: {_one_line(e)[:120]}"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_hub_id(repo_id: str, allow_pickle: bool = False) -> Path:
    """A hub id's snapshot folder, through diffusers' own ``DiffusionPipeline.download`` (the classic loader's first
    step): from the network when there is one, from the local hub cache when offline. Clear errors otherwise."""
    from diffusers import DiffusionPipeline

    offline = _hub_offline()
    local = ("give a local model folder (model_index.json plus one folder per component) or a single-file "
             ".safetensors checkpoint instead")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folder = DiffusionPipeline.download(repo_id, local_files_only=offline,
                                                use_safetensors=None if allow_pickle else True)
    except Exception as e:  # huggingface_hub, requests/httpx and diffusers each raise their own
        name = type(e).__name__
        if offline:
            raise OSError(
                f"{repo_id!r} is not a local folder or file; as a hub id it needs the hub, and stepdiff is offline here "
                f"(HF_HUB_OFFLINE=1) with no copy of it in the local hub cache; run with HF_HUB_OFFLINE=0 where the hub "
                f"is reachable, or {local}"
            ) from None
        if "NotFound" in name or "GatedRepo" in name or "401" in str(e) or "404" in str(e):
            raise FileNotFoundError(f"{repo_id!r} is not a model on the hub that can be downloaded ({name}); {local}") from None
        if "safetensors" in str(e).lower() and not allow_pickle:
            raise OSError(f"{repo_id!r} on the hub has no safetensors weights ({_one_line(e)}); stepdiff loads only "
                          "safetensors by default: pass --allow-pickle if you trust its pickle files") from None
        raise OSError(
            f"{repo_id!r} is not a local folder or file; as a hub id it needs the hub, which could not be reached "
            f"({_root_cause(e)}); "
            f"{local}, or set HF_HUB_OFFLINE=1 to use the local hub cache"
        ) from None
    return Path(folder)


def resolve_model(path: str | os.PathLike, allow_pickle: bool = False) -> Path:
    """What ``--model`` names, as a local path: a model folder (checked), a single-file checkpoint (its header
    checked), or a hub id's downloaded snapshot folder. Clear errors for everything else."""
    from .pipelines.base import check_folder

    path = Path(path)
    text = str(path)
    if path.is_dir():
        check_folder(path)
        return path
    if path.is_file():
        if path.suffix.lower() == ".safetensors" or path.suffix.lower() in PICKLE_SUFFIXES:
            inspect(path, allow_pickle)
            return path
        raise ValueError(f"{text!r} is neither a model folder nor a .safetensors file; {_EXPECTED}")
    if path.exists():
        raise ValueError(f"{text!r} is not a folder or a file")
    if is_hub_id(text):
        folder = download_hub_id(text, allow_pickle)
        check_folder(folder)
        return folder
    raise FileNotFoundError(
        f"{text!r} is not a folder, a .safetensors file or a hub id (owner/name): it does not exist; give a model "
        "folder (model_index.json plus one folder per component) or a single-file .safetensors checkpoint"
    )
