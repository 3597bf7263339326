"""The inverse of diffusers' single-file conversion: diffusers-format state dicts renamed into the original
single-file key layout (CompVis/LDM, Stability's SGM, SD3's MMDiT).

diffusers ships only the forward conversion (original single-file layout -> diffusers folders, used by
``from_single_file``); its reverse script is not in the wheel. The inverse below renames keys with diffusers' own
tables where they exist (``DIFFUSERS_TO_LDM_MAPPING``), and ``save_single_file`` proves it by running diffusers'
forward converters on the result: every tensor must come back bit for bit under its diffusers name.
"""

from __future__ import annotations

import torch

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
