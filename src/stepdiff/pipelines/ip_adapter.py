"""IP-Adapter on the shared loop (a feature object a family's pipeline class holds), through diffusers' own
``IPAdapterMixin`` (``load_ip_adapter``,
``set_ip_adapter_scale``, ``unload_ip_adapter``).

The image embeddings are per-row conditioning: ``ip_adapter_image_embeds_0``, ... hold the positive
embeddings in the conditional rows and the negative ones in the unconditional rows, so a CFG cutoff,
an interval or a schedule shrinks them with the text embeddings, at any batch size. (The classic
pipelines keep them as one ``[negative, positive]`` tensor that no callback can reach.)

The IP-Adapter scale belongs to the run: ``pipeline.set_ip_adapter_scale(s)`` inside a step callback
(``IPAdapterScaleCutoffCallback`` does that) changes the current run from its next model call, and
the next call starts again from the scale its caller set outside any run. The attention processors
hold the scale, so the model calls of IP-Adapter runs take a lock while their scale is in place:
concurrent IP-Adapter runs on one pipeline take turns per model call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from .._quiet import quiet_transformers
from .parts import Part, diffusers_method, has_part, marker
from .run import CallInputs, Run, current_run

with quiet_transformers():
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline as _DiffusersSD

__all__ = ["IPAdapterFeature", "IPAdapterRun"]

_IP_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, FluxIPAdapterAttnProcessor)
_LOCK = threading.RLock()


class IPAdapterFeature(Part):
    """``ip_adapter_image`` / ``ip_adapter_image_embeds`` as per-row conditioning, and run-scoped IP-Adapter scales."""

    # The classic pipelines' public helpers, unchanged: CLIP image features (zeros for the negative rows, or the
    # encoder's features of a black image for "plus" adapters) and their per-adapter arrangement.
    classic = _DiffusersSD

    def pipeline_attributes(self) -> dict[str, Any]:
        return {"encode_image": self.classic.encode_image, "set_ip_adapter_scale": set_ip_adapter_scale,
                "prepare_ip_adapter_image_embeds": self.classic.prepare_ip_adapter_image_embeds}

    def check_inputs(self, pipe: Any, args: dict[str, Any], kind: CallInputs) -> None:
        image, embeds = args.pop("ip_adapter_image", None), args.pop("ip_adapter_image_embeds", None)
        n = ip_adapters_loaded(pipe)
        if image is None and embeds is None:
            if n:
                raise ValueError(
                    "this pipeline has an IP-Adapter loaded: pass ip_adapter_image (or ip_adapter_image_embeds), "
                    "or call pipe.unload_ip_adapter()"
                )
            return
        name = "ip_adapter_image" if image is not None else "ip_adapter_image_embeds"
        if image is not None and embeds is not None:
            raise ValueError("pass at most one of ip_adapter_image and ip_adapter_image_embeds (got both)")
        if not n:
            raise ValueError(f"{name} needs an IP-Adapter: call pipe.load_ip_adapter(...) first")
        if image is not None:
            if getattr(pipe, "image_encoder", None) is None:
                raise ValueError(
                    "ip_adapter_image needs an image encoder, and this pipeline has none (the IP-Adapter was loaded "
                    "with image_encoder_folder=None?): load one with the adapter, or pass ip_adapter_image_embeds"
                )
            images = image if isinstance(image, list) else [image]
            if len(images) != n:
                raise ValueError(
                    f"ip_adapter_image has {len(images)} images but {n} IP-Adapters are loaded; give one per adapter"
                )
        else:
            if not isinstance(embeds, list) or len(embeds) != n:
                raise ValueError(f"ip_adapter_image_embeds must be a list of {n} tensors (one per loaded IP-Adapter), "
                                 f"got {type(embeds).__name__}")
            for k, e in enumerate(embeds):
                if not isinstance(e, torch.Tensor) or e.ndim not in (3, 4):
                    got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
                    raise ValueError(f"ip_adapter_image_embeds[{k}] must be a 3-D or 4-D tensor, got {got}")
        kind.ip_adapter = (image, embeds)

    def start(self, pipe: Any, run: Run, kind: CallInputs) -> None:
        if kind.ip_adapter is not None:
            run.extras.ip_adapter = kind.ip_adapter
            with _LOCK:  # never while another run's model call has its own scales in the processors
                run.extras.ip_adapter_scales = {n: list(p.scale) for n, p in ip_processors(pipe).items()}

    def add_conditioning(self, pipe: Any, run: Run, kind: CallInputs, dtype, device, generator) -> None:
        if run.extras.ip_adapter is None:
            return
        (image, embeds), run.extras.ip_adapter = run.extras.ip_adapter, None  # used once, here
        rows = run.state.latents.shape[0]
        # Given embeddings are [negative, positive] when the call starts with guidance, positive alone otherwise,
        # as in the classic pipelines; images always give both.
        both = embeds is None or run.do_classifier_free_guidance
        prepared = pipe.prepare_ip_adapter_image_embeds(image, embeds, device, rows, both)
        for k, e in enumerate(prepared):
            negative, positive = e.chunk(2) if both else (torch.zeros_like(e), e)
            run.state.cond[f"ip_adapter_image_embeds_{k}"] = positive.to(dtype)
            run.state.uncond[f"ip_adapter_image_embeds_{k}"] = negative.to(dtype)

    def added_cond(self, pipe: Any, conditioning: dict) -> dict[str, Any]:
        keys = [k for k in conditioning if k.startswith("ip_adapter_image_embeds_")]
        keys.sort(key=lambda k: int(k.rsplit("_", 1)[1]))
        return {"image_embeds": [conditioning[k] for k in keys]} if keys else {}

    @contextlib.contextmanager
    def model_call_context(self, pipe: Any, run: Run) -> Iterator[None]:
        """The run's IP-Adapter scales in the attention processors for the length of one model call."""
        scales = run.extras.ip_adapter_scales
        if scales is None:
            yield
            return
        with _LOCK:
            processors = ip_processors(pipe)
            saved = {n: list(p.scale) for n, p in processors.items()}
            for n, p in processors.items():
                p.scale = list(scales.get(n, p.scale))
            try:
                yield
            finally:
                for n, p in processors.items():
                    p.scale = saved[n]


def ip_processors(pipe: Any) -> dict[str, Any]:
    return {n: p for n, p in pipe.denoiser.attn_processors.items() if isinstance(p, _IP_PROCESSORS)}


def ip_adapters_loaded(pipe: Any) -> int:
    proj = getattr(pipe.denoiser, "encoder_hid_proj", None)  # the UNet's, or Flux's transformer's
    if getattr(pipe.denoiser.config, "encoder_hid_dim_type", None) != "ip_image_proj" or proj is None:
        return 0
    return len(proj.image_projection_layers)


def set_ip_adapter_scale(pipe: Any, scale: Any) -> None:
    """The classic call. Inside a step callback it changes the current run only (from its next model call);
    outside a run it sets the scale new calls start from."""
    classic = diffusers_method(pipe, "set_ip_adapter_scale")  # diffusers' IPAdapterMixin / FluxIPAdapterMixin
    run = current_run(pipe)
    if run is None or run.extras.ip_adapter_scales is None:
        with _LOCK:
            classic(scale)
        return
    with _LOCK:  # let diffusers work out the per-layer scales, read them, put the caller's back
        processors = ip_processors(pipe)
        saved = {n: list(p.scale) for n, p in processors.items()}
        try:
            classic(scale)
            run.extras.ip_adapter_scales = {n: list(p.scale) for n, p in processors.items()}
        finally:
            for n, p in processors.items():
                p.scale = saved[n]


# The former mixin's name: ``issubclass(cls, IPAdapterRun)`` holds for a pipeline class with IP-Adapters.
IPAdapterRun = marker("IPAdapterRun", "A pipeline class with an IPAdapterFeature (Flux's included).",
                      lambda cls: has_part(cls, IPAdapterFeature), __name__)
