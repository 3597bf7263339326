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
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers import FluxPipeline as _DiffusersFlux
from diffusers import StableDiffusion3Pipeline as _DiffusersSD3
from diffusers import StableDiffusionPipeline as _DiffusersSD
from diffusers import StableDiffusionXLPipeline as _DiffusersSDXL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from .tokenizer import build_clip_tokenizer

__all__ = [
    "TINY_WORDS", "make_tiny_controlnet", "make_tiny_flux", "make_tiny_ip_adapter", "make_tiny_preview_decoder",
    "make_tiny_sd", "make_tiny_sd3", "make_tiny_sdxl", "make_tiny_standard", "save_single_file",
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


# --- single-file checkpoints ----------------------------------------------------------------------------------------
# diffusers ships only the forward conversion (original single-file layout -> diffusers folders, used by
# ``from_single_file``); its reverse script is not in the wheel. The inverse below renames keys with diffusers' own
# tables where they exist (``DIFFUSERS_TO_LDM_MAPPING``), and ``save_single_file`` proves it by running diffusers'
# forward converters on the result: every tensor must come back bit for bit under its diffusers name.

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_RESNET_TO_LDM = {"conv_shortcut": "nin_shortcut"}
_OPEN_CLIP_LAYER_TO_LDM = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                           "self_attn": "attn"}


def _renamed(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*`` (input/middle/output blocks)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    maps = DIFFUSERS_TO_LDM_MAPPING["unet"]
    top = {**maps["layers"], **(maps["addition_embed_type"] if config.get("addition_embed_type") == "text_time" else {})}
    per_block = config["layers_per_block"] + 1  # LDM numbers every resnet and every down/upsampler in one sequence
    out = {}
    for key, value in state.items():
        part = key.split(".")
        if key in top:
            ldm = top[key]
        elif part[0] == "down_blocks" and part[2] == "downsamplers":  # down_blocks.B.downsamplers.0.conv.weight
            ldm = f"input_blocks.{(int(part[1]) + 1) * per_block}.0.op.{part[-1]}"
        elif part[0] == "down_blocks":  # down_blocks.B.{resnets,attentions}.L.rest
            index, rest = 1 + int(part[1]) * per_block + int(part[3]), ".".join(part[4:])
            ldm = (f"input_blocks.{index}.0.{_renamed(rest, _RESNET_TO_LDM)}" if part[2] == "resnets"
                   else f"input_blocks.{index}.1.{rest}")
        elif part[0] == "mid_block":  # resnet 0, attention, resnet 1
            index, rest = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[part[1], part[2]], ".".join(part[3:])
            ldm = f"middle_block.{index}.{_renamed(rest, _RESNET_TO_LDM) if part[1] == 'resnets' else rest}"
        elif part[0] == "up_blocks" and part[2] == "upsamplers":  # after the attention, where the block has one
            has_attention = any(k.startswith(f"up_blocks.{part[1]}.attentions.") for k in state)
            ldm = f"output_blocks.{int(part[1]) * per_block + per_block - 1}.{2 if has_attention else 1}.conv.{part[-1]}"
        elif part[0] == "up_blocks":
            index, rest = int(part[1]) * per_block + int(part[3]), ".".join(part[4:])
            ldm = (f"output_blocks.{index}.0.{_renamed(rest, _RESNET_TO_LDM)}" if part[2] == "resnets"
                   else f"output_blocks.{index}.1.{rest}")
        else:
            raise ValueError(f"save_single_file: no original-layout name for the UNet weight {key!r}")
        out["model.diffusion_model." + ldm] = value
    return out


def _vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> ``first_stage_model.*`` (the decoder's up blocks are numbered in reverse)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        part = key.split(".")
        if key in top:
            ldm = top[key]
        elif part[1] in ("down_blocks", "up_blocks"):
            level = int(part[2]) if part[1] == "down_blocks" else n_up - 1 - int(part[2])
            name = "down" if part[1] == "down_blocks" else "up"
            if part[3] == "resnets":
                ldm = f"{part[0]}.{name}.{level}.block.{part[4]}.{_renamed('.'.join(part[5:]), _VAE_RESNET_TO_LDM)}"
            else:  # {down,up}samplers.0.conv.*
                ldm = f"{part[0]}.{name}.{level}.{name}sample.conv.{part[-1]}"
        elif part[1] == "mid_block" and part[2] == "resnets":
            ldm = f"{part[0]}.mid.block_{int(part[3]) + 1}.{_renamed('.'.join(part[4:]), _VAE_RESNET_TO_LDM)}"
        elif part[1] == "mid_block":  # the original attention is made of 1x1 convolutions
            ldm = f"{part[0]}.mid.attn_1.{_renamed('.'.join(part[4:]), _VAE_ATTENTION_TO_LDM)}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        else:
            raise ValueError(f"save_single_file: no original-layout name for the VAE weight {key!r}")
        out["first_stage_model." + ldm] = value
    return out


def _clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel -> ``prefix + text_model.*`` (transformers >= 5.6 drops the ``text_model.``)."""
    return {prefix + (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
            for k, v in state.items()}


def _open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection -> OpenCLIP names (fused q/k/v ``in_proj``, transposed ``text_projection``)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out, fused = {}, {}
    for key, value in state.items():
        if key in top:
            out[prefix + top[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        part = key.split(".")
        if part[:3] != ["text_model", "encoder", "layers"]:
            raise ValueError(f"save_single_file: no original-layout name for the text encoder weight {key!r}")
        block, rest = f"{prefix}transformer.resblocks.{part[3]}.", ".".join(part[4:])
        if part[5] in ("q_proj", "k_proj", "v_proj"):
            fused.setdefault(f"{block}attn.in_proj_{part[6]}", {})[part[5]] = value
        else:
            out[block + _renamed(rest, _OPEN_CLIP_LAYER_TO_LDM)] = value
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q_proj"], qkv["k_proj"], qkv["v_proj"]])
    return out


_SD3_TOP_TO_LDM = {
    "pos_embed.pos_embed": "pos_embed", "pos_embed.proj.weight": "x_embedder.proj.weight",
    "pos_embed.proj.bias": "x_embedder.proj.bias", "context_embedder.weight": "context_embedder.weight",
    "context_embedder.bias": "context_embedder.bias", "proj_out.weight": "final_layer.linear.weight",
    "proj_out.bias": "final_layer.linear.bias", "norm_out.linear.weight": "final_layer.adaLN_modulation.1.weight",
    "norm_out.linear.bias": "final_layer.adaLN_modulation.1.bias",
    **{f"time_text_embed.{ours}.linear_{n}.{p}": f"{theirs}.mlp.{2 * n - 2}.{p}"
       for ours, theirs in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder"))
       for n in (1, 2) for p in ("weight", "bias")},
}
_SD3_BLOCK_TO_LDM = {  # transformer_blocks.I.<key> -> joint_blocks.I.<value>; q/k/v are fused separately
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}
_SD3_QKV = {"attn.to_": "x_block.attn.qkv", "attn.add_": "context_block.attn.qkv", "attn2.to_": "x_block.attn2.qkv"}


def _sd3_transformer_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel keys -> ``model.diffusion_model.*`` (MMDiT ``joint_blocks``, fused q/k/v;
    the final modulations, and the last block's context modulation, store scale and shift the other way round)."""
    from diffusers.loaders.single_file_utils import swap_scale_shift

    last = config["num_layers"] - 1
    out, fused = {}, {}
    for key, value in state.items():
        if key in _SD3_TOP_TO_LDM:
            ldm = _SD3_TOP_TO_LDM[key]
            if key.startswith("norm_out."):
                value = swap_scale_shift(value, 0)
        else:
            part = key.split(".")
            if part[0] != "transformer_blocks":
                raise ValueError(f"save_single_file: no original-layout name for the transformer weight {key!r}")
            i, inner, param = int(part[1]), ".".join(part[2:-1]), part[-1]
            qkv = next(((prefix, inner[len(prefix):]) for prefix in _SD3_QKV
                        if inner.startswith(prefix) and inner[len(prefix):] in ("q", "k", "v", "q_proj", "k_proj", "v_proj")),
                       None)
            if qkv is not None:
                fused.setdefault(f"joint_blocks.{i}.{_SD3_QKV[qkv[0]]}.{param}", {})[qkv[1][0]] = value
                continue
            if inner not in _SD3_BLOCK_TO_LDM:
                raise ValueError(f"save_single_file: no original-layout name for the transformer weight {key!r}")
            ldm = f"joint_blocks.{i}.{_SD3_BLOCK_TO_LDM[inner]}.{param}"
            if inner == "norm1_context.linear" and i == last:
                value = swap_scale_shift(value, 0)
        out["model.diffusion_model." + ldm] = value
    for key, qkv in fused.items():
        out["model.diffusion_model." + key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def _component(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    import json

    from safetensors.torch import load_file

    files = sorted((folder / name).glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"save_single_file: expected one .safetensors file in {folder / name}, found {len(files)}")
    return load_file(str(files[0])), json.loads((folder / name / "config.json").read_text())


def save_single_file(folder: str | Path, path: str | Path) -> Path:
    """Write the SD, SDXL or SD3 pipeline folder ``folder`` (e.g. from ``make_tiny_sd``) as one ``.safetensors``
    file in the original single-file key layout that ``from_single_file`` reads: CompVis/LDM names for SD 1.x
    (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``), Stability's SGM
    names for SDXL (``conditioner.embedders.0.transformer.*`` for CLIP-L, ``conditioner.embedders.1.model.*`` in
    OpenCLIP layout for the second encoder), and SD3's (MMDiT ``joint_blocks``, ``text_encoders.clip_l``/``clip_g``
    /``t5xxl``). Load it back with ``Pipeline.from_single_file(path, config=folder)``, which takes configs,
    tokenizers and scheduler from the folder.

    The file is checked before it is written: diffusers' own converters must turn it back into exactly the folder's
    weights. Raises ``ValueError`` for folders that diffusers cannot load back from one file: SDXL/SD3 folders whose
    two CLIP encoders have the same width (diffusers tells them apart by width only, and would load the first
    encoder's weights into the second), and SD3 folders whose CLIP-L projection is not the identity (diffusers
    replaces it with the identity).
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        convert_sd3_t5_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )
    from safetensors.torch import save_file

    folder, path = Path(folder), Path(path)
    family = "sd3" if (folder / "transformer").is_dir() else "sdxl" if (folder / "text_encoder_2").is_dir() else "sd"
    vae, vae_config = _component(folder, "vae")
    text, text_config = _component(folder, "text_encoder")
    checkpoint = _vae_to_ldm(vae, vae_config)
    back = {"vae": lambda: convert_ldm_vae_checkpoint(checkpoint, vae_config)}
    expected = {"vae": vae}
    if family in ("sdxl", "sd3"):
        text_2, text_2_config = _component(folder, "text_encoder_2")
        if text_2_config["hidden_size"] == text_config["hidden_size"]:
            raise ValueError(
                f"save_single_file: both text encoders in {folder} are {text_config['hidden_size']} wide; diffusers' "
                "from_single_file tells CLIP-L from the second CLIP encoder by width only and would load the first "
                "encoder's weights into the second (make the folder with text_encoder_2_width=48)"
            )
        expected["text_encoder_2"] = text_2
    if family == "sd":
        unet, unet_config = _component(folder, "unet")
        checkpoint.update(_unet_to_ldm(unet, unet_config))
        checkpoint.update(_clip_to_ldm(text, "cond_stage_model.transformer."))
        back["unet"] = lambda: convert_ldm_unet_checkpoint(checkpoint, unet_config)
        back["text_encoder"] = lambda: convert_ldm_clip_checkpoint(checkpoint)
        expected.update(unet=unet, text_encoder=_clip_to_ldm(text, ""))
    elif family == "sdxl":
        unet, unet_config = _component(folder, "unet")
        checkpoint.update(_unet_to_ldm(unet, unet_config))
        checkpoint.update(_clip_to_ldm(text, "conditioner.embedders.0.transformer."))
        checkpoint.update(_open_clip_to_ldm(text_2, "conditioner.embedders.1.model."))
        back["unet"] = lambda: convert_ldm_unet_checkpoint(checkpoint, unet_config)
        back["text_encoder"] = lambda: convert_ldm_clip_checkpoint(checkpoint)
        back["text_encoder_2"] = lambda: convert_open_clip_checkpoint(None, checkpoint, "conditioner.embedders.1.model.")
        expected.update(unet=unet, text_encoder=_clip_to_ldm(text, ""))
    else:
        projection = text["text_projection.weight"]
        if projection.shape[0] != projection.shape[1] or not torch.equal(projection, torch.eye(projection.shape[0])):
            raise ValueError(
                f"save_single_file: CLIP-L's text_projection in {folder} is not the identity, which diffusers' "
                "from_single_file puts there for SD3 (make the folder with identity_text_projection=True)"
            )
        transformer, transformer_config = _component(folder, "transformer")
        checkpoint.update(_sd3_transformer_to_ldm(transformer, transformer_config))
        checkpoint.update(_clip_to_ldm(text, "text_encoders.clip_l.transformer."))
        checkpoint.update(_clip_to_ldm(text_2, "text_encoders.clip_g.transformer."))
        back["transformer"] = lambda: convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint))  # it pops
        back["text_encoder"] = lambda: convert_ldm_clip_checkpoint(checkpoint, "text_encoders.clip_l.transformer.")
        back["text_encoder_2"] = lambda: convert_ldm_clip_checkpoint(checkpoint, "text_encoders.clip_g.transformer.")
        expected.update(transformer=transformer, text_encoder=text)
        if (folder / "text_encoder_3").is_dir():
            t5, _ = _component(folder, "text_encoder_3")
            # save_pretrained stores the tied input embedding once, as shared.weight; diffusers' single-file T5
            # loader does not re-tie, and would leave encoder.embed_tokens on the meta device
            t5.setdefault("encoder.embed_tokens.weight", t5["shared.weight"].clone())
            checkpoint.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()})
            back["text_encoder_3"] = lambda: convert_sd3_t5_checkpoint_to_diffusers(checkpoint)
            expected["text_encoder_3"] = t5

    # the proof: diffusers' forward conversion gives back every weight of the folder, under its own name
    for name, convert in back.items():
        converted, want = convert(), expected[name]
        if converted.keys() != want.keys() or any(not torch.equal(converted[k], want[k]) for k in want):
            wrong = sorted(set(converted) ^ set(want)) or [k for k in want if not torch.equal(converted[k], want[k])]
            raise RuntimeError(f"save_single_file: diffusers does not convert the {name} back: {wrong[:5]}")
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path))
    return path


# --- tiny models that load from a single file by convention -------------------------------------------------------


def make_tiny_standard(out: str | Path, variant: str = "v1", seed: int = 0, with_t5: bool = True) -> Path:
    """A tiny random pipeline folder built as the released models are, except for its sizes: ``variant`` "v1" (SD
    1.x), "xl" (SDXL base) or "sd3"; OpenAI's CLIP tokenizer and 49408-token vocabulary, 64 channels per attention
    head (8 heads per UNet attention for SD 1.x), the family's activations, VAE scaling and scheduler
    (``stepdiff.single_file.conventions``). Written as one file by ``save_single_file``, it loads back with
    ``from_single_file`` and no ``config=``: everything that its shapes do not say follows the conventions.
    ``with_t5`` (SD3): a tiny T5 encoder and its tokenizer (stepdiff.testing's own word list)."""
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler as _Flow
    from diffusers.schedulers import PNDMScheduler as _PNDM
    from transformers import CLIPTokenizer

    from .single_file import conventions, write_clip_tokenizer

    if variant not in ("v1", "xl", "sd3"):
        raise ValueError(f"variant must be one of 'v1', 'xl', 'sd3', got {variant!r}")
    out = Path(out)
    torch.manual_seed(seed)
    conv = conventions(variant)

    def clip(cls, hidden: int, name: str):
        config = CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=hidden // 64, max_position_embeddings=77, projection_dim=hidden, layer_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=2, pad_token_id=1, **conv[name],
        )
        return cls(config)

    def tokenizer(name: str):
        with tempfile.TemporaryDirectory() as tmp:
            return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, **conv[name]))

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
    if variant == "v1":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=conv["unet"]["sample_size"],
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=conv["unet"]["heads"], norm_num_groups=32,
        )
        pipe = _DiffusersSD(
            vae=vae, text_encoder=clip(CLIPTextModel, 64, "text_encoder"), tokenizer=tokenizer("tokenizer"), unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    elif variant == "xl":
        unet = UNet2DConditionModel(
            block_out_channels=(64, 128), layers_per_block=2, sample_size=conv["unet"]["sample_size"],
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
            cross_attention_dim=64 + 128, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=128 + 6 * 8, norm_num_groups=32,
        )  # the UNet attends to both encoders' hidden states; the pooled embedding is the second encoder's
        pipe = _DiffusersSDXL(
            vae=vae, text_encoder=clip(CLIPTextModel, 64, "text_encoder"), tokenizer=tokenizer("tokenizer"),
            text_encoder_2=clip(CLIPTextModelWithProjection, 128, "text_encoder_2"), tokenizer_2=tokenizer("tokenizer_2"),
            unet=unet, scheduler=scheduler,
        )
    else:
        t5_width = 256  # the joint attention width: T5's, which CLIP's 64 + 128 are padded to
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=latent, num_layers=2, attention_head_dim=64, num_attention_heads=1,
            joint_attention_dim=t5_width, caption_projection_dim=64, pooled_projection_dim=64 + 128,
            out_channels=latent, pos_embed_max_size=16,
        )
        text_encoder = clip(CLIPTextModelWithProjection, 64, "text_encoder")
        with torch.no_grad():  # the single-file layout has no CLIP-L projection: diffusers puts the identity there
            text_encoder.text_projection.weight.copy_(torch.eye(64))
        t5_tokenizer = _t5_tokenizer() if with_t5 else None
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=t5_width, d_ff=128, d_kv=64, num_layers=1, num_heads=4,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, tie_word_embeddings=False, **conv["text_encoder_3"],
        )) if with_t5 else None
        pipe = _DiffusersSD3(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
            tokenizer=tokenizer("tokenizer"), text_encoder_2=clip(CLIPTextModelWithProjection, 128, "text_encoder_2"),
            tokenizer_2=tokenizer("tokenizer_2"), text_encoder_3=t5, tokenizer_3=t5_tokenizer,
        )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
