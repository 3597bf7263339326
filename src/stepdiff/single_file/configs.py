"""Deriving a checkpoint's diffusers-format configs offline: every size from the tensor shapes in its header, the
rest from the conventions of its family's released models (``_CONVENTIONS``)."""

from __future__ import annotations

import copy
import math
from typing import Any

from .header import _EXPECTED, _FAMILY_NAME, _UNET, SingleFile, _vae_prefix, _where

__all__ = ["conventions", "derive_configs"]

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
