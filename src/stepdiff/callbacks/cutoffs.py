"""The classic cutoff callbacks, batch-safe: classifier-free guidance (per family's classic name) or the IP-Adapter
scale switched off after the cutoff step, and the classic objects swapped for them (``adapt_classic``)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import callbacks as _classic

from .base import MultiPipelineCallbacks, PipelineCallback, _set_cfg_scale

__all__ = [
    "CFGCutoffCallback", "FluxCFGCutoffCallback", "IPAdapterScaleCutoffCallback", "SD3CFGCutoffCallback",
    "SDCFGCutoffCallback", "SDXLCFGCutoffCallback", "SDXLControlnetCFGCutoffCallback", "adapt_classic",
]


class CFGCutoffCallback(PipelineCallback):
    """Switch classifier-free guidance off after the cutoff step, on every stepdiff pipeline.

    After the cutoff the model computes only the conditional rows; the unconditional conditioning is
    kept, so a later callback can turn guidance back on. Works for any batch size. On Flux it is true
    CFG that ends (``true_cfg_scale``); the distilled guidance embedding is left as it is.
    """

    tensor_inputs: list[str] = []  # noqa: RUF012

    def callback_fn(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        if step_index == self.cutoff_step(pipeline):
            _set_cfg_scale(pipeline, 0.0)
        return callback_kwargs


class SDCFGCutoffCallback(CFGCutoffCallback):
    """CFG cutoff for Stable Diffusion 1.x/2.x (the classic name; same behaviour as CFGCutoffCallback)."""

    tensor_inputs = ["prompt_embeds"]  # noqa: RUF012


class SDXLCFGCutoffCallback(CFGCutoffCallback):
    """CFG cutoff for Stable Diffusion XL (the classic name; same behaviour as CFGCutoffCallback)."""

    tensor_inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids"]  # noqa: RUF012


class SDXLControlnetCFGCutoffCallback(CFGCutoffCallback):
    """CFG cutoff for the SDXL ControlNet pipelines (the classic name; same behaviour as CFGCutoffCallback).

    The classic one slices ``image[-1:]``, which keeps one row of a larger batch and, with several ControlNets,
    only the last ControlNet's image. Here the control images ride with the rows: nothing is sliced.
    """

    tensor_inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids", "image"]  # noqa: RUF012


class IPAdapterScaleCutoffCallback(PipelineCallback):
    """Set the IP-Adapter scale to 0 after the cutoff step (the classic name and constructor contract).

    On stepdiff pipelines ``set_ip_adapter_scale`` inside a callback changes the current run only: the next call
    starts from the scale its caller set (the classic callback leaves 0 set, so the next run silently has no
    IP-Adapter). The image embeddings ride with the rows, so it combines with any CFG cutoff at any batch size.
    """

    tensor_inputs: list[str] = []  # noqa: RUF012

    def callback_fn(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        if step_index == self.cutoff_step(pipeline):
            pipeline.set_ip_adapter_scale(0.0)
        return callback_kwargs


class SD3CFGCutoffCallback(CFGCutoffCallback):
    """CFG cutoff for Stable Diffusion 3 (the classic name; same behaviour as CFGCutoffCallback)."""

    tensor_inputs = ["prompt_embeds", "pooled_prompt_embeds"]  # noqa: RUF012


class FluxCFGCutoffCallback(CFGCutoffCallback):
    """True-CFG cutoff for Flux (the classic library has none: its true CFG is a local flag of ``__call__``).
    After the cutoff the transformer runs the conditional rows only; the negative conditioning is kept, so a
    later callback can turn true CFG back on. Batch-safe: nothing is sliced."""

    tensor_inputs = ["prompt_embeds", "pooled_prompt_embeds"]  # noqa: RUF012


_CLASSIC_EQUIVALENTS: dict[type, type[PipelineCallback]] = {
    _classic.IPAdapterScaleCutoffCallback: IPAdapterScaleCutoffCallback,
    _classic.SDCFGCutoffCallback: SDCFGCutoffCallback,
    _classic.SDXLCFGCutoffCallback: SDXLCFGCutoffCallback,
    _classic.SDXLControlnetCFGCutoffCallback: SDXLControlnetCFGCutoffCallback,
    _classic.SD3CFGCutoffCallback: SD3CFGCutoffCallback,
}


def adapt_classic(callback: Any) -> Any:
    """Swap the classic library's CFG-cutoff objects for their batch-safe stepdiff twins (and its IP-Adapter
    scale cutoff for the run-scoped one).

    The classic ones slice ``prompt_embeds[-1:]``, which drops prompts when the batch is larger than
    one; here the loop stops computing the unconditional rows itself, so no slicing is needed.
    Their config (cutoff ratio or index) and ``tensor_inputs`` carry over unchanged.
    """
    for classic_type, ours in _CLASSIC_EQUIVALENTS.items():
        if type(callback) is classic_type:
            cfg = callback.config
            return ours(cutoff_step_ratio=cfg.cutoff_step_ratio, cutoff_step_index=cfg.cutoff_step_index)
    if type(callback) is _classic.MultiPipelineCallbacks:
        return MultiPipelineCallbacks([adapt_classic(cb) for cb in callback.callbacks])
    return callback
