"""The engine every pipeline shares: prepare -> steps -> finish.

- ``prepare(...)`` checks every argument, sets the timesteps on the run's own scheduler copy,
  encodes the prompts and makes the initial latents, and returns a ``Run`` holding all of the
  call's state (``stepdiff.pipelines.run``);
- iterating the run executes the shared denoising loop (``stepdiff.loop``), with the callbacks
  between steps;
- ``finish(run)`` decodes and builds the record and the output (``pipelines/outputs.py``).

``__call__`` is those three; ``steps(...)`` returns the run for callers who drive the loop.

A family subclass (SD, SDXL, SD3, Flux) supplies only what differs: ``check_prompts`` (its prompt
arguments), ``encode`` (prompts -> conditional and unconditional conditioning, kept apart),
``predict`` (one model call), ``_callback_names`` (which callback tensor is which conditioning
tensor) and ``flow_matching``. A pipeline class holds its kind of run and its features as objects
(``kind = InpaintKind()``, ``features = (IPAdapterFeature(), ControlNetFeature())``); ``prepare`` calls their
hooks in the fixed order ``pipelines/parts.py`` documents.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor

from .._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from ..guidance import ClassifierFreeGuidance, DistilledGuidance, Guidance, check_guidance_scale
from ..loop import LoopState
from ..vae import decode_latents as decode_with_vae
from .callback_io import apply_callback_result, run_step_callback, state_tensor
from .checkpoints import load_single_file
from .checks import _check_int, _check_latents, bind_arguments, call_arguments
from .classic import routed, set_guidance, set_interrupt
from .conditioning import Conditioning, guidance_embedding, text_lora_scale
from .folders import _refuse_pickle, check_folder, load_pretrained
from .outputs import finish_run
from .parts import MISSING, Kind, Part, TextToImageKind, entered
from .prepare import prepare_run
from .registry import REGISTRY
from .run import CallInputs, Run, current_run, remembered

__all__ = ["Conditioning", "StepDiffPipeline", "check_folder", "decode_with_vae", "remembered"]


class StepDiffPipeline(DiffusionPipeline):
    """Shared engine of every stepdiff pipeline (see the module docstring)."""

    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "denoised"]
    # callback tensor name -> ("cond" | "uncond", conditioning key)
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {}
    family: ClassVar[str] = ""  # the registry's family of this class ("sd", "sdxl", "sd3")
    flow_matching: ClassVar[bool] = False  # rectified-flow latents and x0 estimate (SD3), declared, not guessed
    _optional_components: ClassVar[list[str]] = []
    # Run each model call under torch.inference_mode (see stepdiff.loop.denoise); False: plain no_grad.
    inference_mode_model_calls: bool = True
    # Stop with a clear error when the model output or the latents turn NaN/inf (instead of a black image).
    check_finite: bool = True
    kind: ClassVar[Kind] = TextToImageKind()  # the kind of run (pipelines/kinds.py)
    features: ClassVar[tuple[Part, ...]] = ()  # ControlNet, IP-Adapter (their hooks run before the kind's)
    _denoiser_name: ClassVar[str] = "unet"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """The classic attributes a class's kind and features stand for (``mask_processor``, ...), on the class."""
        super().__init_subclass__(**kwargs)
        for part in (cls.kind, *cls.features):
            for name, value in part.pipeline_attributes().items():
                if name not in cls.__dict__:
                    setattr(cls, name, value)

    @classmethod
    def parts(cls) -> tuple[Part, ...]:
        """The features, then the kind: the order ``prepare`` calls their hooks in."""
        return (*cls.features, cls.kind)

    # Per-call state lives on the run; these classic names reach it from inside a callback.
    _interrupt = routed("interrupt", "Stop flag of the current run (classic: set True in a callback).", set_interrupt,
                         default=False)
    _guidance_scale = routed("guidance_scale", "Guidance scale of the current run; applies from the next step.",
                              set_guidance, default=1.0, check=check_guidance_scale)
    guidance_scale = routed("guidance_scale", "Guidance scale of the current run; applies from the next step.",
                             set_guidance, default=1.0, check=check_guidance_scale)
    _guidance_rescale = routed("guidance_rescale", "Guidance rescale of the current run.", default=0.0)
    guidance_rescale = routed("guidance_rescale", "Guidance rescale of the current run.", default=0.0)
    _num_timesteps = routed("num_timesteps", "Number of steps of the current run.", default=0)
    num_timesteps = routed("num_timesteps", "Number of steps of the current run.", default=0)
    timesteps = routed("timesteps", "The current run's timesteps (as its scheduler set them).")
    interrupt = routed("interrupt", "Whether the current run was asked to stop.", default=False)
    do_classifier_free_guidance = routed(
        "do_classifier_free_guidance", "Whether the current run computes unconditional rows this step.", default=False
    )

    @property
    def current_run(self) -> Run | None:
        """The run whose callback is executing in this thread (None outside callbacks)."""
        return current_run(self)

    def stop(self, reason: str = "stopped by callback") -> None:
        """Stop the current run before its next model call (from a callback); ``_interrupt = True`` also works.

        The image is what ``interrupt_output`` says (by default the last x0 estimate; ``"finish"``: a few more
        steps down to t = 0); ``output.stop_reason`` says why the run ended. To stop a run from another thread,
        pass it a ``CancelToken``.
        """
        run = current_run(self)
        if run is None:
            raise RuntimeError(
                "pipeline.stop() works inside a step callback; to stop a run from another thread pass "
                "cancel=CancelToken() to the call and call token.cancel()"
            )
        run.stop(reason)

    # ---------------------------------------------------------------- loading

    @classmethod
    def _family_class_names(cls) -> tuple[str, ...]:
        return tuple(e.name for e in REGISTRY if e.family == cls.family)

    @classmethod
    def _check_folder(cls, path: str | os.PathLike) -> str | None:
        return check_folder(path)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | os.PathLike, *, allow_pickle: bool = False, **kwargs: Any
    ):
        """Load a local folder in the standard layout (the same path real SD/SDXL/SD3 weights use).

        A folder of the same family loads into any of its kinds (an SD text-to-image folder into
        ``StableDiffusionImg2ImgPipeline``, ...). Only safetensors weights load by default: pickle
        checkpoints (``.bin``) can run code when loaded, so a folder with only those is refused unless you
        pass ``allow_pickle=True`` for files you trust. Truncated or corrupt weight files are reported
        before anything loads.
        """
        return load_pretrained(cls, pretrained_model_name_or_path, allow_pickle, kwargs, super().from_pretrained)

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | os.PathLike, *, allow_pickle: bool = False,
                         **kwargs: Any):
        """diffusers' ``FromSingleFileMixin.from_single_file`` with ``from_pretrained``'s pickle rule (only
        ``.safetensors`` and ``.gguf`` files unless ``allow_pickle=True``), offline configs for local SD 1.x/2.x,
        SDXL and SD3 files (``stepdiff.single_file``), float32 and eval mode; see ``folders.load_single_file``."""
        load = super().from_single_file  # type: ignore[misc]
        return load_single_file(cls, pretrained_model_link_or_path, allow_pickle, kwargs, load)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          *args: Any, allow_pickle: bool = False, **kwargs: Any) -> None:
        """diffusers' ``load_lora_weights`` (the family's LoRA loader mixin), with ``from_pretrained``'s pickle
        rule: only safetensors LoRA files load unless ``allow_pickle=True``."""
        _refuse_pickle([pretrained_model_name_or_path_or_dict], kwargs, allow_pickle, "load_lora_weights")
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name, *args, **kwargs)  # type: ignore[misc]

    def load_textual_inversion(self, pretrained_model_name_or_path, *args: Any, allow_pickle: bool = False,
                               **kwargs: Any) -> None:
        """diffusers' ``load_textual_inversion``, with ``from_pretrained``'s pickle rule: only safetensors
        embeddings (or tensors and dicts in memory) load unless ``allow_pickle=True``."""
        sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) else [
            pretrained_model_name_or_path]
        _refuse_pickle(sources, kwargs, allow_pickle, "load_textual_inversion")
        super().load_textual_inversion(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------ properties

    def model_calls_in_inference_mode(self) -> bool:
        """Model calls run under ``torch.inference_mode`` unless turned off or unsafe: accelerate's offload hooks move
        weights inside the model call, and weights made in inference mode cannot be edited in place afterwards."""
        if not self.inference_mode_model_calls:
            return False
        return not any(hasattr(m, "_hf_hook") for m in self.denoiser.modules())

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        if vae is None:  # a pipeline built without its VAE (text encoders only): the classic pipelines' 8
            return 8
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def _vae_latent_channels(self) -> int:
        vae = getattr(self, "vae", None)
        return 4 if vae is None else vae.config.latent_channels

    @property
    def image_processor(self) -> VaeImageProcessor:
        """Pre- and post-processing of images (made on first use; assignable, as the classic attribute)."""
        proc = self.__dict__.get("_image_processor")
        if proc is None:
            proc = self.__dict__["_image_processor"] = VaeImageProcessor(
                vae_scale_factor=self.vae_scale_factor, vae_latent_channels=self._vae_latent_channels()
            )
        return proc

    @image_processor.setter
    def image_processor(self, value: VaeImageProcessor) -> None:
        self.__dict__["_image_processor"] = value

    def default_size(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale_factor

    # ----------------------------------------------------- family interface

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def check_prompts(self, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Pop and check the family's prompt arguments: (batch size, keyword arguments for ``encode``)."""
        raise NotImplementedError

    def encode(self, **kwargs: Any) -> Conditioning:
        raise NotImplementedError

    def predict(self, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict, run: Run):
        raise NotImplementedError

    def model_kwargs(self, args: dict[str, Any]) -> dict[str, Any]:
        """Pop per-call model arguments (``cross_attention_kwargs``, ...) into the run."""
        return {}

    def make_guidance(self, guidance_scale: float, guidance_rescale: float, kind: CallInputs | None = None) -> Guidance:
        if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
            return DistilledGuidance(guidance_scale)  # LCM and other guidance-distilled UNets
        return ClassifierFreeGuidance(guidance_scale, guidance_rescale)

    def _encode_classic(
        self, args: dict[str, Any], device, num_images_per_prompt: int, lora_scale: float | None, size: int | None = None,
    ) -> Conditioning:
        """A family's classic ``encode_prompt``: its own prompt checks and encoding, ``lora_scale`` on the encoders."""
        _, kwargs = self.check_prompts(args)
        with text_lora_scale(self, {} if lora_scale is None else {"cross_attention_kwargs": {"scale": lora_scale}}):
            return self.encode(device=device or self._execution_device, num_images_per_prompt=num_images_per_prompt,
                               height=size, width=size, **kwargs)

    def add_model_conditioning(self, run: Run, dtype: torch.dtype, device: torch.device) -> None:
        """Guidance-distilled UNets take the scale as an embedding (``timestep_cond``), made once per run
        from the starting scale, as the classic pipelines do."""
        dim = getattr(self.denoiser.config, "time_cond_proj_dim", None)
        if dim is not None:
            embedding = guidance_embedding(self, run.guidance.scale, run.state.latents.shape[0], dim, dtype, device)
            run.state.cond["timestep_cond"] = run.state.uncond["timestep_cond"] = embedding

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_with_vae(self.vae, latents)

    def denoiser_latent_channels(self) -> int:
        """The latent channels the family's denoiser works in (Flux: its packed channels / 4)."""
        return self.denoiser.config.in_channels

    def latent_channels(self) -> int:
        channels = self.kind.latent_channels(self)  # inpainting: the VAE's
        return self.denoiser_latent_channels() if channels is None else channels

    def denoiser_channels(self) -> int:
        """Input channels of the denoiser per latent position (Flux: its tokens are 2x2 patches)."""
        return self.denoiser.config.in_channels

    # ------------------------------------------------ the kind and the features

    def check_family_inputs(self, args: dict[str, Any], call: CallInputs) -> None:
        """Pop and check the family's own per-call arguments besides prompts (SD3: ``mu``; SDXL: ``denoising_end``)."""

    def truncate_end(self, run: Run, steps: torch.Tensor, call: CallInputs) -> torch.Tensor:
        """Where the run ends in the schedule (SDXL: ``denoising_end``)."""
        return steps

    def set_timesteps(self, run: Run, num_inference_steps: int | None, timesteps, sigmas, call: CallInputs) -> torch.Tensor:
        """Set the run's scheduler and return the timesteps the loop will run."""
        steps, num_inference_steps = retrieve_timesteps(
            run.scheduler, num_inference_steps, call.device, timesteps=timesteps, sigmas=sigmas,
            **self.scheduler_kwargs(call.height, call.width, call),
        )
        steps = self.kind.truncate_start(self, run, steps, num_inference_steps, call)
        for part in self.features:
            part.schedule(self, run, steps, call)
        return self.truncate_end(run, steps, call)

    def extend_model_input(self, latent_input: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """Extra input channels the kind adds (9-channel inpainting UNets: mask and masked-image latents)."""
        return self.kind.extend_model_input(self, latent_input, conditioning)

    def added_cond_extras(self, conditioning: dict) -> dict[str, Any]:
        """Extra ``added_cond_kwargs`` of the denoiser from the rows of this call (IP-Adapter image embeddings)."""
        return {k: v for part in self.features for k, v in part.added_cond(self, conditioning).items()}

    def unet_extras(self, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict, run: Run) -> dict:
        """Extra denoiser keyword arguments for this model call, computed from its rows (ControlNet residuals)."""
        return {k: v for part in self.features
                for k, v in part.model_extras(self, latent_input, timestep, conditioning, run).items()}

    def model_call_context(self, run: Run) -> contextlib.AbstractContextManager:
        """Held around every model call of ``run`` (IP-Adapter: the run's scales in the attention processors)."""
        return entered([part.model_call_context(self, run) for part in self.features])

    def initial_latents(
        self, run: Run, rows: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None, latents: torch.Tensor | None, call: CallInputs,
    ) -> torch.Tensor:
        """Text-to-image: scaled noise, or the caller's ``latents``."""
        shape = (rows, self.latent_channels(), height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = _check_latents(latents, shape).to(device=device, dtype=dtype)
        # Never in place: the caller keeps its tensor. Flow-matching schedulers start from plain noise.
        return latents * getattr(run.scheduler, "init_noise_sigma", 1.0)

    def denoised_for_output(self, run: Run, denoised: torch.Tensor) -> torch.Tensor:
        """The x0 estimate an interrupted run decodes (inpainting puts the known region back)."""
        return denoised

    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return max(8, self.vae_scale_factor)

    def min_size(self) -> int:
        """The smallest size whose latents survive every down-sampling of the denoiser."""
        return max(8, self.vae_scale_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1))

    def scheduler_kwargs(self, height: int, width: int, kind: CallInputs | None = None) -> dict[str, Any]:
        """Extra ``set_timesteps`` arguments a family needs (SD3: the resolution-dependent shift ``mu``)."""
        return {}

    def _check_size(self, name: str, value: object) -> int:
        value = _check_int(name, value, self.min_size())
        multiple = self.size_multiple()
        if value % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")
        return value

    # --------------------------------------------------------------- callbacks

    def _state_tensor(self, state: LoopState, name: str) -> torch.Tensor:
        for part in self.features:
            value = part.callback_tensor(self, state, name)
            if value is not MISSING:
                return value
        return state_tensor(self, state, name)

    def _apply_callback_result(self, state: LoopState, result: object, step: int) -> None:
        for part in self.features:
            result = part.apply_callback_result(self, state, result, step)
        apply_callback_result(self, state, result, step)

    def run_step_callback(self, run: Run, fn: Any, state: LoopState, names: list[str]) -> None:
        """Call a step callback with the tensors it asked for (``names``) and apply what it returns to the step; an
        error it raises is told where (step and timestep). Called by the run after each step."""
        run_step_callback(self, run, fn, state, names)

    # ------------------------------------------------------------ the call

    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """``steps(*args, **kwargs)`` bound to this class's ``__call__`` signature, defaults applied."""
        return bind_arguments(self, args, kwargs)

    def steps(self, *args: Any, scheduler: Any = None, **kwargs: Any) -> Run:
        """Prepare a run with ``__call__``'s arguments, for callers who drive the loop themselves.

        ``scheduler``: a scheduler for this run only (a copy of it is stepped); the pipeline's own is left alone,
        so threads sharing the pipeline can each run their own (``run.run()`` finishes it as ``__call__`` does).

        ``for state in run`` executes one step per iteration (callbacks included) and yields the loop
        state (``latents``, ``denoised``, ``step_index``, ``timestep``, counters); ``run.finish()``
        decodes and returns exactly what ``__call__`` would have. Breaking out early and calling
        ``finish()`` gives the clean image of the last step reached.
        """
        return self.prepare(self._arguments(args, kwargs), scheduler=scheduler)

    def _call(self, arguments: dict[str, Any]) -> Any:
        """What every ``__call__`` does with its arguments: prepare, run every step, finish."""
        return self.prepare(call_arguments(arguments)).run()

    @torch.no_grad()
    def prepare(self, args: dict[str, Any], scheduler: Any = None) -> Run:
        """Check everything, set the timesteps, encode, make the initial latents: a ``Run`` ready to step. The
        family, the features and the kind are asked in the order ``pipelines/parts.py`` documents
        (``pipelines/prepare.py``)."""
        return prepare_run(self, args, scheduler)

    def embedding_width(self) -> int | None:
        """The width the denoiser's cross-attention takes (what ``prompt_embeds`` must have)."""
        cfg = self.denoiser.config
        width = getattr(cfg, "joint_attention_dim", None) or getattr(cfg, "cross_attention_dim", None)
        return width if isinstance(width, int) else None

    @torch.no_grad()
    def finish(self, run: Run) -> Any:
        """Decode (for an interrupted run: what ``interrupt_output`` says), build the record, return the output."""
        out = finish_run(self, run)
        for part in self.features:
            part.finish(self, run)
        return out
