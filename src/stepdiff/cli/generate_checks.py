"""``stepdiff generate``'s checks: every flag, before the model loads."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import replace
from pathlib import Path

from .. import loading
from ..limits import SIZE_LIMIT_RATIO, SIZE_WARN_RATIO
from ..request import GenerationRequest, SizeRule
from .common import _at_least, _check_cache, _check_common, _check_memory, _check_new_file, _check_writable_dir, _warn

_FRAME = re.compile(r"^\d+\.png$")  # a preview frame, {step}.png


def _generate_outputs(args: argparse.Namespace) -> list[Path] | None:
    """The --output paths (checked, not yet reserved); None for automatic stepdiff-NNNNN.png names."""
    from ..images import image_format

    if args.output is None:
        _check_writable_dir("the current folder", Path.cwd())
        return None
    if args.output.is_dir():
        raise IsADirectoryError(f"--output {str(args.output)!r} is a folder; give a file name ending in .png")
    image_format(args.output)
    _check_writable_dir("--output", args.output.parent)
    stem, ext = args.output.with_suffix(""), args.output.suffix
    paths = [args.output] if args.num_images == 1 else [stem.with_name(f"{stem.name}-{i + 1}{ext}")
                                                       for i in range(args.num_images)]
    for path in paths:
        if path.is_dir():
            raise IsADirectoryError(f"--output: {str(path)!r} is a folder")
        if path.exists() and not args.overwrite:
            raise FileExistsError(f"--output {str(path)!r} already exists; pass --overwrite to replace it")
    return paths


def _check_previews(args: argparse.Namespace, outputs: list[Path] | None) -> None:
    if args.preview_dir is not None:
        folder = args.preview_dir
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"--preview-dir {str(folder)!r} exists and is not a folder")
            _check_writable_dir("--preview-dir", folder)
            frames = sorted(p.name for p in folder.iterdir() if _FRAME.match(p.name))
            if frames and not args.overwrite:
                raise FileExistsError(f"--preview-dir {str(folder)!r} already holds {len(frames)} preview frame(s) "
                                      f"({frames[0]}, ...); choose another folder or pass --overwrite")
        else:
            _check_writable_dir("--preview-dir", folder.parent)
    if args.animation is not None:
        _check_new_file("--animation", args.animation, args.overwrite, (".gif", ".webp"))
    if args.contact_sheet is not None:
        _check_new_file("--contact-sheet", args.contact_sheet, args.overwrite, (".png", ".jpg", ".jpeg", ".webp"))
    seen: dict[Path, str] = {p.resolve(): "--output" for p in outputs or []}
    for flag, path in (("--animation", args.animation), ("--contact-sheet", args.contact_sheet)):
        if path is not None:
            if path.resolve() in seen:
                raise ValueError(f"{flag} {str(path)!r} is also the {seen[path.resolve()]} file")
            seen[path.resolve()] = flag


# generate's flags for the request's fields: a FieldError names what the user typed
FLAGS = {
    "prompt": "PROMPT", "negative_prompt": "--negative", "seed": "--seed", "steps": "--steps", "size": "--size",
    "width": "--size width", "height": "--size height", "guidance_scale": "--guidance", "cfg_cutoff": "--cfg-cutoff",
    "cfg_cutoff_step": "--cfg-cutoff-step", "guidance_interval": "--guidance-interval", "scheduler": "--scheduler",
    "num_images": "--num-images", "init_image": "--init-image", "strength": "--strength", "mask_image": "--mask",
    "control_image": "--control", "control_scale": "--control-scale", "control_end": "--control-end",
}


def _check_generate(args: argparse.Namespace) -> tuple[Path, GenerationRequest]:
    """Every generate flag, before the model loads. Returns (model folder, the checked request); sets args.policies
    (step caching) and args.controlnet_folder."""
    from ..limits import ModelShape

    folder = _check_common(args)
    _check_run_flags(args)
    try:
        shape = ModelShape.from_folder(folder)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None
    request = _request(args, shape)
    width, height = request.output_size or (shape.native_size, shape.native_size)
    _check_size_limit(args, shape, width, height)
    request = _check_control(args, folder, request, shape)
    args.policies = _check_cache(args, folder, request.run_steps)  # T-GATE's gate is a share of the steps that run
    _check_memory(args, shape, width, height, args.num_images,
                  f"--size {width}x{height} and --num-images {args.num_images}")
    ratio = max(width, height) / shape.native_size
    if ratio > SIZE_WARN_RATIO:  # only for a run that goes ahead
        _warn(f"--size {width}x{height} is {ratio:g} times the model's native {shape.native_size}x{shape.native_size} "
              "per side: expect repeated or broken shapes, and slow steps")
    return folder, request


def _check_run_flags(args: argparse.Namespace) -> None:
    """The flags about the run rather than the picture: previews, stops and inpainting's kept region."""
    if args.preview_every is not None:
        _at_least("--preview-every", args.preview_every, 1)
    _at_least("--patience", args.patience, 1)
    if args.stop_at is not None:
        _at_least("--stop-at", args.stop_at, 0)
    if args.stop_on_convergence is not None and not 0.0 < args.stop_on_convergence < math.inf:
        raise ValueError(f"--stop-on-convergence must be a number > 0, got {args.stop_on_convergence}")
    if args.stop_output is not None:
        from ..finishing import parse_interrupt_output

        parse_interrupt_output(args.stop_output, "--stop-output")
    if args.keep_unmasked is not None and args.mask is None:
        flag = "--keep-unmasked" if args.keep_unmasked else "--no-keep-unmasked"
        raise ValueError(f"{flag} needs --mask (it is about inpainting's kept region)")


def _request(args: argparse.Namespace, shape, control=None) -> GenerationRequest:
    """The flags as a GenerationRequest, checked (stepdiff.request): pictures are read here, so that a bad file fails
    before the model loads; a --mask without --init-image stays a path, which the request refuses."""
    init = None if args.init_image is None else _read_picture("--init-image", args.init_image, "RGB")
    mask = args.mask if init is None or args.mask is None else _read_picture("--mask", args.mask, "L")
    width, height = args.size if args.size is not None else (None, None)
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, steps=args.steps, width=width,
        height=height, guidance_scale=args.guidance, cfg_cutoff=args.cfg_cutoff, cfg_cutoff_step=args.cfg_cutoff_step,
        guidance_interval=args.guidance_interval, scheduler=args.scheduler, karras=args.karras,
        num_images=args.num_images, init_image=init, strength=args.strength, mask_image=mask,
        control_image=args.control if control is None else control, control_scale=args.control_scale,
        control_end=args.control_end,
    )
    return request.validate(FLAGS, size=SizeRule.of(shape), allow_empty_prompt=True)


def _check_size_limit(args: argparse.Namespace, shape, width: int, height: int) -> None:
    """--size more than SIZE_LIMIT_RATIO times the model's native size per side: refused unless --force."""
    ratio = max(width, height) / shape.native_size
    if args.size is not None and ratio > SIZE_LIMIT_RATIO and not args.force:
        from ..limits import estimate_memory, format_bytes

        native = f"{shape.native_size}x{shape.native_size}"
        need = format_bytes(estimate_memory(shape, width, height, args.num_images, args.dtype))
        raise ValueError(f"--size {width}x{height} is {ratio:g} times the model's native {native} per side; the limit "
                         f"is {SIZE_LIMIT_RATIO} times: the run would need about {need} and each step slows down with "
                         "the square of the pixel count (self-attention); pass --force to run anyway")


def _check_control(args: argparse.Namespace, folder: Path, request: GenerationRequest, shape) -> GenerationRequest:
    """--controlnet: a ControlNet folder that fits the model (configs only); then the request with the --control
    picture read (its size checked against the output's). Sets args.controlnet_folder."""
    import json
    from types import SimpleNamespace

    from ..models import default_controlnet, default_model
    from ..pipelines.controlnet import check_controlnet_fits

    args.controlnet_folder = None
    if args.control is None:
        if args.controlnet is not None:
            raise ValueError("--controlnet needs --control (the control picture)")
        return request
    if args.controlnet is None:
        if args.model is not None and args.model.resolve() != default_model().resolve():
            raise ValueError(f"--control with --model {str(args.model)!r} needs --controlnet DIR: the shipped ControlNet "
                             "fits the shipped model only")
        args.controlnet = default_controlnet()
    elif not (args.controlnet / "config.json").is_file():
        raise ValueError(f"--controlnet {str(args.controlnet)!r} is not a ControlNet folder (it has no config.json)")
    config = json.loads((args.controlnet / "config.json").read_text())
    if config.get("_class_name") != "ControlNetModel":
        raise ValueError(f"--controlnet {str(args.controlnet)!r} holds a {config.get('_class_name')!r}, not a "
                         "ControlNetModel")
    unet = json.loads((loading.config_folder(folder) / "unet" / "config.json").read_text())
    try:  # the configs decide whether the ControlNet fits, before any weights load
        check_controlnet_fits(SimpleNamespace(config=SimpleNamespace(**config)), SimpleNamespace(config=SimpleNamespace(**unet)))
    except ValueError as e:
        raise ValueError(f"--controlnet {str(args.controlnet)!r} does not fit --model {str(folder)!r}: "
                         f"{str(e).split(': ', 1)[1]}") from None
    args.controlnet_folder = args.controlnet
    if request.output_size is None:  # the model's native size
        request = replace(request, width=shape.native_size, height=shape.native_size)
    return replace(request, control_image=_read_picture("--control", args.control, "RGB")).validate(
        FLAGS, size=SizeRule.of(shape), allow_empty_prompt=True)


def _read_picture(flag: str, path: Path, mode: str):
    """A picture file, fully decoded now (stepdiff.images.read_image), so that a bad file fails before the model loads."""
    from ..images import read_image

    return read_image(path, what=flag, mode=mode)
