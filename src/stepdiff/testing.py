"""Tiny random SD / SDXL pipelines in the standard folder layout, built offline.

Used by the test suite, the benchmarks and ``stepdiff tiny-model``. The folders hold
model_index.json, one folder per component and real tokenizer files, and load through
``from_pretrained`` like real weights (and through diffusers' own pipelines, for parity checks).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers import StableDiffusion3Pipeline as _DiffusersSD3
from diffusers import StableDiffusionPipeline as _DiffusersSD
from diffusers import StableDiffusionXLPipeline as _DiffusersSDXL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from .tokenizer import build_clip_tokenizer

__all__ = [
    "TINY_WORDS", "make_tiny_controlnet", "make_tiny_ip_adapter", "make_tiny_preview_decoder", "make_tiny_sd",
    "make_tiny_sd3", "make_tiny_sdxl",
]

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


def make_tiny_sdxl(out: str | Path, seed: int = 0, width: int = 32, sample_size: int = 16, in_channels: int = 4) -> Path:
    """A random SDXL pipeline folder; ``width`` scales the UNet (32 is tiny, 96+ makes the UNet dominate);
    ``in_channels=9``: an inpainting UNet."""
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(width, width * 2), layers_per_block=2, sample_size=sample_size, in_channels=in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1,
    )
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer), tokenizer, 32, projection_dim=32))
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
                  sample_size: int = 16) -> Path:
    """A random SD3 pipeline folder (MMDiT transformer, CLIP-L, CLIP-G, optional T5, VAE with shift factor);
    ``layers`` and ``head_dim`` scale the transformer (benchmarks use a larger one so it dominates a step)."""
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=4,
        caption_projection_dim=4 * head_dim, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    text_encoder = CLIPTextModelWithProjection(_text_config(len(tokenizer), tokenizer, 32, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer), tokenizer, 32, projection_dim=32))
    t5_tokenizer = _t5_tokenizer() if with_t5 else None
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )) if with_t5 else None
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    pipe = _DiffusersSD3(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_controlnet(out: str | Path, base: str | Path, seed: int = 0, conditioning_channels: int = 3) -> Path:
    """A random ControlNet for the pipeline folder ``base`` (``ControlNetModel.from_unet`` on its UNet), saved as a
    standard ``ControlNetModel`` folder (config.json + safetensors) that ``ControlNetModel.from_pretrained`` loads.

    The conditioning embedding downsamples by the VAE's factor, so a control image of the output size fits the
    latents. The "zero convolutions" of a fresh ControlNet are filled with small random weights: a ControlNet
    whose residuals are all zero would make every parity test pass trivially.
    """
    out = Path(out)
    base = Path(base)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    vae_blocks = len(AutoencoderKL.load_config(base / "vae")["block_out_channels"])
    embedding = tuple(8 * 2**i for i in range(vae_blocks))  # one stride-2 stage per VAE downsampling
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=embedding, conditioning_channels=conditioning_channels,
    )
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    with torch.no_grad():
        for conv in zero_convs:
            for p in conv.parameters():
                p.normal_(0.0, 0.1)
        for p in controlnet.controlnet_cond_embedding.conv_out.parameters():  # so that the control image matters
            p.normal_(0.0, 1.0)
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_ip_adapter(out: str | Path, base: str | Path, seed: int = 0, tokens: int = 4) -> Path:
    """A random IP-Adapter for the pipeline folder ``base``, in the layout ``pipe.load_ip_adapter`` reads:
    ``out/ip-adapter.safetensors`` (``image_proj.*`` and ``ip_adapter.*`` weights) and ``out/image_encoder/``
    (a tiny ``CLIPVisionModelWithProjection``). Load it with
    ``pipe.load_ip_adapter(out, subfolder="", weight_name="ip-adapter.safetensors")``.
    """
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out = Path(out)
    torch.manual_seed(seed)
    cfg = UNet2DConditionModel.load_config(Path(base) / "unet")
    unet = UNet2DConditionModel.from_config(cfg)
    cross, blocks = cfg["cross_attention_dim"], list(cfg["block_out_channels"])
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        projection_dim=32,
    ))
    encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    weights: dict[str, torch.Tensor] = {}
    key_id = 1
    for name in unet.attn_processors:  # the numbering of the published IP-Adapter checkpoints
        if not name.endswith("attn1.processor"):
            if name.startswith("mid_block"):
                hidden = blocks[-1]
            elif name.startswith("up_blocks"):
                hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
            else:
                hidden = blocks[int(name[len("down_blocks.")])]
            proc = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=cross, scale=1.0).state_dict()
            weights[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc["to_k_ip.0.weight"]
            weights[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc["to_v_ip.0.weight"]
            key_id += 2
    proj = ImageProjection(cross_attention_dim=cross, image_embed_dim=32, num_image_text_embeds=tokens).state_dict()
    weights.update({
        "image_proj.proj.weight": proj["image_embeds.weight"], "image_proj.proj.bias": proj["image_embeds.bias"],
        "image_proj.norm.weight": proj["norm.weight"], "image_proj.norm.bias": proj["norm.bias"],
    })
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "ip-adapter.safetensors"))
    return out


def make_tiny_preview_decoder(
    out: str | Path, latent_channels: int = 4, scale_factor: int = 2, width: int = 8, seed: int = 0,
    scaling_factor: float = 1.0, shift_factor: float = 0.0,
) -> Path:
    """A random ``AutoencoderTiny`` folder (TAESD layout) that turns ``latent_channels`` latents into images
    ``scale_factor`` times larger (a power of two)."""
    levels = int(scale_factor).bit_length()  # 2 -> 2 levels (one upsampling), 8 -> 4 levels
    if scale_factor < 1 or 2 ** (levels - 1) != scale_factor:
        raise ValueError(f"scale_factor must be a power of two >= 1, got {scale_factor}")
    torch.manual_seed(seed)
    decoder = AutoencoderTiny(
        encoder_block_out_channels=(width,) * levels, decoder_block_out_channels=(width,) * levels,
        num_encoder_blocks=(1,) * levels, num_decoder_blocks=(1,) * levels, latent_channels=latent_channels,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )
    decoder.save_pretrained(out, safe_serialization=True)
    return Path(out)
