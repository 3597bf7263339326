"""Flux's packed layout and guidance: 2x2 latent patches as tokens, their positions, the two guidances in one object,
and the classic Flux attributes routed to the current run."""

from __future__ import annotations

from typing import Any

import torch

from ..guidance import ClassifierFreeGuidance, check_guidance_scale
from .run import Run, current_run, remembered

__all__ = ["FluxGuidance", "pack_latents", "pack_run", "unpack_latents"]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch one token, as Flux's transformer takes them."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), ``height`` x ``width`` the latent size (h, w); also one row (N, 4C)."""
    if latents.ndim == 2:
        return unpack_latents(latents[None], height, width)[0]
    b, _, c4 = latents.shape
    return latents.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        b, c4 // 4, height, width)


def _latent_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) positions of the packed image tokens for the rotary embedding: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxGuidance(ClassifierFreeGuidance):
    """Flux's two guidances in one object the loop asks.

    ``scale`` is true classifier-free guidance (the classic ``true_cfg_scale``): unconditional rows run only while
    it is > 1 and the run has negative conditioning (``negative_prompt`` or ``negative_prompt_embeds``), as in the
    classic pipeline. ``embedded`` is the distilled guidance value (the classic ``guidance_scale``) that
    guidance-distilled transformers (``guidance_embeds``, ``embeds=True``) take as an input; setting it writes the
    per-row ``guidance`` tensor (B,) of the run's conditioning, so it applies from the next model call. Other
    transformers ignore it, as in the classic pipeline (the value is kept, so the classic attribute reads back).
    """

    def __init__(self, true_cfg_scale: float, embedded: float, negatives: bool, embeds: bool = True) -> None:
        super().__init__(true_cfg_scale)
        self.negatives = negatives
        self.embeds = embeds  # whether the transformer takes the value (guidance_embeds)
        self._embedded = embedded
        self._rows: tuple[dict[str, torch.Tensor], ...] = ()  # the run's cond / uncond dicts, once they exist
        self.mode = "+".join(m for m, on in (("distilled", embeds), ("true-cfg", negatives)) if on) or "none"

    def batches(self) -> tuple[str, ...]:
        return super().batches() if self.negatives else ("cond",)

    @property
    def enabled(self) -> bool:
        return self.negatives and self.scale > 1.0

    @property
    def embedded(self) -> float:
        return self._embedded

    @embedded.setter
    def embedded(self, value: float) -> None:
        self._embedded = check_guidance_scale(value, "guidance_scale")
        self._write()

    def attach(self, *sides: dict[str, torch.Tensor]) -> None:
        """Hold the run's conditioning dicts and write the guidance rows into them."""
        self._rows = sides
        self._write()

    def _write(self) -> None:
        if not self.embeds or not self._rows:
            return
        like = self._rows[0]["encoder_hidden_states"]
        # float32 whatever the model's dtype, as the classic pipeline; a new tensor, so the loop re-batches it
        rows = torch.full((like.shape[0],), self._embedded, device=like.device, dtype=torch.float32)
        for side in self._rows:
            if side:
                side["guidance"] = rows


def _routed_flux(name: str, doc: str) -> property:
    """A classic Flux attribute: the current run's (inside its callbacks), else what this thread's last run left."""

    def get(self: Any) -> Any:
        run = current_run(self)
        if run is None:
            return remembered(self).get(name)
        return {"guidance_scale": run.guidance.embedded, "true_cfg_scale": run.guidance.scale,
                "joint_attention_kwargs": run.model_kwargs.get("joint_attention_kwargs"),
                "current_timestep": run.extras.current_timestep}[name]

    def set_(self: Any, value: Any) -> None:
        run = current_run(self)
        if run is None:
            remembered(self)[name] = value
        elif name == "guidance_scale":
            run.guidance.embedded = value
        elif name == "true_cfg_scale":
            run.guidance_scale = value
        else:
            raise AttributeError(f"{name} is read-only during a run")

    return property(get, set_, doc=doc)


def pack_run(pipe: Any, run: Run) -> None:
    """Flux's layout of a prepared run: everything the loop steps on packed into tokens, the token positions and the
    guidance rows."""
    state = run.state
    latents = state.latents  # (B, C, h, w)
    _, channels, height, width = latents.shape
    run.extras.latent_size = (height, width)
    state.latents = pack_latents(latents)
    for key in ("mask", "masked_image_latents"):  # inpainting's per-row conditioning
        if key in state.cond:
            value = state.cond[key]
            if key == "mask":
                value = value.repeat(1, channels // value.shape[1], 1, 1)
            packed = pack_latents(value)
            for side in (state.cond, state.uncond):
                if key in side:
                    side[key] = packed
    extras = run.extras  # inpainting's known region, put back after each step
    if extras.noise is not None:
        extras.noise = pack_latents(extras.noise)
    if extras.image_latents is not None:
        extras.image_latents = pack_latents(extras.image_latents)
    embeds = state.cond["encoder_hidden_states"]
    dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.transformer.dtype
    run.extras.txt_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=dtype)
    run.extras.img_ids = _latent_ids(height, width, latents.device, latents.dtype)
    run.guidance.attach(state.cond, state.uncond)


def unpack_given(latents: object, shape: tuple[int, int, int, int]) -> torch.Tensor:
    b, c, h, w = shape
    packed = (b, (h // 2) * (w // 2), c * 4)
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if tuple(latents.shape) != packed:
        raise ValueError(f"latents must have the packed shape {packed} for this call (batch, tokens, 4 x latent "
                         f"channels), got {tuple(latents.shape)}")
    return unpack_latents(latents, h, w)


def classic_pack_latents(latents, batch_size, num_channels_latents, height, width):
    """The classic ``FluxPipeline._pack_latents``."""
    return pack_latents(latents.view(batch_size, num_channels_latents, height, width))


def classic_unpack_latents(latents, height, width, vae_scale_factor):
    """The classic ``FluxPipeline._unpack_latents`` (``height`` and ``width`` in pixels)."""
    return unpack_latents(latents, 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2)))


def check_true_cfg(args: dict[str, Any], kind: Any) -> None:
    """``true_cfg_scale``, and whether the call has negatives (true CFG may run), as the classic pipeline."""
    kind.true_cfg_scale = check_guidance_scale(args.pop("true_cfg_scale", 1.0), "true_cfg_scale")
    embeds, negative = args.get("prompt_embeds"), args.get("negative_prompt_embeds")
    if isinstance(embeds, torch.Tensor) and isinstance(negative, torch.Tensor) and embeds.shape != negative.shape:
        if kind.true_cfg_scale > 1:
            raise ValueError(
                "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                f" got: `prompt_embeds` {tuple(embeds.shape)} != `negative_prompt_embeds` {tuple(negative.shape)}"
            )
        # As the classic pipeline: without true CFG the negatives are not used (and here, of another length,
        # they cannot be batched with the prompts, so a callback cannot turn true CFG on for this run).
        args.pop("negative_prompt_embeds")
        args.pop("negative_pooled_prompt_embeds", None)
    kind.negatives = args.get("negative_prompt") is not None or (
        args.get("negative_prompt_embeds") is not None and args.get("negative_pooled_prompt_embeds") is not None
    )
