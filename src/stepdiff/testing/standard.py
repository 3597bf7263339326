"""Tiny random pipelines built as the released models are, except for their sizes: they load from one single-file
checkpoint by convention alone (``stepdiff.single_file``), with no ``config=``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel
from diffusers import StableDiffusion3Pipeline as _DiffusersSD3
from diffusers import StableDiffusionPipeline as _DiffusersSD
from diffusers import StableDiffusionXLPipeline as _DiffusersSDXL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ..single_file import conventions, write_clip_tokenizer
from .pipelines import _t5_tokenizer

__all__ = ["make_tiny_standard"]


def _clip(cls: type, hidden: int, conv: dict[str, Any]):
    """A CLIP text encoder with OpenAI's vocabulary, 64 channels per head and the convention's activation."""
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=hidden // 64, max_position_embeddings=77, projection_dim=hidden, layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1, **conv,
    )
    return cls(config)


def _clip_tokenizer(conv: dict[str, Any]):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, **conv))


def _vae_and_scheduler(variant: str, conv: dict[str, Any]) -> tuple[AutoencoderKL, Any]:
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler as _Flow
    from diffusers.schedulers import PNDMScheduler as _PNDM

    latent = 16 if variant == "sd3" else 4
    vae = AutoencoderKL(
        block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=latent, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        use_quant_conv=variant != "sd3", use_post_quant_conv=variant != "sd3", **conv["vae"],
    )
    schedulers = {"PNDMScheduler": _PNDM, "EulerDiscreteScheduler": EulerDiscreteScheduler,
                  "FlowMatchEulerDiscreteScheduler": _Flow}
    settings = dict(conv["scheduler"])
    scheduler = schedulers[settings.pop("_class_name")].from_config(settings)
    return vae, scheduler


def _v1(conv: dict[str, Any], vae: AutoencoderKL, scheduler: Any) -> _DiffusersSD:
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=conv["unet"]["sample_size"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=conv["unet"]["heads"], norm_num_groups=32,
    )
    return _DiffusersSD(
        vae=vae, text_encoder=_clip(CLIPTextModel, 64, conv["text_encoder"]),
        tokenizer=_clip_tokenizer(conv["tokenizer"]), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _xl(conv: dict[str, Any], vae: AutoencoderKL, scheduler: Any) -> _DiffusersSDXL:
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=2, sample_size=conv["unet"]["sample_size"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=64 + 128, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=128 + 6 * 8, norm_num_groups=32,
    )  # the UNet attends to both encoders' hidden states; the pooled embedding is the second encoder's
    return _DiffusersSDXL(
        vae=vae, text_encoder=_clip(CLIPTextModel, 64, conv["text_encoder"]),
        tokenizer=_clip_tokenizer(conv["tokenizer"]),
        text_encoder_2=_clip(CLIPTextModelWithProjection, 128, conv["text_encoder_2"]),
        tokenizer_2=_clip_tokenizer(conv["tokenizer_2"]), unet=unet, scheduler=scheduler,
    )


def _sd3(conv: dict[str, Any], vae: AutoencoderKL, scheduler: Any, with_t5: bool) -> _DiffusersSD3:
    t5_width = 256  # the joint attention width: T5's, which CLIP's 64 + 128 are padded to
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=1,
        joint_attention_dim=t5_width, caption_projection_dim=64, pooled_projection_dim=64 + 128,
        out_channels=16, pos_embed_max_size=16,
    )
    text_encoder = _clip(CLIPTextModelWithProjection, 64, conv["text_encoder"])
    with torch.no_grad():  # the single-file layout has no CLIP-L projection: diffusers puts the identity there
        text_encoder.text_projection.weight.copy_(torch.eye(64))
    t5_tokenizer = _t5_tokenizer() if with_t5 else None
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=t5_width, d_ff=128, d_kv=64, num_layers=1, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, tie_word_embeddings=False, **conv["text_encoder_3"],
    )) if with_t5 else None
    return _DiffusersSD3(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(conv["tokenizer"]),
        text_encoder_2=_clip(CLIPTextModelWithProjection, 128, conv["text_encoder_2"]),
        tokenizer_2=_clip_tokenizer(conv["tokenizer_2"]), text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


def make_tiny_standard(out: str | Path, variant: str = "v1", seed: int = 0, with_t5: bool = True) -> Path:
    """A tiny random pipeline folder built as the released models are, except for its sizes: ``variant`` "v1" (SD
    1.x), "xl" (SDXL base) or "sd3"; OpenAI's CLIP tokenizer and 49408-token vocabulary, 64 channels per attention
    head (8 heads per UNet attention for SD 1.x), the family's activations, VAE scaling and scheduler
    (``stepdiff.single_file.conventions``). Written as one file by ``save_single_file``, it loads back with
    ``from_single_file`` and no ``config=``: everything that its shapes do not say follows the conventions.
    ``with_t5`` (SD3): a tiny T5 encoder and its tokenizer (stepdiff.testing's own word list)."""
    if variant not in ("v1", "xl", "sd3"):
        raise ValueError(f"variant must be one of 'v1', 'xl', 'sd3', got {variant!r}")
    out = Path(out)
    torch.manual_seed(seed)
    conv = conventions(variant)
    vae, scheduler = _vae_and_scheduler(variant, conv)
    if variant == "v1":
        pipe = _v1(conv, vae, scheduler)
    elif variant == "xl":
        pipe = _xl(conv, vae, scheduler)
    else:
        pipe = _sd3(conv, vae, scheduler, with_t5)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
