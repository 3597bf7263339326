"""Stable Diffusion XL: two CLIP text encoders, pooled embeddings and micro-conditioning time ids."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils import logging as diffusers_logging

from .._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.loaders import (
        FromSingleFileMixin,
        IPAdapterMixin,
        StableDiffusionXLLoraLoaderMixin,
        TextualInversionLoaderMixin,
    )
from .base import StepDiffPipeline
from .checks import check_fraction, pop_prompts, repeat_rows, tokenize
from .components import classic_init, register_components
from .conditioning import Conditioning
from .ip_adapter import IPAdapterFeature
from .run import CallInputs, Run
from .signatures import classic_call

__all__ = ["StableDiffusionXLPipeline"]

# The classic pipeline's logger: its warnings (a prompt cut at 77 tokens) follow diffusers' verbosity settings.
_LOGGER = diffusers_logging.get_logger("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl")


_fraction = check_fraction


def _size_pair(name: str, value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        isinstance(value, (tuple, list)) and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be a (height, width) pair of non-negative ints, got {value!r}")


def pop_aesthetic_scores(args: dict[str, Any]) -> dict[str, float]:
    """Image-to-image and inpainting: the refiner's aesthetic-score micro-conditioning (classic defaults)."""
    scores = {}
    for name, default in (("aesthetic_score", 6.0), ("negative_aesthetic_score", 2.5)):
        value = args.pop(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        scores[name] = float(value)
    return scores


def image_time_id_lists(
    pipe: Any, height, width, original_size, crops_coords_top_left, target_size, negative_original_size,
    negative_crops_coords_top_left, negative_target_size, aesthetic_score, negative_aesthetic_score,
) -> tuple[tuple, tuple | None]:
    """The image pipelines' micro-conditioning: an aesthetic score for refiners, the positive crops for both sides."""
    original_size = original_size or (height, width)
    target_size = target_size or (height, width)
    negative_original_size = negative_original_size or original_size
    negative_target_size = negative_target_size or target_size
    if pipe.config.get("requires_aesthetics_score", False):  # the refiner: an aesthetic score, no target size
        return (original_size + crops_coords_top_left + (aesthetic_score,),
                negative_original_size + negative_crops_coords_top_left + (negative_aesthetic_score,))
    # As the classic image pipelines: the negative rows use the positive crop coordinates.
    return (original_size + crops_coords_top_left + target_size,
            negative_original_size + crops_coords_top_left + negative_target_size)


class StableDiffusionXLPipeline(
    StepDiffPipeline, StableDiffusionMixin, FromSingleFileMixin, StableDiffusionXLLoraLoaderMixin,
    TextualInversionLoaderMixin, IPAdapterMixin,
):
    """Text-to-image with SDXL base models, on stepdiff's shared denoising loop (no watermarker)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components: ClassVar[list[str]] = [
        "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "image_encoder", "feature_extractor",
    ]
    _callback_tensor_inputs: ClassVar[list[str]] = [
        "latents", "prompt_embeds", "negative_prompt_embeds", "add_text_embeds", "add_time_ids",
        "negative_pooled_prompt_embeds", "negative_add_time_ids", "denoised",
    ]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        "prompt_embeds": ("cond", "encoder_hidden_states"),
        "negative_prompt_embeds": ("uncond", "encoder_hidden_states"),
        "add_text_embeds": ("cond", "text_embeds"),
        "negative_pooled_prompt_embeds": ("uncond", "text_embeds"),
        "add_time_ids": ("cond", "time_ids"),
        "negative_add_time_ids": ("uncond", "time_ids"),
    }
    family = "sdxl"
    features = (IPAdapterFeature(),)

    __init__ = classic_init("StableDiffusionXLPipeline")

    def _init_components(self, modules: dict[str, Any], config: dict[str, Any]) -> None:
        del config["add_watermarker"]  # no invisible watermark here; the classic class keeps it out of the config too
        register_components(self, modules, config)

    def _embed(self, texts: list[str], texts_2: list[str], device, clip_skip: int | None, max_length=None):
        """(hidden states of both encoders concatenated, pooled projection of the second)."""
        pairs = [(self.tokenizer, self.text_encoder, texts), (self.tokenizer_2, self.text_encoder_2, texts_2)]
        hidden, pooled = [], None
        for tokenizer, encoder, batch in pairs:
            if encoder is None:
                continue
            ids = tokenize(tokenizer, batch, max_length, _LOGGER, textual_inversion=self.maybe_convert_prompt)
            out = encoder(ids.to(device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds come first
                pooled = out[0]
            hidden.append(out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)])
        return torch.cat(hidden, dim=-1), pooled

    def time_id_lists(
        self, height: int, width: int, original_size, crops_coords_top_left, target_size, negative_original_size,
        negative_crops_coords_top_left, negative_target_size, **extra: Any,
    ) -> tuple[tuple, tuple | None]:
        """Micro-conditioning of the conditional rows and (None: the same) of the unconditional rows."""
        if self.kind.takes_image:  # image-to-image and inpainting: the refiner's aesthetic score
            return image_time_id_lists(self, height, width, original_size, crops_coords_top_left, target_size,
                                       negative_original_size, negative_crops_coords_top_left, negative_target_size,
                                       **extra)
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        ids = original_size + crops_coords_top_left + target_size
        if negative_original_size is not None and negative_target_size is not None:
            return ids, negative_original_size + negative_crops_coords_top_left + negative_target_size
        return ids, None

    def _time_ids(self, ids: tuple, dtype, projection_dim: int) -> torch.Tensor:
        ids = list(ids)
        passed = self.unet.config.addition_time_embed_dim * len(ids) + projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(
                f"the UNet expects an added embedding of length {expected} but the time ids and text_encoder_2 "
                f"projection give {passed}; check unet.config.addition_time_embed_dim and projection_dim"
            )
        return torch.tensor([ids], dtype=dtype)

    def encode(
        self, *, device, num_images_per_prompt, height, width, prompt, prompt_2, negative_prompt,
        negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
        negative_pooled_prompt_embeds, clip_skip, **time_args: Any,
    ) -> Conditioning:
        zeros_for_negative = negative_prompt is None and self.config.force_zeros_for_empty_prompt
        if prompt_embeds is None and negative_prompt_embeds is None and clip_skip is None and not zeros_for_negative:
            # Prompts and negatives through each encoder in one call (negatives never use clip_skip).
            neg = negative_prompt if negative_prompt is not None else [""] * len(prompt)
            both, pooled = self._embed(prompt + neg, (prompt_2 or prompt) + (negative_prompt_2 or neg), device, None)
            prompt_embeds, negative_prompt_embeds = both.split(len(prompt))
            pooled_prompt_embeds, negative_pooled_prompt_embeds = pooled.split(len(prompt))
        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = self._embed(prompt, prompt_2 or prompt, device, clip_skip)
        batch = prompt_embeds.shape[0]
        if negative_prompt_embeds is None:
            if zeros_for_negative:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            else:
                neg = negative_prompt if negative_prompt is not None else [""] * batch
                neg_2 = negative_prompt_2 or neg
                negative_prompt_embeds, negative_pooled_prompt_embeds = self._embed(
                    neg, neg_2, device, None, max_length=prompt_embeds.shape[1]
                )
        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype
        projection_dim = (
            self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None
            else pooled_prompt_embeds.shape[-1]
        )
        n = num_images_per_prompt

        def rows(t: torch.Tensor) -> torch.Tensor:
            return repeat_rows(t.to(device, dtype), n)

        cond = {"encoder_hidden_states": rows(prompt_embeds), "text_embeds": rows(pooled_prompt_embeds)}
        uncond = {"encoder_hidden_states": rows(negative_prompt_embeds), "text_embeds": rows(negative_pooled_prompt_embeds)}
        if height is not None:  # a run's micro-conditioning (encode_prompt, which may run without a UNet, has none)
            ids, neg_ids = self.time_id_lists(height, width, **time_args)
            time_ids = self._time_ids(ids, dtype, projection_dim)
            neg_time_ids = time_ids if neg_ids is None else self._time_ids(neg_ids, dtype, projection_dim)
            cond["time_ids"] = time_ids.to(device).repeat(batch * n, 1)
            uncond["time_ids"] = neg_time_ids.to(device).repeat(batch * n, 1)
        return Conditioning(cond=cond, uncond=uncond)

    _SIZE_ARGS = (
        "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
        "negative_crops_coords_top_left", "negative_target_size",
    )

    def check_prompts(self, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        depth = min((e.config.num_hidden_layers for e in encoders), default=None)
        batch, kwargs = pop_prompts(
            args, extra=("prompt_2", "negative_prompt_2"), pooled=True,
            max_clip_skip=None if depth is None else depth - 1,
        )
        for name in self._SIZE_ARGS:
            kwargs[name] = _size_pair(name, args.pop(name, (0, 0) if "crops" in name else None))
        if self.kind.takes_image:
            kwargs.update(pop_aesthetic_scores(args))
        return batch, kwargs

    def model_kwargs(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"cross_attention_kwargs": args.pop("cross_attention_kwargs", None)}

    def check_family_inputs(self, args: dict[str, Any], call: CallInputs) -> None:
        call.denoising_end = _fraction("denoising_end", args.pop("denoising_end", None))

    def truncate_end(self, run: Run, steps: torch.Tensor, call: CallInputs) -> torch.Tensor:
        """``denoising_end``: stop where a refiner takes over ("mixture of denoisers"), as the classic pipeline."""
        end = call.denoising_end
        if end is None:
            return steps
        start = call.denoising_start
        if start is not None and start >= end:
            raise ValueError(f"denoising_start ({start}) must be less than denoising_end ({end})")
        train = run.scheduler.config.num_train_timesteps
        cutoff = round(train - end * train)
        return steps[: int((steps >= cutoff).sum())]

    def predict(self, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict, run: Run):
        return self.unet(
            self.extend_model_input(latent_input, conditioning), timestep,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            added_cond_kwargs={
                "text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"],
                **self.added_cond_extras(conditioning),
            },
            timestep_cond=conditioning.get("timestep_cond"),
            cross_attention_kwargs=run.model_kwargs["cross_attention_kwargs"], return_dict=False,
            **self.unet_extras(latent_input, timestep, conditioning, run),
        )[0]

    def encode_prompt(
        self, prompt, prompt_2=None, device=None, num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True, negative_prompt=None, negative_prompt_2=None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None, negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None, clip_skip: int | None = None,
    ):
        """The classic signature and 4-tuple (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
        negative_pooled_prompt_embeds; the negatives None without CFG), through the pipeline's own encoding."""
        c = self._encode_classic(dict(
            prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=clip_skip,
        ), device, num_images_per_prompt, lora_scale, None)
        cfg = do_classifier_free_guidance
        prompt_embeds, pooled_prompt_embeds = c.cond["encoder_hidden_states"], c.cond["text_embeds"]
        negative_prompt_embeds = c.uncond["encoder_hidden_states"] if cfg else None
        negative_pooled_prompt_embeds = c.uncond["text_embeds"] if cfg else None
        # The classic names (tools that map the outputs to __call__ arguments read them from this line).
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    __call__ = classic_call("StableDiffusionXLPipeline")
