"""Tiny random add-ons for a tiny pipeline folder: a ControlNet, an IP-Adapter (UNet or Flux layout) and a TAESD-style
preview decoder."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, FluxTransformer2DModel, UNet2DConditionModel

__all__ = ["make_tiny_controlnet", "make_tiny_ip_adapter", "make_tiny_preview_decoder"]


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

    For a Flux folder (``make_tiny_flux``) the weights are a Flux IP-Adapter (XLabs layout: ``image_proj.*`` and
    ``ip_adapter.<double block>.to_{k,v}_ip.*``, as the classic tests' ``create_flux_ip_adapter_state_dict``), loaded
    with ``pipe.load_ip_adapter(out, weight_name="ip-adapter.safetensors",
    image_encoder_pretrained_model_name_or_path=out / "image_encoder", image_encoder_dtype=torch.float32)``.
    """
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out = Path(out)
    torch.manual_seed(seed)
    if (Path(base) / "transformer").is_dir():
        return _tiny_flux_ip_adapter(out, Path(base), tokens)
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


def _tiny_flux_ip_adapter(out: Path, base: Path, tokens: int) -> Path:
    from diffusers.models.embeddings import ImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if tokens != 4:
        raise ValueError("Flux IP-Adapters have 4 image tokens (diffusers' loader infers the count from the weights)")
    cfg = FluxTransformer2DModel.load_config(base / "transformer")
    cross, hidden = cfg["joint_attention_dim"], cfg["num_attention_heads"] * cfg["attention_head_dim"]
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        projection_dim=32,
    ))
    encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    weights: dict[str, torch.Tensor] = {}
    for block in range(cfg["num_layers"]):  # one IP attention per double-stream block
        proc = FluxIPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=cross, scale=1.0).state_dict()
        for name in ("to_k_ip", "to_v_ip"):
            for p in ("weight", "bias"):
                weights[f"ip_adapter.{block}.{name}.{p}"] = proc[f"{name}.0.{p}"]
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
