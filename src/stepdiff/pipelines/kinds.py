"""Kinds of run beyond text-to-image: image-to-image and inpainting, as mixins over a family.

A kind changes only the start of a run (where the timesteps begin, what the first latents are) and,
for inpainting, what happens after each step (the known region is put back) and what an interrupted
run shows. The loop, the guidance, the callbacks and the output are the family's, unchanged.
``StableDiffusionImg2ImgPipeline`` is ``Image2ImageRun`` over ``StableDiffusionPipeline``, and so on.

Where the classic pipelines' image handling has an order (VAE sampling, then noise, then the
masked image), it is kept, so that the same generator gives the same images.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..vae import encode_images
from .run import CallInputs, Run

__all__ = ["INPAINT_CALLBACK_NAMES", "Image2ImageRun", "InpaintRun", "check_strength"]

_IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor, list)


def check_strength(value: object, steps: int | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"strength must be a number in (0, 1], got {value!r} ({type(value).__name__})")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"strength must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_image(name: str, image: object) -> None:
    if image is None:
        raise ValueError(f"{name} is required for this pipeline (a PIL image, numpy array, tensor or a list of them)")
    if not isinstance(image, _IMAGE_TYPES) or (isinstance(image, list) and not image):
        raise TypeError(
            f"{name} must be a PIL image, a numpy array, a torch tensor or a non-empty list of them, "
            f"got {type(image).__name__}"
        )


def _image_size(image: object) -> tuple[int, int] | None:
    """(height, width) of an image argument before preprocessing, where it can be told."""
    first = image[0] if isinstance(image, list) else image
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if isinstance(first, torch.Tensor) and first.ndim >= 2:
        return tuple(first.shape[-2:])  # type: ignore[return-value]
    if isinstance(first, np.ndarray) and first.ndim >= 2:
        return (first.shape[-3], first.shape[-2]) if first.ndim >= 3 and first.shape[-1] in (1, 3, 4) else first.shape[:2]
    return None


def _preprocess(processor: VaeImageProcessor, name: str, image: object, **kwargs: Any) -> torch.Tensor:
    try:
        return processor.preprocess(image, **kwargs)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{name} could not be read as an image: {e}") from None


def _check_count(name: str, what: str, count: int, rows: int, batch_size: int, per_prompt: int) -> None:
    """An image argument holds as many images as the call makes, or a number that divides it (each then serves
    ``rows // count`` images, the classic duplication); anything else is refused before any model work."""
    if count < 1 or rows % count:
        allowed = f"give 1 {what}" if rows == 1 else f"give 1 {what}, one per image ({rows}), or a number that divides {rows}"
        raise ValueError(
            f"{name} holds {count} {what}{'s' if count != 1 else ''} but this call makes {rows} image"
            f"{'s' if rows != 1 else ''} ({batch_size} prompt{'s' if batch_size != 1 else ''} x num_images_per_prompt="
            f"{per_prompt}); {allowed}"
        )


def _is_latents(image: object, channels: int) -> bool:
    """An image argument given as VAE latents: a tensor (C, h, w) or (B, C, h, w) with the VAE's latent channels
    (the image processor passes them through unchanged)."""
    return isinstance(image, torch.Tensor) and (
        (image.ndim == 4 and image.shape[1] == channels) or (image.ndim == 3 and image.shape[0] == channels)
    )


def _repeat_to(latents: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """The classic duplication: the whole batch again, until it has ``rows`` rows."""
    if rows > latents.shape[0]:
        if rows % latents.shape[0]:
            raise ValueError(f"{name} has {latents.shape[0]} images, which does not divide the {rows} images of this call")
        return torch.cat([latents] * (rows // latents.shape[0]))
    return latents


class Image2ImageRun:
    """Start from an image: its latents noised to the timestep that ``strength`` picks, then the usual steps."""

    size_from_image: ClassVar[bool] = True  # the classic SD/SDXL img2img pipelines keep the image's size
    # With one generator per row, the classic img2img pipelines repeat the image to the batch before encoding it
    # (each row's posterior sample from its own generator); the inpainting ones encode the image as given (the
    # first generators only) and repeat the latents.
    repeat_image_for_generators: ClassVar[bool] = True

    def check_kind_inputs(self, args: dict[str, Any]) -> CallInputs:
        kind = super().check_kind_inputs(args)  # type: ignore[misc]
        kind.strength = check_strength(args.pop("strength", 0.8))
        image = args.pop("image", None)
        _check_image("image", image)
        kind.image_arg = image
        if self.size_from_image:
            if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == self.latent_channels():
                kind.image = image  # latents given directly
                kind.height, kind.width = (s * self.vae_scale_factor for s in image.shape[-2:])
            else:
                kind.image = _preprocess(self.image_processor, "image", image)
                kind.height, kind.width = kind.image.shape[-2:]
        return kind

    def check_kind_rows(self, kind: CallInputs, rows: int, batch_size: int, num_images_per_prompt: int) -> None:
        super().check_kind_rows(kind, rows, batch_size, num_images_per_prompt)  # type: ignore[misc]
        if kind.image is None:
            kind.image = _preprocess(
                self.image_processor, "image", kind.image_arg, height=kind.height, width=kind.width
            )
        _check_count("image", "image", kind.image.shape[0], rows, batch_size, num_images_per_prompt)

    def start_index(self, num_inference_steps: int, strength: float) -> int:
        if self.flow_matching:  # the classic SD3 and Flux pipelines do not round num_inference_steps * strength down
            return int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        return max(num_inference_steps - init_timestep, 0)

    def truncate_start(self, run: Run, steps: torch.Tensor, num_inference_steps: int, kind: CallInputs) -> torch.Tensor:
        scheduler = run.scheduler
        start = self.start_index(num_inference_steps, kind.strength)
        t_start = start * scheduler.order
        steps = scheduler.timesteps[t_start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
        # Counted in steps, not timesteps: PNDM's schedule has one timestep more than it has steps, which would
        # leave a lone timestep to run at a strength that leaves 0 steps (the classic pipelines raise there).
        if len(steps) == 0 or num_inference_steps - start < 1:
            raise ValueError(
                f"strength={kind.strength} leaves no denoising step at num_inference_steps={num_inference_steps}; "
                "raise strength or num_inference_steps"
            )
        return steps

    def _image_latents(self, kind: CallInputs, rows: int, dtype, device, generator) -> torch.Tensor:
        image = kind.image
        if image is None:
            image = kind.image = _preprocess(
                self.image_processor, "image", kind.image_arg, height=kind.height, width=kind.width
            )
        image = image.to(device=device, dtype=dtype)
        if image.shape[1] == self.latent_channels():
            latents = image
        else:
            if isinstance(generator, list) and image.shape[0] < rows and self.repeat_image_for_generators:
                image = _repeat_to(image, rows, "image")
            latents = encode_images(self.vae, image, generator)
        return _repeat_to(latents, rows, "image")

    def noise_to(self, run: Run, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor,
                 scheduler: Any = None) -> torch.Tensor:
        scheduler = run.scheduler if scheduler is None else scheduler
        if self.flow_matching:
            return scheduler.scale_noise(latents, timestep, noise)
        return scheduler.add_noise(latents, noise, timestep)

    def initial_latents(self, run: Run, rows, height, width, dtype, device, generator, latents, kind) -> torch.Tensor:
        init = self._image_latents(kind, rows, dtype, device, generator)
        if not kind.add_noise:  # a refiner run taking over a base run's latents (denoising_start)
            return init
        noise = randn_tensor(init.shape, generator=generator, device=device, dtype=dtype)
        return self.noise_to(run, init, noise, run.timesteps[:1].repeat(rows))


# The inpainting tensors a step callback can ask for, and where each lives in the run (per-row conditioning).
INPAINT_CALLBACK_NAMES: dict[str, tuple[str, str]] = {
    "mask": ("cond", "mask"), "masked_image_latents": ("cond", "masked_image_latents"),
}


class InpaintRun(Image2ImageRun):
    """Repaint the white part of ``mask_image``; the black part keeps ``image``.

    9-channel inpainting UNets see the mask and the masked image's latents as extra input channels
    (per-row conditioning, so they follow every guidance decision); ordinary 4-channel UNets get the
    known region put back, noised to the next timestep, after every step. Either way the x0 estimate
    (``denoised``, and the image of an interrupted run) keeps the unmasked area of ``image``.
    """

    size_from_image: ClassVar[bool] = False  # the classic inpainting pipelines resize to height/width
    repeat_image_for_generators: ClassVar[bool] = False

    @property
    def mask_processor(self) -> VaeImageProcessor:
        """Pre-processing of ``mask_image`` (made on first use; assignable, as the classic attribute)."""
        proc = self.__dict__.get("_mask_processor")
        if proc is None:
            proc = self.__dict__["_mask_processor"] = VaeImageProcessor(
                vae_scale_factor=self.vae_scale_factor, vae_latent_channels=self._vae_latent_channels(),
                do_normalize=False, do_binarize=True, do_convert_grayscale=True,
            )
        return proc

    @mask_processor.setter
    def mask_processor(self, value: VaeImageProcessor) -> None:
        self.__dict__["_mask_processor"] = value

    def denoiser_channels(self) -> int:
        """Input channels of the denoiser per latent position (Flux overrides it: its tokens are 2x2 patches)."""
        return self.denoiser.config.in_channels

    def takes_mask_channels(self) -> bool:
        """An inpainting denoiser (SD's 9-channel UNets, SD3's 33-channel transformers): latents, mask and masked-image
        latents as input channels. Otherwise (as many input channels as latent channels) the known region is put back
        after every step."""
        return self.denoiser_channels() == 2 * self.latent_channels() + 1

    def check_kind_inputs(self, args: dict[str, Any]) -> CallInputs:
        kind = super().check_kind_inputs(args)
        mask = args.pop("mask_image", None)
        if mask is None:
            raise ValueError("mask_image is required for inpainting: white repaints, black keeps the image")
        _check_image("mask_image", mask)
        image, f = kind.image_arg, self.vae_scale_factor
        image_size, mask_size = _image_size(image), _image_size(mask)
        kind.masked_image_latents = args.pop("masked_image_latents", None)
        if _is_latents(image, self.latent_channels()):  # the image's latents: its picture is f times their size
            image_size = tuple(s * f for s in image.shape[-2:])
            if kind.masked_image_latents is None and self.takes_mask_channels():
                raise ValueError(
                    f"image is given as latents (shape {tuple(image.shape)}), so pass masked_image_latents too: this "
                    "inpainting model takes the masked image's latents, which cannot be made from latents"
                )
            # Latents cannot be resized: the picture is their size unless height and width say otherwise (checked).
            kind.height, kind.width = image_size
            for dim, value in (("height", args.get("height")), ("width", args.get("width"))):
                if value is not None and value != getattr(kind, dim):
                    raise ValueError(
                        f"image is given as latents of a {image_size[1]}x{image_size[0]} picture (width x height) but "
                        f"{dim}={value!r}; latents cannot be resized: leave {dim} out or encode a picture of that size"
                    )
        if image_size is not None and mask_size is not None and image_size != mask_size:
            raise ValueError(
                f"mask_image is {mask_size[1]}x{mask_size[0]} but image is {image_size[1]}x{image_size[0]} (width x height); "
                "they must be the same size"
            )
        kind.mask_arg = mask
        if args.pop("padding_mask_crop", None) is not None:
            raise NotImplementedError("padding_mask_crop is not supported by stepdiff's inpainting pipelines yet")
        channels, latent = self.denoiser_channels(), self.latent_channels()
        if channels not in (latent, 2 * latent + 1):
            raise ValueError(
                f"inpainting needs a denoiser with {latent} input channels (the VAE's latent channels) or {2 * latent + 1} "
                f"(an inpainting model: latents, mask and masked image); this {type(self.denoiser).__name__} has {channels}"
            )
        return kind

    def check_kind_rows(self, kind: CallInputs, rows: int, batch_size: int, num_images_per_prompt: int) -> None:
        height, width = kind.height, kind.width
        # As the classic pipelines: the image and the mask resized to the call's size (latents are kept as given).
        kind.image = _preprocess(
            self.image_processor, "image", kind.image_arg, height=height, width=width
        ).to(dtype=torch.float32)
        super().check_kind_rows(kind, rows, batch_size, num_images_per_prompt)
        kind.mask = _preprocess(self.mask_processor, "mask_image", kind.mask_arg, height=height, width=width)
        _check_count("mask_image", "mask", kind.mask.shape[0], rows, batch_size, num_images_per_prompt)
        masked = kind.masked_image_latents
        if masked is not None:
            if not isinstance(masked, torch.Tensor) or masked.ndim != 4:
                raise TypeError(
                    "masked_image_latents must be a 4-D tensor (batch, channels, height, width), got "
                    + (f"shape {tuple(masked.shape)}" if isinstance(masked, torch.Tensor) else type(masked).__name__)
                )
            _check_count("masked_image_latents", "latent", masked.shape[0], rows, batch_size, num_images_per_prompt)

    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def _encode_vae_image(self, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None):
        """Images in [-1, 1] -> scaled latents sampled with ``generator`` (one per row when a list): the classic
        inpainting pipelines' private helper, kept for code that calls it."""
        return encode_images(self.vae, image, generator)

    def initial_latents(self, run: Run, rows, height, width, dtype, device, generator, latents, kind) -> torch.Tensor:
        # As the classic pipeline: image latents (models without mask channels, or strength < 1), then noise, then
        # the mask.
        strength_max = kind.strength == 1.0
        refiner = not kind.add_noise  # SDXL's denoising_start: continue a base run's latents as they are
        image_latents = None
        if refiner or not self.takes_mask_channels() or (latents is None and not strength_max):
            image_latents = self._image_latents(kind, rows, dtype, device, generator)
        shape = (rows, self.latent_channels(), height // self.vae_scale_factor, width // self.vae_scale_factor)
        init_sigma = getattr(run.scheduler, "init_noise_sigma", 1.0)  # flow matching (SD3) starts from plain noise
        if refiner:  # as the classic pipeline: noise drawn (for the known region), the image's latents kept as given
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            start = image_latents
        elif latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if strength_max:
                start = noise * init_sigma
            else:
                start = self.noise_to(run, image_latents, noise, run.timesteps[:1].repeat(rows))
        else:
            noise = latents.to(device)
            start = noise * init_sigma
        if image_latents is None:  # for the clean x0 estimate only: the posterior mode, no randomness used
            image = kind.image.to(device=device, dtype=dtype)
            if image.shape[1] != self.latent_channels():
                image = encode_images(self.vae, image, sample=False)
            image_latents = _repeat_to(image, rows, "image")
        kind.noise, kind.image_latents = noise, image_latents
        return start

    def add_kind_conditioning(self, run: Run, kind: CallInputs, dtype, device, generator) -> None:
        super().add_kind_conditioning(run, kind, dtype, device, generator)  # type: ignore[misc]  # ControlNet images
        rows = run.state.latents.shape[0]
        height, width = kind.height, kind.width
        mask = kind.mask
        masked = kind.masked_image_latents
        from_latents = masked is None and kind.image.shape[1] == self.latent_channels()
        if masked is None and not from_latents:
            masked = kind.image * (mask < 0.5)
        mask = torch.nn.functional.interpolate(mask, size=(height // self.vae_scale_factor, width // self.vae_scale_factor))
        mask = _repeat_to(mask.to(device=device, dtype=dtype), rows, "mask_image")
        if from_latents:  # image given as latents (a model without mask channels): for callbacks only, never read
            masked = kind.image_latents * (mask < 0.5)
        masked = masked.to(device=device, dtype=dtype)
        masked_latents = masked if masked.shape[1] == self.latent_channels() else encode_images(self.vae, masked, generator)
        masked_latents = _repeat_to(masked_latents, rows, "image").to(device=device, dtype=dtype)
        for side in (run.state.cond, run.state.uncond):
            side["mask"], side["masked_image_latents"] = mask, masked_latents
        run.extras.noise, run.extras.image_latents = kind.noise, kind.image_latents.to(dtype)
        run.after_step = lambda state: self._keep_known_region(run, state)

    def _keep_known_region(self, run: Run, state) -> None:
        mask, known = state.cond["mask"], run.extras.image_latents
        if not self.takes_mask_channels():
            proper = known
            i = state.step_index
            scheduler, timesteps = run.schedule  # the finishing steps' own while they run
            if i < len(timesteps) - 1:
                proper = self.noise_to(run, known, run.extras.noise, torch.tensor([timesteps[i + 1]]), scheduler)
            state.latents = (1 - mask) * proper + mask * state.latents
        state.denoised = (1 - mask) * known + mask * state.denoised

    def extend_model_input(self, latent_input: torch.Tensor, conditioning: dict) -> torch.Tensor:
        if self.takes_mask_channels():
            return torch.cat([latent_input, conditioning["mask"], conditioning["masked_image_latents"]], dim=1)
        return latent_input
