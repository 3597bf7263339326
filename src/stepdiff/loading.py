"""Loading a model for a caller (the CLI, the batch workers, the studio): a pipeline from a model folder or a
single-file checkpoint, and what the folder says about itself without loading any weights (its stepdiff.json, its
default guidance, its scheduler config).

Every caller loads through :func:`load_pipeline`, so tests replace the loading in one place (the loader seam)::

    from stepdiff.loading import use_loader

    def no_loading(folder, *rest):
        raise AssertionError("bad input must fail before the model loads")

    with use_loader(no_loading):
        main(["generate", "a cat", "--steps", "0"])  # exits 2; the model never loads
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .limits import DEFAULT_GUIDANCE

__all__ = [
    "KINDS", "Loader", "config_folder", "default_guidance", "from_pretrained", "load_pipeline", "model_info",
    "scheduler_config", "set_loader", "use_loader",
]

KINDS = ("text2image", "image2image", "inpaint")
# A loader: (folder, dtype, allow_pickle, kind, controlnet) -> a pipeline; called with those five, in that order.
Loader = Callable[..., Any]


def from_pretrained(folder: str | Path, dtype: str = "float32", allow_pickle: bool = False, kind: str = "text2image",
                    controlnet: str | Path | None = None) -> Any:
    """The pipeline of ``kind`` for a model folder or a single-file checkpoint (offline, configs derived from the
    file), with a ControlNet folder where given. Quietly: no loading bars (the denoising bar stays), no rename
    warnings."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from . import pipelines

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    auto = {"text2image": pipelines.AutoPipelineForText2Image, "image2image": pipelines.AutoPipelineForImage2Image,
            "inpaint": pipelines.AutoPipelineForInpainting}[kind]
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {} if dtype == "float32" else {"torch_dtype": getattr(torch, dtype)}
    if Path(folder).is_file():
        return _from_single_file(Path(folder), kwargs, allow_pickle, kind, controlnet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers renames torch_dtype; both spellings work
        if controlnet is not None:
            kwargs["controlnet"] = _controlnet(controlnet, kwargs)
        return auto.from_pretrained(folder, allow_pickle=allow_pickle, **kwargs)


def _controlnet(folder: str | Path, kwargs: dict[str, Any]) -> Any:
    import torch
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(folder, torch_dtype=kwargs.get("torch_dtype", torch.float32))


def _from_single_file(path: Path, kwargs: dict[str, Any], allow_pickle: bool, kind: str,
                      controlnet: str | Path | None) -> Any:
    """A single-file checkpoint, offline: the family's pipeline of this kind, configs derived from the file."""
    from .pipelines.registry import load, pipeline_for
    from .single_file import inspect, offline_kwargs

    info = inspect(path, allow_pickle)
    entry = pipeline_for(info.family, kind, controlnet is not None)
    if entry is None:
        raise ValueError(f"{str(path)!r} is a {info.family} checkpoint, which stepdiff does not run as {kind}"
                         f"{' with a ControlNet' if controlnet is not None else ''}")
    cls = load(entry)
    kwargs, notes = offline_kwargs(path, cls, kwargs, allow_pickle)
    for note in notes:
        print(f"stepdiff: warning: {note}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if controlnet is not None:
            kwargs["controlnet"] = _controlnet(controlnet, kwargs)
        return cls.from_single_file(str(path), allow_pickle=allow_pickle, **kwargs)


_loader: Loader = from_pretrained


def load_pipeline(folder: str | Path, dtype: str = "float32", allow_pickle: bool = False, kind: str = "text2image",
                  controlnet: str | Path | None = None) -> Any:
    """Load through the current loader (:func:`from_pretrained` unless :func:`set_loader` replaced it)."""
    return _loader(folder, dtype, allow_pickle, kind, controlnet)


def set_loader(loader: Loader | None) -> Loader:
    """Make ``loader`` what :func:`load_pipeline` calls (None: :func:`from_pretrained` again); returns the previous
    one. For tests and embedders (a pipeline cache, a stub); it applies to this process only (a Ray actor loads with
    its own process's loader)."""
    global _loader
    previous, _loader = _loader, (from_pretrained if loader is None else loader)
    return previous


@contextlib.contextmanager
def use_loader(loader: Loader) -> Iterator[Loader]:
    """``loader`` while the block runs, then the previous loader again."""
    previous = set_loader(loader)
    try:
        yield loader
    finally:
        set_loader(previous)


def config_folder(model: str | Path) -> Path:
    """The folder that holds a model's configs: the model folder, or a single file's derived config folder."""
    if Path(model).is_file():
        from .single_file import config_folder as derived

        return derived(Path(model))
    return Path(model)


def model_info(folder: str | Path) -> dict[str, Any]:
    """stepdiff.json in a model folder: recommended settings and training vocabulary, where recorded."""
    info = Path(folder) / "stepdiff.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def default_guidance(info: dict[str, Any] | str | Path) -> float:
    """The guidance the model recommends (its stepdiff.json, or the ``model_info`` of it); otherwise 7.5, as the
    convention has it."""
    if not isinstance(info, dict):
        info = model_info(info)
    return float(info.get("guidance_scale", DEFAULT_GUIDANCE))


def scheduler_config(folder: str | Path) -> dict[str, Any]:
    """The model's scheduler config (scheduler/scheduler_config.json); {} where it has none or it can't be read."""
    try:
        config = json.loads((config_folder(folder) / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
