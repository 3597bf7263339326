"""Model folders and weight files: what ``from_pretrained`` checks before diffusers loads anything, and the
classic constructor's fixes for old configs."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffusers.configuration_utils import FrozenDict
from diffusers.utils import deprecate

from .registry import REGISTRY

__all__ = ["check_folder", "normalize_legacy_configs"]


def check_folder(path: str | os.PathLike) -> str | None:
    """The ``_class_name`` of a local pipeline folder; a clear error for anything else."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"pretrained_model_name_or_path={str(path)!r} is not a folder; stepdiff loads local model folders "
            "(model_index.json plus one folder per component), never from a model hub"
        )
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a pipeline folder: it has no model_index.json")
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{str(index)!r} is not valid JSON: {e}") from e


def normalize_legacy_configs(scheduler: Any, unet: Any) -> None:
    """What the classic SD constructor fixes in old configs, with the same deprecation warnings:
    ``steps_offset`` 1, ``clip_sample`` False, and ``sample_size`` 64 for pre-0.9 UNet configs below 64."""
    from packaging import version

    cfg = getattr(scheduler, "config", None)
    if cfg is not None and hasattr(cfg, "steps_offset") and cfg.steps_offset != 1:
        deprecate("steps_offset!=1", "1.0.0", f"The scheduler config of {type(scheduler).__name__} has steps_offset="
                  f"{cfg.steps_offset}; it should be 1. stepdiff (like the classic pipeline) uses 1.", standard_warn=False)
        scheduler._internal_dict = FrozenDict({**dict(cfg), "steps_offset": 1})
    cfg = getattr(scheduler, "config", None)
    if cfg is not None and getattr(cfg, "clip_sample", False) is True:
        deprecate("clip_sample not set", "1.0.0", f"The scheduler config of {type(scheduler).__name__} sets clip_sample"
                  "=True; it should be False for Stable Diffusion. stepdiff (like the classic pipeline) uses False.",
                  standard_warn=False)
        scheduler._internal_dict = FrozenDict({**dict(cfg), "clip_sample": False})
    ucfg = getattr(unet, "config", None)
    old = ucfg is not None and hasattr(ucfg, "_diffusers_version") and (
        version.parse(version.parse(ucfg._diffusers_version).base_version) < version.parse("0.9.0.dev0"))
    if old and isinstance(getattr(ucfg, "sample_size", None), int) and ucfg.sample_size < 64:
        deprecate("sample_size<64", "1.0.0", "The UNet config sets sample_size below 64, which fits none of the SD 1.x "
                  "checkpoints; stepdiff (like the classic pipeline) uses 64.", standard_warn=False)
        unet._internal_dict = FrozenDict({**dict(ucfg), "sample_size": 64})


def _explain_mismatch(folder: Path, error: Exception) -> Exception:
    """A weight whose shape does not fit its component's config: name the config.json to check."""
    import re

    from safetensors import safe_open

    match = re.search(r"(?:because|for) (\S+?):? (?:expected shape|size mismatch)", str(error))
    if match is None:
        return error
    key = match.group(1)
    for weights in sorted(folder.glob("*/*.safetensors")):
        with safe_open(weights, "pt") as f:
            if key in f.keys():
                component = weights.parent.name
                return ValueError(
                    f"{str(folder / component / 'config.json')!r} does not match the weights in {component}/: "
                    f"{key} has another shape than that config describes ({str(error).split('. ')[0]})"
                )
    return error


def _kind_of(cls: type) -> str:
    for e in REGISTRY:
        if e.name == cls.__name__:
            return e.kind
    return "text2image"


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@contextlib.contextmanager
def _without_empty_fp32_note() -> Iterator[None]:
    """diffusers' single-file loader casts each model to ``torch_dtype`` with ``.to()``, and warns for every model that
    "modules ... should be kept in float32: []" even when there are none; that empty note is dropped."""
    import logging

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "should be kept in float32: []" not in record.getMessage()

    logger, drop = logging.getLogger("diffusers.models.modeling_utils"), Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    """Every component folder that model_index.json lists exists, and its weights are readable."""
    from safetensors import safe_open

    index = json.loads((folder / "model_index.json").read_text())
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            raise FileNotFoundError(f"{str(folder)!r} lists component {name!r} in model_index.json but has no {name}/ folder")
        safetensors = sorted(sub.glob("*.safetensors"))
        for path in safetensors:
            try:
                with safe_open(path, "pt"):
                    pass
            except Exception as e:
                raise OSError(f"weights file {str(path)!r} is truncated or corrupt ({e})") from None
        pickles = [p for p in sorted(sub.iterdir()) if p.suffix in _PICKLE_SUFFIXES]
        if pickles and not safetensors and not allow_pickle:
            raise OSError(
                f"{str(pickles[0])!r} is a pickle checkpoint, which can run code when loaded; stepdiff loads only "
                "safetensors by default. Pass allow_pickle=True to from_pretrained (CLI: --allow-pickle) if you "
                "trust this file"
            )


def _refuse_pickle(sources: list, kwargs: dict[str, Any], allow_pickle: bool, loader: str) -> None:
    """Refuse a pickle file named by a loader's source or ``weight_name``; otherwise make diffusers' loaders
    look for safetensors only (by default they fall back to a pickle ``.bin`` when there is none)."""
    if allow_pickle:
        return
    names = [kwargs.get("weight_name")] + [s for s in sources if isinstance(s, (str, os.PathLike))]
    for name in names:
        if name is not None and Path(str(name)).suffix in _PICKLE_SUFFIXES:
            raise OSError(
                f"{str(name)!r} is a pickle file, which can run code when loaded; stepdiff loads only safetensors by "
                f"default. Pass allow_pickle=True to {loader} if you trust this file"
            )
    if kwargs.get("use_safetensors") is False:
        raise OSError(f"use_safetensors=False loads pickle files; pass allow_pickle=True to {loader} as well")
    kwargs["use_safetensors"] = True


def load_pretrained(cls: Any, path: str | os.PathLike, allow_pickle: bool, kwargs: dict[str, Any], load: Any) -> Any:
    """``StepDiffPipeline.from_pretrained``: the folder checked (family, weights, pickles), one dtype, then ``load``
    (diffusers' ``from_pretrained``) with a config that does not fit its weights named."""
    from .registry import entry_for_class_name, pipeline_for

    class_name = check_folder(path)
    entry = entry_for_class_name(class_name)
    if cls.family and (entry is None or entry.family != cls.family):
        right = None if entry is None else pipeline_for(entry.family, _kind_of(cls))
        hint = f"use stepdiff.{right.name}" if right is not None else "this family is not supported"
        raise ValueError(
            f"{str(path)!r} holds a {class_name!r} model, which {cls.__name__} cannot load: {hint} (or "
            "AutoPipelineForText2Image)"
        )
    _check_weights(Path(path), allow_pickle)
    if "torch_dtype" not in kwargs and "dtype" not in kwargs:
        # One dtype for every component: transformers would otherwise keep the stored dtype (fp16 for
        # the shipped model) while diffusers upcasts, and the text encoder and UNet would disagree.
        # ``dtype``, diffusers' current name: a caller's ``torch_dtype`` gets diffusers' own deprecation warning.
        import torch

        kwargs["dtype"] = torch.float32
    if allow_pickle:
        kwargs.setdefault("use_safetensors", None)  # diffusers: safetensors where present, else .bin
    else:
        kwargs.setdefault("use_safetensors", True)
    try:
        return load(path, **kwargs)
    except (ValueError, RuntimeError) as e:
        raise _explain_mismatch(Path(path), e) from e
