"""Tiny random SD 1.x, SDXL, SD3 and Flux pipeline folders, built offline in the standard folder layout."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers import FluxPipeline as _DiffusersFlux
from diffusers import StableDiffusion3Pipeline as _DiffusersSD3
from diffusers import StableDiffusionPipeline as _DiffusersSD
from diffusers import StableDiffusionXLPipeline as _DiffusersSDXL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from ..tokenizer import build_clip_tokenizer

__all__ = ["TINY_WORDS", "make_tiny_flux", "make_tiny_sd", "make_tiny_sd3", "make_tiny_sdxl"]

TINY_WORDS = "a photo of cat dog red blue car road croissant bear sports best quality high detail".split()


def _tokenizer():
    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(TINY_WORDS, tmp, model_max_length=77)


def _scheduler(prediction_type: str = "epsilon") -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
        timestep_spacing="leading", steps_offset=1,
    )


def _vae(width: int) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(width, width), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=min(32, width), sample_size=32,
    )


def _text_config(vocab_size: int, tokenizer, hidden: int, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=vocab_size, hidden_act="gelu", projection_dim=projection_dim, max_position_embeddings=77,
    )


def make_tiny_sd(out: str | Path, seed: int = 0, prediction_type: str = "epsilon", in_channels: int = 4) -> Path:
    """A ~0.5M-parameter random SD 1.x-style pipeline folder (``in_channels=9``: an inpainting UNet)."""
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), tokenizer, 32))
    pipe = _DiffusersSD(
        vae=_vae(32), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_sdxl(out: str | Path, seed: int = 0, width: int = 32, sample_size: int = 16, in_channels: int = 4,
                   text_encoder_2_width: int = 32) -> Path:
    """A random SDXL pipeline folder; ``width`` scales the UNet (32 is tiny, 96+ makes the UNet dominate);
    ``in_channels=9``: an inpainting UNet; ``text_encoder_2_width`` is the hidden size of the second (OpenCLIP-G
    style) text encoder, which must differ from the first's (32) for ``save_single_file``."""
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(width, width * 2), layers_per_block=2, sample_size=sample_size, in_channels=in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=32 + text_encoder_2_width, norm_num_groups=1,
    )  # the UNet attends to both encoders' hidden states, concatenated
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(len(tokenizer), tokenizer, text_encoder_2_width, projection_dim=32)
    )
    pipe = _DiffusersSDXL(
        vae=_vae(32), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _t5_tokenizer() -> T5Tokenizer:
    """A Unigram (SentencePiece-style) T5 tokenizer over the tiny words, characters as fallback."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in TINY_WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def make_tiny_sd3(out: str | Path, seed: int = 0, with_t5: bool = True, layers: int = 2, head_dim: int = 8,
                  sample_size: int = 16, text_encoder_2_width: int = 32, identity_text_projection: bool = False,
                  latent_channels: int = 4, in_channels: int | None = None) -> Path:
    """A random SD3 pipeline folder (MMDiT transformer, CLIP-L, CLIP-G, optional T5, VAE with shift factor);
    ``layers`` and ``head_dim`` scale the transformer (benchmarks use a larger one so it dominates a step).
    For ``save_single_file``: ``text_encoder_2_width`` (CLIP-G's width) must differ from CLIP-L's 32, and
    ``identity_text_projection=True`` gives CLIP-L the identity projection that diffusers' single-file loader puts
    there. ``latent_channels``: the VAE's (16 as real SD3, which the classic inpainting pipeline requires);
    ``in_channels``: the transformer's (default the latent channels; ``2 * latent_channels + 1``: an inpainting one)."""
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=in_channels or latent_channels, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=4,
        caption_projection_dim=4 * head_dim, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=latent_channels,
    )
    text_encoder = CLIPTextModelWithProjection(_text_config(len(tokenizer), tokenizer, 32, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(len(tokenizer), tokenizer, text_encoder_2_width, projection_dim=32)
    )
    if identity_text_projection:
        with torch.no_grad():
            text_encoder.text_projection.weight.copy_(torch.eye(32))
    t5_tokenizer = _t5_tokenizer() if with_t5 else None
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )) if with_t5 else None
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    pipe = _DiffusersSD3(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_flux(out: str | Path, seed: int = 0, guidance_embeds: bool = False, layers: int = 1,
                   single_layers: int = 1, head_dim: int = 16, heads: int = 2, latent_channels: int = 1,
                   vae_width: int = 4, dynamic_shifting: bool = False) -> Path:
    """A random Flux pipeline folder. The defaults are the classic library's own fast-test config
    (tests/pipelines/flux/test_pipeline_flux.py: a 1 + 1 block transformer over 2x2-packed latents, CLIP pooled
    embeddings, a 5-layer T5, a one-level VAE with 1 latent channel and a shift factor), with stepdiff's offline
    tokenizers. ``guidance_embeds``: a guidance-distilled transformer (FLUX.1-dev style) that takes the guidance
    value as an embedding; ``dynamic_shifting``: FLUX.1-dev's resolution-dependent scheduler shift. ``layers`` /
    ``single_layers`` / ``head_dim`` scale the transformer (benchmarks use more blocks so that it dominates a step)."""
    out = Path(out)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, head_dim - 8], guidance_embeds=guidance_embeds,
    )
    tokenizer = _tokenizer()
    config = _text_config(len(tokenizer), tokenizer, 32)
    config.num_hidden_layers = 5
    text_encoder = CLIPTextModel(config)
    t5_tokenizer = _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_ff=37, d_kv=8, num_layers=5, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(vae_width,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        shift=3.0,
    ) if dynamic_shifting else FlowMatchEulerDiscreteScheduler()
    pipe = _DiffusersFlux(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=t5,
        tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
