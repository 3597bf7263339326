"""Stable Diffusion 1.x / 2.x: one CLIP text encoder; epsilon- or v-prediction UNet."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils import logging as diffusers_logging

from .._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.loaders import FromSingleFileMixin, IPAdapterMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from .base import StepDiffPipeline
from .checks import pop_prompts, repeat_rows, tokenize
from .components import classic_init, register_components
from .conditioning import Conditioning
from .folders import normalize_legacy_configs
from .ip_adapter import IPAdapterFeature
from .run import Run
from .signatures import classic_call

__all__ = ["StableDiffusionPipeline"]

# The classic pipeline's logger: its warnings (a prompt cut at 77 tokens) follow diffusers' verbosity settings.
_LOGGER = diffusers_logging.get_logger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")


class StableDiffusionPipeline(
    StepDiffPipeline, StableDiffusionMixin, TextualInversionLoaderMixin, StableDiffusionLoraLoaderMixin,
    IPAdapterMixin, FromSingleFileMixin,
):
    """Text-to-image with Stable Diffusion 1.x/2.x, on stepdiff's shared denoising loop.

    The safety checker and feature extractor of real SD folders are loaded if present but not run.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components: ClassVar[list[str]] = ["safety_checker", "feature_extractor", "image_encoder"]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "prompt_embeds", "negative_prompt_embeds", "denoised"]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        "prompt_embeds": ("cond", "encoder_hidden_states"),
        "negative_prompt_embeds": ("uncond", "encoder_hidden_states"),
    }
    family = "sd"
    features = (IPAdapterFeature(),)

    __init__ = classic_init("StableDiffusionPipeline")

    def _init_components(self, modules: dict[str, Any], config: dict[str, Any]) -> None:
        normalize_legacy_configs(modules["scheduler"], modules["unet"])
        register_components(self, modules, config)

    def _embed(self, texts: list[str], device: torch.device, clip_skip: int | None, max_length: int | None = None):
        ids = tokenize(self.tokenizer, texts, max_length, _LOGGER, textual_inversion=self.maybe_convert_prompt).to(device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        if clip_skip is None:
            embeds = self.text_encoder(ids, attention_mask=mask)[0]
        else:  # hidden state clip_skip layers before the last, through the final layer norm
            hidden = self.text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
            embeds = self.text_encoder.text_model.final_layer_norm(hidden[-(clip_skip + 1)])
        return embeds

    def encode(
        self, *, device, num_images_per_prompt, height, width, prompt, negative_prompt,
        prompt_embeds, negative_prompt_embeds, clip_skip,
    ) -> Conditioning:
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        if prompt_embeds is None and negative_prompt_embeds is None:
            # Prompts and negatives in one encoder call (the same lengths and clip_skip for both).
            negative = negative_prompt if negative_prompt is not None else [""] * len(prompt)
            prompt_embeds, negative_prompt_embeds = self._embed(prompt + negative, device, clip_skip).split(len(prompt))
        batch = prompt_embeds.shape[0]
        if negative_prompt_embeds is None:
            negative = negative_prompt if negative_prompt is not None else [""] * batch
            negative_prompt_embeds = self._embed(negative, device, clip_skip, max_length=prompt_embeds.shape[1])
        cond = repeat_rows(prompt_embeds.to(device, dtype), num_images_per_prompt)
        uncond = repeat_rows(negative_prompt_embeds.to(device, dtype), num_images_per_prompt)
        return Conditioning(cond={"encoder_hidden_states": cond}, uncond={"encoder_hidden_states": uncond})

    def check_prompts(self, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        depth = self.text_encoder.config.num_hidden_layers if self.text_encoder is not None else None
        return pop_prompts(args, max_clip_skip=depth)

    def model_kwargs(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"cross_attention_kwargs": args.pop("cross_attention_kwargs", None)}

    def predict(self, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict, run: Run):
        return self.unet(
            self.extend_model_input(latent_input, conditioning), timestep,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            timestep_cond=conditioning.get("timestep_cond"),
            added_cond_kwargs=self.added_cond_extras(conditioning) or None,
            cross_attention_kwargs=run.model_kwargs["cross_attention_kwargs"], return_dict=False,
            **self.unet_extras(latent_input, timestep, conditioning, run),
        )[0]

    def encode_prompt(
        self, prompt, device=None, num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
        negative_prompt=None, prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None, lora_scale: float | None = None, clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The classic signature and return value: (prompt_embeds, negative_prompt_embeds or None without CFG),
        through the same encoding the pipeline itself uses."""
        c = self._encode_classic(dict(
            prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip,
        ), device, num_images_per_prompt, lora_scale, None)
        prompt_embeds = c.cond["encoder_hidden_states"]
        negative_prompt_embeds = c.uncond["encoder_hidden_states"] if do_classifier_free_guidance else None
        # The classic names (tools that map the outputs to __call__ arguments read them from this line).
        return prompt_embeds, negative_prompt_embeds

    __call__ = classic_call("StableDiffusionPipeline")
