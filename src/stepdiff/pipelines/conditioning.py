"""Conditioning: the conditional and unconditional rows a family's ``encode`` makes, the LoRA scale on the text
encoders while it runs, and the guidance embedding of guidance-distilled UNets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

from .._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline as _DiffusersSD

__all__ = ["Conditioning", "guidance_embedding", "text_lora_scale"]


@dataclass
class Conditioning:
    cond: dict[str, torch.Tensor]  # (B, ...) each, one row per image
    uncond: dict[str, torch.Tensor]


@contextlib.contextmanager
def text_lora_scale(pipe: Any, model_kwargs: dict[str, Any]) -> Iterator[None]:
    """LoRA scale (``cross_attention_kwargs={"scale": s}``) on the text encoders while prompts are encoded."""
    kwargs = model_kwargs.get("cross_attention_kwargs") or model_kwargs.get("joint_attention_kwargs") or {}
    scale = kwargs.get("scale")
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    encoders = [e for e in encoders if e is not None]
    if scale is None or not USE_PEFT_BACKEND or not hasattr(pipe, "load_lora_weights"):
        yield
        return
    for e in encoders:
        scale_lora_layers(e, scale)
    try:
        yield
    finally:
        for e in encoders:
            unscale_lora_layers(e, scale)


def guidance_embedding(pipe: Any, scale: float, rows: int, dim: int, dtype, device) -> torch.Tensor:
    """Guidance-distilled UNets take the scale as an embedding (``timestep_cond``), as the classic pipelines do."""
    w = torch.tensor(scale - 1).repeat(rows)
    return _DiffusersSD.get_guidance_scale_embedding(pipe, w, embedding_dim=dim).to(device=device, dtype=dtype)
