"""Run the text-independent start of a UNet once per guided batch instead of twice.

With classifier-free guidance the UNet sees ``[x; x]``: the unconditional and the conditional half
share the latents and, in SD 1.x/2.x UNets, the time embedding (it depends on the timestep only).
Everything before the first cross-attention therefore computes the same numbers for both halves:
``conv_in``, every down block without cross-attention, and the first ResNet of the first
cross-attention block. Those modules here run on one half and their outputs are repeated, which
is exact up to float rounding (GroupNorm, convolutions and the time embedding act row by row).

UNets whose time embedding also depends on the prompt (SDXL's ``text_time`` added conditioning,
class embeddings) get nothing shared: there the halves differ from the first ResNet on. Hooks are
torch's own forward hooks, registered for one model call and always removed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["shared_prefix", "shared_prefix_modules"]


def shared_prefix_modules(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``unet`` whose inputs are identical in both halves of ``[x; x]``; [] if none."""
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(unet, "conv_in") or not hasattr(unet, "down_blocks"):
        return []
    if any(cfg.get(key) is not None for key in ("class_embed_type", "addition_embed_type", "time_cond_proj_dim")):
        return []  # the time embedding depends on more than the timestep
    modules: list[torch.nn.Module] = [unet.conv_in]
    for block in unet.down_blocks:
        if not getattr(block, "has_cross_attention", False):
            modules.append(block)  # resnets (+ downsampler): hidden states and temb only
            continue
        # CrossAttnDownBlock2D runs resnets[0] before attentions[0]; other cross-attention blocks may not.
        if type(block).__name__ == "CrossAttnDownBlock2D" and len(block.resnets):
            modules.append(block.resnets[0])
        break
    return modules


def _first_half(value: object) -> object:
    return value[: value.shape[0] // 2] if isinstance(value, torch.Tensor) else value


def _doubled(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    if isinstance(value, tuple):
        return tuple(_doubled(v) for v in value)
    return value


def _run_on_first_half(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(_first_half(a) for a in args), {k: _first_half(v) for k, v in kwargs.items()}


def _repeat_output(module, args: tuple, kwargs: dict, output: object) -> object:
    return _doubled(output)


@contextmanager
def shared_prefix(unet: torch.nn.Module) -> Iterator[int]:
    """While active, a UNet call on ``[x; x]`` (with one timestep for all rows) computes its prefix once.

    Yields the number of modules shared (0 when the UNet's structure does not allow it). Only valid
    for inputs whose two halves are equal; the denoising loop enters it only for guided batches.
    """
    handles = []
    try:
        for module in shared_prefix_modules(unet):
            # First in line, so other hooks see what the module computes (pre) and what the UNet gets (post).
            handles.append(module.register_forward_pre_hook(_run_on_first_half, with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(_repeat_output, with_kwargs=True, prepend=True))
        yield len(handles) // 2
    finally:
        for handle in handles:
            handle.remove()
