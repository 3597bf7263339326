"""ControlNet models: one or several (diffusers' ``MultiControlNetModel``), and whether they fit the base model."""

from __future__ import annotations

from typing import Any

from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

__all__ = ["as_controlnet", "check_controlnet_fits"]


def as_controlnet(controlnet: Any) -> ControlNetModel | MultiControlNetModel | None:
    """A ControlNetModel, or several (a list or tuple) as diffusers' MultiControlNetModel, as the classic pipelines.
    None is kept: a pipeline built with its text encoders only runs ``encode_prompt`` (a call says what is missing)."""
    if controlnet is None:
        return None
    if isinstance(controlnet, (list, tuple)):
        if not controlnet:
            raise ValueError("controlnet is an empty list; pass a ControlNetModel or a non-empty list of them")
        bad = [type(c).__name__ for c in controlnet if not isinstance(c, ControlNetModel)]
        if bad:
            raise TypeError(f"controlnet must be a ControlNetModel or a list of them; the list holds {', '.join(bad)}")
        return MultiControlNetModel(list(controlnet))
    if not isinstance(controlnet, (ControlNetModel, MultiControlNetModel)):
        raise TypeError(
            f"controlnet must be a diffusers ControlNetModel, a MultiControlNetModel or a list of ControlNetModel, "
            f"got {type(controlnet).__name__}"
        )
    return controlnet


def _nets(controlnet: Any) -> list[ControlNetModel]:
    return list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]


def check_controlnet_fits(controlnet: Any, unet: Any) -> None:
    """A ControlNet made for another base model fails here, naming what differs, before any model work."""
    if controlnet is None or unet is None:
        return
    ucfg = unet.config
    for k, net in enumerate(_nets(controlnet)):
        which = "controlnet" if not isinstance(controlnet, MultiControlNetModel) else f"controlnet[{k}]"
        cfg = net.config
        for name in ("cross_attention_dim", "block_out_channels", "layers_per_block", "in_channels",
                     "addition_embed_type"):
            mine, theirs = getattr(cfg, name, None), getattr(ucfg, name, None)
            if isinstance(mine, (list, tuple)):
                mine, theirs = list(mine), list(theirs) if isinstance(theirs, (list, tuple)) else theirs
            if name == "in_channels":
                theirs = 4 if theirs in (4, 9) else theirs  # inpainting UNets take 9 channels; ControlNets see latents
            if mine != theirs:
                raise ValueError(
                    f"{which} does not fit this base model: its {name} is {mine!r} but the UNet's is {theirs!r} "
                    "(a ControlNet must be trained for the same base model family)"
                )
