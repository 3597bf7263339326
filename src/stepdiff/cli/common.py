"""What the commands share: flag range checks, the device, the model folder and its scheduler, memory, output paths,
loading (through stepdiff.loading, the loader seam tests replace) and one-line warnings."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .. import loading
from ..request import check_scheduler, check_steps

_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _at_least(flag: str, value: int, low: int, high: int | None = None, why: str = "") -> int:
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{flag} must be {allowed}{why}, got {value}")
    return value


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N, mps or xpu") from None
    if dev.type not in _DEVICE_TYPES:
        raise ValueError(f"--device {device!r}: stepdiff runs on cpu, cuda, mps or xpu")
    if dev.type == "cpu":
        return
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    if backend is None or not backend.is_available():
        raise ValueError(f"--device {device!r}: this torch ({torch.__version__}) cannot use a {dev.type} device here; "
                         "use --device cpu")
    if dev.index is not None and hasattr(backend, "device_count") and dev.index >= backend.device_count():
        raise ValueError(f"--device {device!r}: this machine has {backend.device_count()} {dev.type} device(s), "
                         f"numbered from 0")


def _check_model_folder(flag: str, folder: Path) -> None:
    from ..pipelines.base import StepDiffPipeline

    try:
        StepDiffPipeline._check_folder(folder)
    except (OSError, ValueError) as e:
        raise type(e)(f"{flag}: {e}") from None


def _resolve_model(flag: str, model: Path, allow_pickle: bool = False) -> Path:
    """--model as a local path: a model folder, a single-file checkpoint (header checked, configs derived) or a hub
    id's snapshot folder (downloaded where a network is, else from the local hub cache)."""
    from ..single_file import config_folder, resolve_model

    try:
        path = resolve_model(model, allow_pickle)
        if path.is_file():
            config_folder(path, allow_pickle)  # derived once, before anything loads
    except (OSError, ValueError) as e:
        raise type(e)(f"{flag}: {e}") from None
    return path


def _folder(args: argparse.Namespace) -> Path:
    from ..models import default_model

    return args.model if args.model is not None else default_model()


def _check_steps(args: argparse.Namespace, config: dict) -> None:
    """--steps in [1, MAX_STEPS]; above the training steps only for schedulers that can (DDIM and DDPM can't)."""
    from ..schedulers import make_scheduler

    check_steps(args.steps, "--steps")
    train = int(config.get("num_train_timesteps", 1000))
    if args.steps <= train:
        return
    name = args.scheduler or config.get("_class_name", "")
    try:  # the scheduler alone, from its config: no weights
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_scheduler(name, config).set_timesteps(args.steps)
    except ValueError as e:
        if "num_inference_steps" in str(e):
            raise ValueError(f"--steps must be in [1, {train}] with scheduler {name!r} (the model was trained with {train} "
                             f"steps), got {args.steps}") from None


def _check_common(args: argparse.Namespace) -> Path:
    """The model flags, checked before anything loads; returns the model folder."""
    from ..schedulers import karras_schedulers, supports_karras

    if args.model is not None:
        args.model = _resolve_model("--model", args.model, args.allow_pickle)
    folder = _folder(args)
    config = loading.scheduler_config(folder)
    if args.scheduler is not None:
        check_scheduler(args.scheduler, "--scheduler")
    _check_steps(args, config)
    if args.karras:
        name = args.scheduler or config.get("_class_name")  # default: the model's own scheduler
        has_karras = True
        with contextlib.suppress(ValueError):  # a scheduler class we don't list: diffusers decides
            has_karras = name is None or supports_karras(name)
        if not has_karras:
            raise ValueError(f"--karras: scheduler {name!r} has no Karras sigmas; add --scheduler with one of: "
                                 f"{', '.join(karras_schedulers())}")
    _check_device(args.device)
    return folder


def _check_memory(args: argparse.Namespace, shape, width: int, height: int, images: int, what: str) -> None:
    from ..limits import device_memory, estimate_memory, format_bytes

    need = estimate_memory(shape, width, height, images, args.dtype)
    if args.max_memory is not None:
        limit, source = int(args.max_memory * 2**30), "--max-memory"
    else:
        limit, source = device_memory(args.device), f"the {args.device} device's memory"
    if limit is not None and need > limit:
        raise ValueError(f"{what} need about {format_bytes(need)} of memory (an estimate); the limit is "
                         f"{format_bytes(limit)}, {source}; make them smaller or raise the limit with --max-memory GIB")


def _check_writable_dir(flag: str, folder: Path) -> None:
    from ..images import check_writable_dir

    check_writable_dir(folder.resolve(), flag)


def _check_new_file(flag: str, path: Path, overwrite: bool, suffixes: Sequence[str] | None = None) -> None:
    """An output file: its folder exists and is writable, it is not a folder, and it is new unless --overwrite."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {str(path)!r} is a folder; give a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} must end in {', '.join(suffixes)}, got {str(path)!r}")
    _check_writable_dir(flag, path.parent)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {str(path)!r} already exists; pass --overwrite to replace it")




def _kind(args: argparse.Namespace) -> str:
    if getattr(args, "init_image", None) is None:
        return "text2image"
    return "inpaint" if args.mask is not None else "image2image"


def _load(args: argparse.Namespace, folder: Path):
    from ..schedulers import make_scheduler

    pipe = loading.load_pipeline(folder, args.dtype, args.allow_pickle, _kind(args),
                                 getattr(args, "controlnet_folder", None))
    pipe.to(args.device)
    if args.scheduler is not None or args.karras:
        name = args.scheduler or type(pipe.scheduler).__name__
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config, karras=args.karras)
    return pipe


def _warn(message: str) -> None:
    print(f"stepdiff: warning: {message}", file=sys.stderr)




def _check_cache(args: argparse.Namespace, folder: Path, steps: int) -> list:
    """--fast / --cache: the run's compute policies (stepdiff.caching), checked against the model folder's
    layout (no weights) so that a bad spec or a policy the model cannot take fails before anything loads."""
    from ..cache_options import cache_policies, check_policies, has_unet

    policies = cache_policies(args.fast, args.cache, steps, "--cache")
    check_policies(policies, "--fast" if args.fast else "--cache", has_unet(folder))
    return policies




def _names_hub_id(args: argparse.Namespace) -> bool:
    """--model names a hub id (owner/name that is no local path): the one case where the CLI may use the network
    (unless HF_HUB_OFFLINE=1 is set), to download it through diffusers as the classic loader does."""
    from ..single_file import is_hub_id

    model = getattr(args, "model", None)
    return isinstance(model, Path) and not model.exists() and is_hub_id(str(model))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


