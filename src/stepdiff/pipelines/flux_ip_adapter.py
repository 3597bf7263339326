"""IP-Adapter on Flux, through diffusers' own ``FluxIPAdapterMixin`` (``load_ip_adapter``, ``set_ip_adapter_scale``,
``unload_ip_adapter``), as ``IPAdapterFeature`` does it for SD and SDXL.

The classic Flux pipelines take ``ip_adapter_image`` / ``ip_adapter_image_embeds`` for the prompt and
``negative_ip_adapter_image`` / ``negative_ip_adapter_image_embeds`` for true CFG's negative pass; a side given
neither is a black image (through the image encoder), as in the classic pipelines. The embeddings reach the
transformer as ``joint_attention_kwargs["ip_adapter_image_embeds"]``, built per model call from the rows of that
call: ``ip_adapter_image_embeds_0``, ... ride with the conditional rows (positive) and the unconditional rows
(negative), so true CFG's negative rows are batched with the positive ones, and a cutoff or an interval drops them
with the negative prompt. The scale is the run's, as for SD (``IPAdapterScaleCutoffCallback`` works).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._quiet import quiet_transformers
from .ip_adapter import IPAdapterFeature, IPAdapterRun, ip_adapters_loaded
from .run import CallInputs, Run

with quiet_transformers():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline as _DiffusersFlux

__all__ = ["FluxIPAdapterFeature", "FluxIPAdapterRun"]

_NAMES = ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image", "negative_ip_adapter_image_embeds")


def _check_side(prefix: str, image: object, embeds: object, n: int) -> None:
    image_name, embeds_name = f"{prefix}ip_adapter_image", f"{prefix}ip_adapter_image_embeds"
    if image is not None and embeds is not None:
        raise ValueError(f"pass at most one of {image_name} and {embeds_name} (got both)")
    if image is not None:
        images = image if isinstance(image, list) else [image]
        if len(images) != n:
            raise ValueError(f"{image_name} has {len(images)} images but {n} IP-Adapters are loaded; give one per adapter")
    elif embeds is not None:
        if not isinstance(embeds, list) or len(embeds) != n:
            raise ValueError(f"{embeds_name} must be a list of {n} tensors (one per loaded IP-Adapter), got "
                             f"{type(embeds).__name__}" + (f" of {len(embeds)}" if isinstance(embeds, list) else ""))
        for k, e in enumerate(embeds):
            # (1, images, dim): one set of image embeddings that every row of the call gets, as the classic
            # pipelines repeat it (a larger first dimension would mix rows there).
            if not isinstance(e, torch.Tensor) or e.ndim not in (3, 4) or e.shape[0] != 1:
                got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
                raise ValueError(f"{embeds_name}[{k}] must be a tensor of shape (1, images, dim) (or (1, images, "
                                 f"tokens, dim)): one set for every image of the call, got {got}")


class FluxIPAdapterFeature(IPAdapterFeature):
    """The classic Flux IP-Adapter arguments as per-row conditioning, with run-scoped scales."""

    # The classic Flux pipeline's public helpers, unchanged: CLIP image embeddings (one set per adapter, repeated
    # for every row) and their per-adapter arrangement.
    classic = _DiffusersFlux

    def check_inputs(self, pipe: Any, args: dict[str, Any], kind: CallInputs) -> None:
        # IPAdapterFeature's check knows one image argument; Flux has two sides, checked here.
        values = {name: args.pop(name, None) for name in _NAMES}
        n = ip_adapters_loaded(pipe)
        given = [name for name in _NAMES if values[name] is not None]
        if not given:
            if n:
                raise ValueError(
                    "this pipeline has an IP-Adapter loaded: pass ip_adapter_image (or ip_adapter_image_embeds), "
                    "or call pipe.unload_ip_adapter()"
                )
            return
        if not n:
            raise ValueError(f"{given[0]} needs an IP-Adapter: call pipe.load_ip_adapter(...) first")
        for prefix in ("", "negative_"):
            _check_side(prefix, values[f"{prefix}ip_adapter_image"], values[f"{prefix}ip_adapter_image_embeds"], n)
        kind.ip_adapter = values

    def check_rows(self, pipe: Any, kind: CallInputs, rows: int, batch_size: int, per_prompt: int) -> None:
        values = kind.ip_adapter
        if values is None or getattr(pipe, "image_encoder", None) is not None:
            return
        # Without an image encoder every side the run uses needs its embeddings (the classic pipelines encode a
        # black image for a side given neither, and fail inside the encoder call without one).
        sides = ["", "negative_"] if kind.negatives else [""]
        for prefix in sides:
            if values[f"{prefix}ip_adapter_image"] is not None:
                raise ValueError(
                    f"{prefix}ip_adapter_image needs an image encoder, and this pipeline has none (the IP-Adapter was "
                    f"loaded with image_encoder_pretrained_model_name_or_path=None?): load one with the adapter, or "
                    f"pass {prefix}ip_adapter_image_embeds"
                )
            if values[f"{prefix}ip_adapter_image_embeds"] is None:
                why = "true CFG's negative rows (a negative prompt was given)" if prefix else "the prompt's rows"
                raise ValueError(
                    f"{prefix}ip_adapter_image_embeds is needed for {why}: without it the pipeline encodes a black "
                    "image, and this pipeline has no image encoder"
                )

    def start(self, pipe: Any, run: Run, kind: CallInputs) -> None:
        if kind.ip_adapter is not None:
            run.extras.ip_adapter_size = (kind.height, kind.width)
        super().start(pipe, run, kind)

    def add_conditioning(self, pipe: Any, run: Run, kind: CallInputs, dtype, device, generator) -> None:
        values, run.extras.ip_adapter = run.extras.ip_adapter, None  # used once, here
        if values is None:
            return
        height, width = run.extras.ip_adapter_size
        black = [np.zeros((width, height, 3), dtype=np.uint8)] * ip_adapters_loaded(pipe)  # the classic default
        rows = run.state.latents.shape[0]
        sides = [("", run.state.cond)]
        if run.guidance.negatives:  # the run has negative rows (true CFG may be on now, or turned on by a callback)
            sides.append(("negative_", run.state.uncond))
        for prefix, side in sides:
            image, embeds = values[f"{prefix}ip_adapter_image"], values[f"{prefix}ip_adapter_image_embeds"]
            if image is None and embeds is None:
                image = black
            for k, e in enumerate(pipe.prepare_ip_adapter_image_embeds(image, embeds, device, rows)):
                side[f"ip_adapter_image_embeds_{k}"] = e.to(dtype)

    def added_cond(self, pipe: Any, conditioning: dict) -> dict[str, Any]:
        """``ip_adapter_image_embeds`` for the transformer's ``joint_attention_kwargs``, from this call's rows."""
        extras = super().added_cond(pipe, conditioning)
        return {"ip_adapter_image_embeds": extras["image_embeds"]} if extras else {}


FluxIPAdapterRun = IPAdapterRun  # the former mixin's name (``issubclass`` holds for Flux's classes too)
