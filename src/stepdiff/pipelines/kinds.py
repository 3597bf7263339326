"""Kinds of run beyond text-to-image: image-to-image and inpainting, as objects a pipeline class holds.

A kind changes only the start of a run (where the timesteps begin, what the first latents are) and,
for inpainting, what happens after each step (the known region is put back) and what an interrupted
run shows. The loop, the guidance, the callbacks and the output are the family's, unchanged.
``StableDiffusionImg2ImgPipeline`` is ``StableDiffusionPipeline`` with ``kind = Image2ImageKind()``, and so on
(the hooks and their order: ``pipelines/parts.py``). Family differences are parameters of the kind object:
the size taken from the image or from height/width, SDXL's ``denoising_start`` (``refiner=True``), Flux's
packed ``latents`` (``given_latents=True``); the flow-matching start index follows ``pipe.flow_matching``.

Where the classic pipelines' image handling has an order (VAE sampling, then noise, then the
masked image), it is kept, so that the same generator gives the same images.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..vae import encode_images
from .checks import check_fraction
from .images import _check_count, _check_image, _image_size, _is_latents, _preprocess, _repeat_to, check_strength
from .parts import Kind, marker
from .run import CallInputs, Run

__all__ = ["INPAINT_CALLBACK_NAMES", "Image2ImageKind", "Image2ImageRun", "InpaintKind", "InpaintRun", "check_strength"]


class Image2ImageKind(Kind):
    """Start from an image: its latents noised to the timestep that ``strength`` picks, then the usual steps.

    ``size_from_image``: the classic SD/SDXL img2img pipelines keep the image's size (SD3, Flux: height/width).
    ``repeat_image_for_generators``: with one generator per row, the classic img2img pipelines repeat the image to
    the batch before encoding it (each row's posterior sample from its own generator); the inpainting ones and
    Flux encode the image as given (the first generators only) and repeat the latents.
    ``refiner``: SDXL's ``denoising_start`` (continue a base run's latents). ``given_latents``: the caller's
    ``latents`` are the start, used as they are (Flux).
    """

    name: ClassVar[str] = "image2image"
    takes_image: ClassVar[bool] = True

    def __init__(self, size_from_image: bool = True, repeat_image_for_generators: bool = True, refiner: bool = False,
                 given_latents: bool = False) -> None:
        self.size_from_image = size_from_image
        self.repeat_image_for_generators = repeat_image_for_generators
        self.refiner = refiner
        self.given_latents = given_latents

    def pipeline_attributes(self) -> dict[str, Any]:
        return {"repeat_image_for_generators": self.repeat_image_for_generators}

    def check_inputs(self, pipe: Any, args: dict[str, Any], call: CallInputs) -> None:
        call.strength = check_strength(args.pop("strength", 0.8))
        image = args.pop("image", None)
        _check_image("image", image)
        call.image_arg = image
        if self.size_from_image:
            if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == pipe.latent_channels():
                call.image = image  # latents given directly
                call.height, call.width = (s * pipe.vae_scale_factor for s in image.shape[-2:])
            else:
                call.image = _preprocess(pipe.image_processor, "image", image)
                call.height, call.width = call.image.shape[-2:]
        if self.refiner:
            call.denoising_start = check_fraction("denoising_start", args.pop("denoising_start", None))
            call.add_noise = call.denoising_start is None

    def check_rows(self, pipe: Any, call: CallInputs, rows: int, batch_size: int, per_prompt: int) -> None:
        if call.image is None:
            call.image = _preprocess(pipe.image_processor, "image", call.image_arg, height=call.height, width=call.width)
        _check_count("image", "image", call.image.shape[0], rows, batch_size, per_prompt)

    @staticmethod
    def start_index(pipe: Any, num_inference_steps: int, strength: float) -> int:
        if pipe.flow_matching:  # the classic SD3 and Flux pipelines do not round num_inference_steps * strength down
            return int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        return max(num_inference_steps - init_timestep, 0)

    def truncate_start(self, pipe: Any, run: Run, steps: torch.Tensor, num_inference_steps: int,
                       call: CallInputs) -> torch.Tensor:
        if call.denoising_start is not None:
            return _refiner_start(run.scheduler, call.denoising_start)
        scheduler = run.scheduler
        start = self.start_index(pipe, num_inference_steps, call.strength)
        t_start = start * scheduler.order
        steps = scheduler.timesteps[t_start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
        # Counted in steps, not timesteps: PNDM's schedule has one timestep more than it has steps, which would
        # leave a lone timestep to run at a strength that leaves 0 steps (the classic pipelines raise there).
        if len(steps) == 0 or num_inference_steps - start < 1:
            raise ValueError(
                f"strength={call.strength} leaves no denoising step at num_inference_steps={num_inference_steps}; "
                "raise strength or num_inference_steps"
            )
        return steps

    def image_latents(self, pipe: Any, call: CallInputs, rows: int, dtype, device, generator) -> torch.Tensor:
        image = call.image
        if image is None:
            image = call.image = _preprocess(
                pipe.image_processor, "image", call.image_arg, height=call.height, width=call.width
            )
        image = image.to(device=device, dtype=dtype)
        if image.shape[1] == pipe.latent_channels():
            latents = image
        else:
            if isinstance(generator, list) and image.shape[0] < rows and self.repeat_image_for_generators:
                image = _repeat_to(image, rows, "image")
            latents = encode_images(pipe.vae, image, generator)
        return _repeat_to(latents, rows, "image")

    def initial_latents(self, pipe: Any, run: Run, rows: int, height: int, width: int, dtype, device, generator,
                        latents: torch.Tensor | None, call: CallInputs) -> torch.Tensor:
        if self.given_latents and latents is not None:  # the caller's start latents, used as they are
            return pipe.initial_latents(run, rows, height, width, dtype, device, generator, latents, call)
        init = self.image_latents(pipe, call, rows, dtype, device, generator)
        if not call.add_noise:  # a refiner run taking over a base run's latents (denoising_start)
            return init
        noise = randn_tensor(init.shape, generator=generator, device=device, dtype=dtype)
        return noise_to(pipe, run, init, noise, run.timesteps[:1].repeat(rows))


def noise_to(pipe: Any, run: Run, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor,
             scheduler: Any = None) -> torch.Tensor:
    scheduler = run.scheduler if scheduler is None else scheduler
    if pipe.flow_matching:
        return scheduler.scale_noise(latents, timestep, noise)
    return scheduler.add_noise(latents, noise, timestep)


def _refiner_start(scheduler: Any, start: float) -> torch.Tensor:
    """SDXL's ``denoising_start``: the steps below the cut, as the classic pipeline."""
    train = scheduler.config.num_train_timesteps
    cutoff = round(train - start * train)
    n = int((scheduler.timesteps < cutoff).sum())
    if scheduler.order == 2 and n % 2 == 0:  # keep second-order schedulers on a whole step
        n += 1
    t_start = len(scheduler.timesteps) - n
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return scheduler.timesteps[t_start:]


# The inpainting tensors a step callback can ask for, and where each lives in the run (per-row conditioning).
INPAINT_CALLBACK_NAMES: dict[str, tuple[str, str]] = {
    "mask": ("cond", "mask"), "masked_image_latents": ("cond", "masked_image_latents"),
}


class InpaintKind(Image2ImageKind):
    """Repaint the white part of ``mask_image``; the black part keeps ``image``.

    9-channel inpainting UNets see the mask and the masked image's latents as extra input channels
    (per-row conditioning, so they follow every guidance decision); ordinary 4-channel UNets get the
    known region put back, noised to the next timestep, after every step. Either way the x0 estimate
    (``denoised``, and the image of an interrupted run) keeps the unmasked area of ``image``.
    The classic inpainting pipelines resize the image to height/width and encode it as given.
    """

    name: ClassVar[str] = "inpaint"

    def __init__(self, refiner: bool = False) -> None:
        super().__init__(size_from_image=False, repeat_image_for_generators=False, refiner=refiner)

    def pipeline_attributes(self) -> dict[str, Any]:
        return {**super().pipeline_attributes(), "mask_processor": _mask_processor_property(),
                "takes_mask_channels": takes_mask_channels, "_encode_vae_image": _encode_vae_image}

    def latent_channels(self, pipe: Any) -> int:
        return pipe.vae.config.latent_channels

    def check_inputs(self, pipe: Any, args: dict[str, Any], call: CallInputs) -> None:
        super().check_inputs(pipe, args, call)
        mask = args.pop("mask_image", None)
        if mask is None:
            raise ValueError("mask_image is required for inpainting: white repaints, black keeps the image")
        _check_image("mask_image", mask)
        image, f = call.image_arg, pipe.vae_scale_factor
        image_size, mask_size = _image_size(image), _image_size(mask)
        call.masked_image_latents = args.pop("masked_image_latents", None)
        if _is_latents(image, pipe.latent_channels()):  # the image's latents: its picture is f times their size
            image_size = tuple(s * f for s in image.shape[-2:])
            if call.masked_image_latents is None and takes_mask_channels(pipe):
                raise ValueError(
                    f"image is given as latents (shape {tuple(image.shape)}), so pass masked_image_latents too: this "
                    "inpainting model takes the masked image's latents, which cannot be made from latents"
                )
            # Latents cannot be resized: the picture is their size unless height and width say otherwise (checked).
            call.height, call.width = image_size
            for dim, value in (("height", args.get("height")), ("width", args.get("width"))):
                if value is not None and value != getattr(call, dim):
                    raise ValueError(
                        f"image is given as latents of a {image_size[1]}x{image_size[0]} picture (width x height) but "
                        f"{dim}={value!r}; latents cannot be resized: leave {dim} out or encode a picture of that size"
                    )
        if image_size is not None and mask_size is not None and image_size != mask_size:
            raise ValueError(
                f"mask_image is {mask_size[1]}x{mask_size[0]} but image is {image_size[1]}x{image_size[0]} (width x height); "
                "they must be the same size"
            )
        call.mask_arg = mask
        if args.pop("padding_mask_crop", None) is not None:
            raise NotImplementedError("padding_mask_crop is not supported by stepdiff's inpainting pipelines yet")
        channels, latent = pipe.denoiser_channels(), pipe.latent_channels()
        if channels not in (latent, 2 * latent + 1):
            raise ValueError(
                f"inpainting needs a denoiser with {latent} input channels (the VAE's latent channels) or {2 * latent + 1} "
                f"(an inpainting model: latents, mask and masked image); this {type(pipe.denoiser).__name__} has {channels}"
            )

    def check_rows(self, pipe: Any, call: CallInputs, rows: int, batch_size: int, per_prompt: int) -> None:
        height, width = call.height, call.width
        # As the classic pipelines: the image and the mask resized to the call's size (latents are kept as given).
        call.image = _preprocess(
            pipe.image_processor, "image", call.image_arg, height=height, width=width
        ).to(dtype=torch.float32)
        super().check_rows(pipe, call, rows, batch_size, per_prompt)
        call.mask = _preprocess(pipe.mask_processor, "mask_image", call.mask_arg, height=height, width=width)
        _check_count("mask_image", "mask", call.mask.shape[0], rows, batch_size, per_prompt)
        masked = call.masked_image_latents
        if masked is not None:
            if not isinstance(masked, torch.Tensor) or masked.ndim != 4:
                raise TypeError(
                    "masked_image_latents must be a 4-D tensor (batch, channels, height, width), got "
                    + (f"shape {tuple(masked.shape)}" if isinstance(masked, torch.Tensor) else type(masked).__name__)
                )
            _check_count("masked_image_latents", "latent", masked.shape[0], rows, batch_size, per_prompt)

    def initial_latents(self, pipe: Any, run: Run, rows: int, height: int, width: int, dtype, device, generator,
                        latents: torch.Tensor | None, call: CallInputs) -> torch.Tensor:
        # As the classic pipeline: image latents (models without mask channels, or strength < 1), then noise, then
        # the mask.
        strength_max = call.strength == 1.0
        refiner = not call.add_noise  # SDXL's denoising_start: continue a base run's latents as they are
        image_latents = None
        if refiner or not takes_mask_channels(pipe) or (latents is None and not strength_max):
            image_latents = self.image_latents(pipe, call, rows, dtype, device, generator)
        shape = (rows, pipe.latent_channels(), height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        init_sigma = getattr(run.scheduler, "init_noise_sigma", 1.0)  # flow matching (SD3) starts from plain noise
        if refiner:  # as the classic pipeline: noise drawn (for the known region), the image's latents kept as given
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            start = image_latents
        elif latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if strength_max:
                start = noise * init_sigma
            else:
                start = noise_to(pipe, run, image_latents, noise, run.timesteps[:1].repeat(rows))
        else:
            noise = latents.to(device)
            start = noise * init_sigma
        if image_latents is None:  # for the clean x0 estimate only: the posterior mode, no randomness used
            image = call.image.to(device=device, dtype=dtype)
            if image.shape[1] != pipe.latent_channels():
                image = encode_images(pipe.vae, image, sample=False)
            image_latents = _repeat_to(image, rows, "image")
        call.noise, call.image_latents = noise, image_latents
        return start

    def add_conditioning(self, pipe: Any, run: Run, call: CallInputs, dtype, device, generator) -> None:
        rows = run.state.latents.shape[0]
        height, width, f = call.height, call.width, pipe.vae_scale_factor
        mask = call.mask
        masked = call.masked_image_latents
        from_latents = masked is None and call.image.shape[1] == pipe.latent_channels()
        if masked is None and not from_latents:
            masked = call.image * (mask < 0.5)
        mask = torch.nn.functional.interpolate(mask, size=(height // f, width // f))
        mask = _repeat_to(mask.to(device=device, dtype=dtype), rows, "mask_image")
        if from_latents:  # image given as latents (a model without mask channels): for callbacks only, never read
            masked = call.image_latents * (mask < 0.5)
        masked = masked.to(device=device, dtype=dtype)
        masked_latents = masked if masked.shape[1] == pipe.latent_channels() else encode_images(pipe.vae, masked, generator)
        masked_latents = _repeat_to(masked_latents, rows, "image").to(device=device, dtype=dtype)
        for side in (run.state.cond, run.state.uncond):
            side["mask"], side["masked_image_latents"] = mask, masked_latents
        run.extras.noise, run.extras.image_latents = call.noise, call.image_latents.to(dtype)
        run.after_step = lambda state: _keep_known_region(pipe, run, state)

    def extend_model_input(self, pipe: Any, latent_input: torch.Tensor, conditioning: dict) -> torch.Tensor:
        if takes_mask_channels(pipe):
            return torch.cat([latent_input, conditioning["mask"], conditioning["masked_image_latents"]], dim=1)
        return latent_input


def takes_mask_channels(pipe: Any) -> bool:
    """An inpainting denoiser (SD's 9-channel UNets, SD3's 33-channel transformers): latents, mask and masked-image
    latents as input channels. Otherwise (as many input channels as latent channels) the known region is put back
    after every step."""
    return pipe.denoiser_channels() == 2 * pipe.latent_channels() + 1


def _encode_vae_image(pipe: Any, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None):
    """Images in [-1, 1] -> scaled latents sampled with ``generator`` (one per row when a list): the classic
    inpainting pipelines' private helper, kept for code that calls it."""
    return encode_images(pipe.vae, image, generator)


def _mask_processor_property() -> property:
    def get(pipe: Any) -> VaeImageProcessor:
        """Pre-processing of ``mask_image`` (made on first use; assignable, as the classic attribute)."""
        proc = pipe.__dict__.get("_mask_processor")
        if proc is None:
            proc = pipe.__dict__["_mask_processor"] = VaeImageProcessor(
                vae_scale_factor=pipe.vae_scale_factor, vae_latent_channels=pipe._vae_latent_channels(),
                do_normalize=False, do_binarize=True, do_convert_grayscale=True,
            )
        return proc

    def set_(pipe: Any, value: VaeImageProcessor) -> None:
        pipe.__dict__["_mask_processor"] = value

    return property(get, set_, doc=get.__doc__)


def _keep_known_region(pipe: Any, run: Run, state) -> None:
    mask, known = state.cond["mask"], run.extras.image_latents
    if not takes_mask_channels(pipe):
        proper = known
        i = state.step_index
        scheduler, timesteps = run.schedule  # the finishing steps' own while they run
        if i < len(timesteps) - 1:
            proper = noise_to(pipe, run, known, run.extras.noise, torch.tensor([timesteps[i + 1]]), scheduler)
        state.latents = (1 - mask) * proper + mask * state.latents
    state.denoised = (1 - mask) * known + mask * state.denoised


# The former mixins' names: ``issubclass(cls, InpaintRun)`` holds for a pipeline class of that kind.
Image2ImageRun = marker("Image2ImageRun", "A pipeline class whose kind is image-to-image (inpainting included).",
                        lambda cls: isinstance(getattr(cls, "kind", None), Image2ImageKind), __name__)
InpaintRun = marker("InpaintRun", "A pipeline class whose kind is inpainting.",
                    lambda cls: isinstance(getattr(cls, "kind", None), InpaintKind), __name__)
