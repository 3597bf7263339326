"""Flux: a flow-matching transformer over 2x2-packed latents, with CLIP (pooled) and T5 text encoders.

Two kinds of guidance, as in the classic pipeline: the guidance-distilled models (FLUX.1-dev) take
``guidance_scale`` as an input embedding (one value per row, ``guidance`` in the step payload), and true
classifier-free guidance (``true_cfg_scale`` > 1 with a ``negative_prompt``) runs unconditional rows. Here both
are per step: the distilled value follows ``pipeline.guidance_scale`` (``GuidanceScheduleCallback`` schedules it),
and true CFG is the run's classifier-free guidance (``FluxCFGCutoffCallback``, ``GuidanceIntervalCallback``,
``AdaptiveGuidanceCallback`` steer it; its unconditional rows are batched with the conditional ones, not run in a
second call). The loop's latents are packed, as the classic pipeline's: (B, h/2 * w/2, 4C).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor

from .._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.loaders import FluxIPAdapterMixin, FluxLoraLoaderMixin, FromSingleFileMixin
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ..guidance import Guidance
from ..loop import LoopState
from .base import StepDiffPipeline
from .checks import _check_int, pop_prompts, repeat_rows, tokenize
from .components import classic_init, register_components
from .conditioning import Conditioning
from .flux_ip_adapter import FluxIPAdapterFeature
from .flux_layout import (
    FluxGuidance,
    _routed_flux,
    check_true_cfg,
    classic_pack_latents,
    classic_unpack_latents,
    pack_latents,
    pack_run,
    unpack_given,
    unpack_latents,
)
from .run import CallInputs, Run, current_run, remembered
from .signatures import classic_call

__all__ = ["FluxGuidance", "FluxPipeline", "pack_latents", "unpack_latents"]

# The classic pipeline's logger: its warnings (a prompt cut at 77 CLIP / max_sequence_length T5 tokens, a size
# rounded down to a multiple of 16) follow diffusers' verbosity settings.
_LOGGER = diffusers_logging.get_logger("diffusers.pipelines.flux.pipeline_flux")


class FluxPipeline(StepDiffPipeline, FluxLoraLoaderMixin, FromSingleFileMixin, FluxIPAdapterMixin):
    """Text-to-image with Flux (FLUX.1-dev, -schnell and their fine-tunes), on stepdiff's shared denoising loop.

    ``denoised`` is the flow-matching x0 estimate (latents - sigma * velocity), packed like the latents;
    ``guidance`` the distilled guidance value per row (guidance-distilled transformers only). Previews unpack the
    latents themselves (``spatial_latents``). IP-Adapters load with the classic ``load_ip_adapter`` (see
    ``FluxIPAdapterFeature``).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->transformer->vae"
    _optional_components: ClassVar[list[str]] = ["image_encoder", "feature_extractor"]
    _callback_tensor_inputs: ClassVar[list[str]] = [
        "latents", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
        "negative_pooled_prompt_embeds", "guidance", "denoised",
    ]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        "prompt_embeds": ("cond", "encoder_hidden_states"),
        "negative_prompt_embeds": ("uncond", "encoder_hidden_states"),
        "pooled_prompt_embeds": ("cond", "pooled_projections"),
        "negative_pooled_prompt_embeds": ("uncond", "pooled_projections"),
        "guidance": ("cond", "guidance"),
    }
    family = "flux"
    features = (FluxIPAdapterFeature(),)
    flow_matching = True
    _denoiser_name: ClassVar[str] = "transformer"
    default_sample_size = 128

    # The classic Flux meanings: guidance_scale is the distilled guidance (the embedding), true_cfg_scale the CFG.
    guidance_scale = _routed_flux("guidance_scale", "Distilled guidance value of the current run; applies from the "
                                  "next step (guidance-distilled transformers only).")
    _guidance_scale = guidance_scale
    true_cfg_scale = _routed_flux("true_cfg_scale", "True CFG scale of the current run; applies from the next step.")
    joint_attention_kwargs = _routed_flux("joint_attention_kwargs", "The current run's joint_attention_kwargs.")
    _joint_attention_kwargs = joint_attention_kwargs
    current_timestep = _routed_flux("current_timestep", "The timestep of the current run's latest step.")

    __init__ = classic_init("FluxPipeline")
    _init_components = register_components

    # ------------------------------------------------------------ family rules

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def tokenizer_max_length(self) -> int:
        return self.tokenizer.model_max_length if getattr(self, "tokenizer", None) is not None else 77

    @property
    def image_processor(self) -> VaeImageProcessor:
        """Pre- and post-processing at multiples of twice the VAE factor (a packed token is 2x2 latents)."""
        proc = self.__dict__.get("_image_processor")
        if proc is None:
            proc = self.__dict__["_image_processor"] = VaeImageProcessor(
                vae_scale_factor=self.vae_scale_factor * 2, vae_latent_channels=self._vae_latent_channels()
            )
        return proc

    @image_processor.setter
    def image_processor(self, value: VaeImageProcessor) -> None:
        self.__dict__["_image_processor"] = value

    def denoiser_latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def denoiser_channels(self) -> int:
        """Latent channels the transformer takes per position (its in_channels are packed 2x2 patches)."""
        return self.transformer.config.in_channels // 4

    def default_size(self) -> int:
        return self.default_sample_size * self.vae_scale_factor

    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2

    def min_size(self) -> int:
        return self.size_multiple()

    def _check_size(self, name: str, value: object) -> int:
        # As the classic pipeline: a size that is not a multiple of 2x the VAE factor is rounded down, with its warning.
        value = _check_int(name, value, self.min_size())
        multiple = self.size_multiple()
        if value % multiple:
            _LOGGER.warning(f"`{name}` has to be divisible by {multiple} but is {value}. Dimensions will be resized "
                            f"accordingly (to {value - value % multiple})")
        return value - value % multiple

    def check_family_inputs(self, args: dict[str, Any], kind: CallInputs) -> None:
        check_true_cfg(args, kind)

    def make_guidance(self, guidance_scale: float, guidance_rescale: float, kind: CallInputs | None = None) -> Guidance:
        kind = kind or CallInputs()
        return FluxGuidance(kind.true_cfg_scale, guidance_scale, kind.negatives,
                            embeds=bool(self.transformer.config.guidance_embeds))

    def scheduler_kwargs(self, height: int, width: int, kind: CallInputs | None = None) -> dict[str, Any]:
        cfg = self.scheduler.config
        seq_len = (height // self.vae_scale_factor // 2) * (width // self.vae_scale_factor // 2)
        mu = calculate_shift(  # resolution-dependent shift, used by schedulers with use_dynamic_shifting
            seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15),
        )
        return {"mu": mu}

    def set_timesteps(self, run: Run, num_inference_steps: int | None, timesteps, sigmas, kind: CallInputs) -> torch.Tensor:
        # The classic pipeline's default: sigmas spaced evenly from 1 to 1/n (shifted by the scheduler).
        if run.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        elif sigmas is None and num_inference_steps is not None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return super().set_timesteps(run, num_inference_steps, timesteps, sigmas, kind)

    # ----------------------------------------------------------------- encode

    def _embed(self, texts: list[str], texts_2: list[str], device, max_sequence_length: int):
        """(T5 hidden states (B, max_sequence_length, 4096), CLIP pooled (B, 768))."""
        clip = self.text_encoder(tokenize(self.tokenizer, texts, self.tokenizer_max_length, _LOGGER).to(device),
                                 output_hidden_states=False)
        pooled = clip.pooler_output.to(dtype=self.text_encoder.dtype, device=device)
        ids = tokenize(self.tokenizer_2, texts_2, max_sequence_length, _LOGGER,
                       reason=f"`max_sequence_length` is set to {max_sequence_length} tokens")
        t5 = self.text_encoder_2(ids.to(device), output_hidden_states=False)[0]
        return t5.to(dtype=self.text_encoder_2.dtype, device=device), pooled

    def encode(
        self, *, device, num_images_per_prompt, height, width, prompt, prompt_2, negative_prompt, negative_prompt_2,
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip,
        max_sequence_length,
    ) -> Conditioning:
        negatives = negative_prompt is not None or negative_prompt_embeds is not None
        if prompt_embeds is None and negative_prompt is not None:
            # Prompts and negatives through each encoder in one call.
            both, pooled = self._embed(prompt + negative_prompt, (prompt_2 or prompt) + (negative_prompt_2 or negative_prompt),
                                       device, max_sequence_length)
            prompt_embeds, negative_prompt_embeds = both.split(len(prompt))
            pooled_prompt_embeds, negative_pooled_prompt_embeds = pooled.split(len(prompt))
        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = self._embed(prompt, prompt_2 or prompt, device, max_sequence_length)
        if negatives and negative_prompt_embeds is None:
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._embed(
                negative_prompt, negative_prompt_2 or negative_prompt, device, max_sequence_length)
        n = num_images_per_prompt

        def rows(t: torch.Tensor) -> torch.Tensor:
            return repeat_rows(t.to(device), n)

        cond = {"encoder_hidden_states": rows(prompt_embeds), "pooled_projections": rows(pooled_prompt_embeds)}
        uncond = {} if not negatives else {
            "encoder_hidden_states": rows(negative_prompt_embeds),
            "pooled_projections": rows(negative_pooled_prompt_embeds),
        }
        return Conditioning(cond=cond, uncond=uncond)

    def check_prompts(self, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        batch, kwargs = pop_prompts(args, extra=("prompt_2", "negative_prompt_2"), pooled=True)
        msl = args.pop("max_sequence_length", 512)
        if isinstance(msl, bool) or not isinstance(msl, int) or not 1 <= msl <= 512:
            raise ValueError(f"max_sequence_length must be an int in [1, 512], got {msl!r}")
        kwargs["max_sequence_length"] = msl
        return batch, kwargs

    def model_kwargs(self, args: dict[str, Any]) -> dict[str, Any]:
        kwargs = args.pop("joint_attention_kwargs", None)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"joint_attention_kwargs must be a dict or None, got {type(kwargs).__name__}")
        return {"joint_attention_kwargs": kwargs}

    # ------------------------------------------------------------ the packed layout

    @torch.no_grad()
    def prepare(self, args: dict[str, Any], scheduler: Any = None) -> Run:
        """The shared prepare (latents and a kind's tensors made as (B, C, h, w)), then Flux's layout: everything
        the loop steps on packed into tokens, the token positions and the guidance rows."""
        run = super().prepare(args, scheduler=scheduler)
        try:
            pack_run(self, run)
        except BaseException:
            run.compute.free()
            raise
        return run

    def initial_latents(self, run: Run, rows, height, width, dtype, device, generator, latents, kind) -> torch.Tensor:
        """Noise (B, C, h, w), or the caller's ``latents`` in the classic packed shape (B, h/2 * w/2, 4C)."""
        shape = (rows, self.latent_channels(), height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return unpack_given(latents, shape).to(device=device, dtype=dtype)

    def spatial_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents of the current run (B, N, 4C) or one row (N, 4C) -> (B, C, h, w) / (C, h, w), for previews
        (call it from a step callback, where the run is known)."""
        run = current_run(self)
        if run is None or run.extras.latent_size is None:
            raise RuntimeError("spatial_latents needs the current run: call it from a step callback")
        return unpack_latents(latents, *run.extras.latent_size)

    _pack_latents = staticmethod(classic_pack_latents)  # the classic helpers, kept for code that calls them
    _unpack_latents = staticmethod(classic_unpack_latents)

    # ----------------------------------------------------------------- steps

    @contextlib.contextmanager
    def model_call_context(self, run: Run) -> Iterator[None]:
        """The run is bound during its model calls, so hooks that ask the pipeline for ``current_timestep`` (the
        classic library's Pyramid Attention Broadcast and FasterCache) read this run's."""
        with super().model_call_context(run), run.bound():
            yield

    def predict(self, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict, run: Run):
        rows = latent_input.shape[0]
        run.extras.current_timestep = timestep
        # The classic cache hooks (First-Block-Cache, TaylorSeer, ...) keep one state per context: one per set of
        # conditioning sides batched in this call ("cond", "uncond+cond"), and one for extra passes.
        with self.transformer.cache_context("+".join(run.state.sides) or "extra"):
            return self._transformer_call(latent_input, timestep, conditioning, run, rows)

    def _transformer_call(self, latent_input, timestep, conditioning, run: Run, rows: int) -> torch.Tensor:
        joint_attention_kwargs = run.model_kwargs["joint_attention_kwargs"]
        ip = self.added_cond_extras(conditioning)
        if ip:  # a new dict per call: the transformer pops the embeddings from it
            joint_attention_kwargs = {**(joint_attention_kwargs or {}), **ip}
        return self.transformer(
            hidden_states=latent_input,
            timestep=timestep.expand(rows).to(latent_input.dtype) / 1000,
            guidance=conditioning.get("guidance"),
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            txt_ids=run.extras.txt_ids, img_ids=run.extras.img_ids,
            joint_attention_kwargs=joint_attention_kwargs, return_dict=False,
        )[0]

    def _state_tensor(self, state: LoopState, name: str) -> torch.Tensor | None:
        """None for a tensor this run does not have: the negatives without a negative prompt, ``guidance`` without a
        guidance embedding (the classic pipeline passes its None locals the same way)."""
        entry = self._callback_names.get(name)
        if entry is not None and entry[1] not in getattr(state, entry[0]):
            return None
        return super()._state_tensor(state, name)

    def _apply_callback_result(self, state: LoopState, result: object, step: int) -> None:
        if isinstance(result, dict):
            absent = [k for k, v in result.items() if v is not None and k in self._callback_names
                      and self._state_tensor(state, k) is None]
            if absent:
                raise ValueError(
                    f"callback_on_step_end returned {absent} at step {step}, which this run does not have (no negative "
                    "prompt, or a transformer without guidance_embeds); return them as None or leave them out")
        super()._apply_callback_result(state, result, step)
        if "guidance" in state.uncond and state.uncond["guidance"] is not state.cond["guidance"]:
            state.uncond["guidance"] = state.cond["guidance"]  # one guidance value per image, both sides

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        run = current_run(self)
        if run is None:
            raise RuntimeError("decode_latents needs the run's latent size (it runs inside finish)")
        return super().decode_latents(unpack_latents(latents, *run.extras.latent_size))

    @torch.no_grad()
    def finish(self, run: Run) -> Any:
        with run.bound():  # decode_latents unpacks with the run's latent size
            out = super().finish(run)
        remembered(self).update(guidance_scale=run.guidance.embedded, true_cfg_scale=run.guidance.scale,
                                joint_attention_kwargs=run.model_kwargs.get("joint_attention_kwargs"))
        return out

    # ------------------------------------------------------------ classic API

    def encode_prompt(
        self, prompt, prompt_2=None, device=None, num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512, lora_scale: float | None = None,
    ):
        """The classic signature and 3-tuple (prompt_embeds, pooled_prompt_embeds, text_ids), through the pipeline's
        own encoding."""
        c = self._encode_classic(dict(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
        ), device, num_images_per_prompt, lora_scale, None)
        prompt_embeds, pooled_prompt_embeds = c.cond["encoder_hidden_states"], c.cond["pooled_projections"]
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.transformer.dtype
        text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=prompt_embeds.device, dtype=dtype)
        # The classic names (tools that map the outputs to __call__ arguments read them from this line).
        return prompt_embeds, pooled_prompt_embeds, text_ids

    __call__ = classic_call("FluxPipeline")
