"""Stable Diffusion 3: a flow-matching transformer with CLIP-L, CLIP-G and (optional) T5 text encoders."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.utils import logging as diffusers_logging

from .._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.loaders import FromSingleFileMixin, SD3IPAdapterMixin, SD3LoraLoaderMixin
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from ..guidance import Guidance, SkipLayerGuidance, check_guidance_scale
from .base import StepDiffPipeline
from .checks import pop_prompts, repeat_rows, tokenize
from .components import classic_init, register_components
from .conditioning import Conditioning
from .run import CallInputs, Run
from .signatures import classic_call

__all__ = ["StableDiffusion3Pipeline"]

# The classic pipeline's logger: its warnings (a prompt cut at 77 CLIP / max_sequence_length T5 tokens) follow
# diffusers' verbosity settings.
_LOGGER = diffusers_logging.get_logger("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3")


class StableDiffusion3Pipeline(StepDiffPipeline, SD3LoraLoaderMixin, FromSingleFileMixin, SD3IPAdapterMixin):
    """Text-to-image with SD3 / SD3.5 (MMDiT) models, on stepdiff's shared denoising loop.

    ``text_encoder_3=None`` (and ``tokenizer_3=None``) runs without T5: its rows are zeros, as in the
    classic pipeline. ``denoised`` is the flow-matching x0 estimate, latents - sigma * velocity.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components: ClassVar[list[str]] = ["text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"]
    _callback_tensor_inputs: ClassVar[list[str]] = [
        "latents", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
        "negative_pooled_prompt_embeds", "denoised",
    ]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        "prompt_embeds": ("cond", "encoder_hidden_states"),
        "negative_prompt_embeds": ("uncond", "encoder_hidden_states"),
        "pooled_prompt_embeds": ("cond", "pooled_projections"),
        "negative_pooled_prompt_embeds": ("uncond", "pooled_projections"),
    }
    family = "sd3"
    flow_matching = True
    _denoiser_name: ClassVar[str] = "transformer"

    __init__ = classic_init("StableDiffusion3Pipeline")
    _init_components = register_components

    # ------------------------------------------------------------ family rules

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def size_multiple(self) -> int:
        return max(8, self.vae_scale_factor * self.transformer.config.patch_size)

    def min_size(self) -> int:
        return self.size_multiple()

    def check_family_inputs(self, args: dict[str, Any], kind: CallInputs) -> None:
        mu = args.pop("mu", None)
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu)):
            raise ValueError(f"mu must be None or a finite number, got {mu!r}")
        kind.mu = mu
        layers = args.pop("skip_guidance_layers", None)
        slg = {}
        if layers is not None:
            depth = self.transformer.config.num_layers
            if not isinstance(layers, (list, tuple)) or not layers or not all(
                isinstance(k, int) and not isinstance(k, bool) and 0 <= k < depth for k in layers
            ):
                raise ValueError(
                    f"skip_guidance_layers must be a non-empty list of layer indices in [0, {depth}), got {layers!r}"
                )
            scale = args.pop("skip_layer_guidance_scale", 2.8)
            start, stop = args.pop("skip_layer_guidance_start", 0.01), args.pop("skip_layer_guidance_stop", 0.2)
            for name, value in (("skip_layer_guidance_start", start), ("skip_layer_guidance_stop", stop)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                    raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
            slg = {"layers": list(layers), "layer_scale": check_guidance_scale(scale, "skip_layer_guidance_scale"),
                   "start": float(start), "stop": float(stop)}
        kind.skip_layer_guidance = slg

    def make_guidance(self, guidance_scale: float, guidance_rescale: float, kind: CallInputs | None = None) -> Guidance:
        slg = (kind or CallInputs()).skip_layer_guidance
        if slg:
            return SkipLayerGuidance(guidance_scale, **slg)
        return super().make_guidance(guidance_scale, guidance_rescale, kind)

    def scheduler_kwargs(self, height: int, width: int, kind: CallInputs | None = None) -> dict[str, Any]:
        mu = (kind or CallInputs()).mu
        if mu is not None:  # given by the caller: passed on as is
            return {"mu": mu}
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", None):
            return {}
        patch = self.transformer.config.patch_size
        seq_len = (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)
        mu = calculate_shift(  # resolution-dependent timestep shift (SD3.5 / Flux schedulers)
            seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16),
        )
        return {"mu": mu}

    # ----------------------------------------------------------------- encode

    def _clip(self, index: int, texts: list[str], device, clip_skip: int | None):
        tokenizer, encoder = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))[index]
        max_length = self.tokenizer.model_max_length if self.tokenizer is not None else 77
        out = encoder(tokenize(tokenizer, texts, max_length, _LOGGER).to(device), output_hidden_states=True)
        hidden = out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)]
        return hidden.to(dtype=self.text_encoder.dtype, device=device), out[0]

    def _t5(self, texts: list[str], device, max_sequence_length: int) -> torch.Tensor:
        if self.text_encoder_3 is None:
            dim = self.transformer.config.joint_attention_dim
            return torch.zeros((len(texts), max_sequence_length, dim), device=device, dtype=self.text_encoder.dtype)
        ids = tokenize(self.tokenizer_3, texts, max_sequence_length, _LOGGER,
                       reason=f"`max_sequence_length` is set to {max_sequence_length} tokens")
        return self.text_encoder_3(ids.to(device))[0].to(dtype=self.text_encoder_3.dtype, device=device)

    def _embed(self, texts, texts_2, texts_3, device, clip_skip, max_sequence_length):
        """(CLIP-L | CLIP-G hidden states padded to the T5 width, then T5 tokens; pooled CLIP-L | CLIP-G)."""
        hidden_1, pooled_1 = self._clip(0, texts, device, clip_skip)
        hidden_2, pooled_2 = self._clip(1, texts_2, device, clip_skip)
        clip = torch.cat([hidden_1, hidden_2], dim=-1)
        t5 = self._t5(texts_3, device, max_sequence_length)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([pooled_1, pooled_2], dim=-1)

    def encode(
        self, *, device, num_images_per_prompt, height, width, prompt, prompt_2, prompt_3, negative_prompt,
        negative_prompt_2, negative_prompt_3, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
        negative_pooled_prompt_embeds, clip_skip, max_sequence_length,
    ) -> Conditioning:
        if prompt_embeds is None and negative_prompt_embeds is None and clip_skip is None:
            # Prompts and negatives through each encoder in one call (negatives never use clip_skip).
            neg = negative_prompt if negative_prompt is not None else [""] * len(prompt)
            both, pooled = self._embed(
                prompt + neg, (prompt_2 or prompt) + (negative_prompt_2 or neg),
                (prompt_3 or prompt) + (negative_prompt_3 or neg), device, None, max_sequence_length,
            )
            prompt_embeds, negative_prompt_embeds = both.split(len(prompt))
            pooled_prompt_embeds, negative_pooled_prompt_embeds = pooled.split(len(prompt))
        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = self._embed(
                prompt, prompt_2 or prompt, prompt_3 or prompt, device, clip_skip, max_sequence_length
            )
        batch = prompt_embeds.shape[0]
        if negative_prompt_embeds is None:
            neg = negative_prompt if negative_prompt is not None else [""] * batch
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._embed(
                neg, negative_prompt_2 or neg, negative_prompt_3 or neg, device, None, max_sequence_length
            )
        n = num_images_per_prompt

        def rows(t: torch.Tensor) -> torch.Tensor:
            return repeat_rows(t.to(device), n)

        return Conditioning(
            cond={"encoder_hidden_states": rows(prompt_embeds), "pooled_projections": rows(pooled_prompt_embeds)},
            uncond={
                "encoder_hidden_states": rows(negative_prompt_embeds),
                "pooled_projections": rows(negative_pooled_prompt_embeds),
            },
        )

    def check_prompts(self, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        depth = min((e.config.num_hidden_layers for e in encoders), default=None)
        batch, kwargs = pop_prompts(
            args, extra=("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3"), pooled=True,
            max_clip_skip=None if depth is None else depth - 1,
        )
        msl = args.pop("max_sequence_length", 256)
        if isinstance(msl, bool) or not isinstance(msl, int) or not 1 <= msl <= 512:
            raise ValueError(f"max_sequence_length must be an int in [1, 512], got {msl!r}")
        kwargs["max_sequence_length"] = msl
        return batch, kwargs

    def model_kwargs(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"joint_attention_kwargs": args.pop("joint_attention_kwargs", None)}

    def predict(self, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict, run: Run):
        return self.transformer(
            hidden_states=self.extend_model_input(latent_input, conditioning),
            timestep=timestep.expand(latent_input.shape[0]),
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"],
            joint_attention_kwargs=run.model_kwargs["joint_attention_kwargs"], return_dict=False,
            skip_layers=conditioning.get("skip_layers"),
        )[0]

    def encode_prompt(
        self, prompt, prompt_2=None, prompt_3=None, device=None, num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True, negative_prompt=None, negative_prompt_2=None,
        negative_prompt_3=None, prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None, clip_skip: int | None = None,
        max_sequence_length: int = 256, lora_scale: float | None = None,
    ):
        """The classic signature and 4-tuple (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
        negative_pooled_prompt_embeds; the negatives None without CFG), through the pipeline's own encoding."""
        c = self._encode_classic(dict(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, clip_skip=clip_skip,
            max_sequence_length=max_sequence_length,
        ), device, num_images_per_prompt, lora_scale, None)
        cfg = do_classifier_free_guidance
        prompt_embeds, pooled_prompt_embeds = c.cond["encoder_hidden_states"], c.cond["pooled_projections"]
        negative_prompt_embeds = c.uncond["encoder_hidden_states"] if cfg else None
        negative_pooled_prompt_embeds = c.uncond["pooled_projections"] if cfg else None
        # The classic names (tools that map the outputs to __call__ arguments read them from this line).
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    __call__ = classic_call("StableDiffusion3Pipeline")
