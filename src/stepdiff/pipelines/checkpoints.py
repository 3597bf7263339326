"""``from_single_file``: one checkpoint file in the original key layout, loaded through diffusers with stepdiff's rules.

Kept apart from ``folders`` (which ``stepdiff.single_file`` may import for ``check_folder``): this module imports
``stepdiff.single_file`` for the offline configs, so ``folders`` stays free of that import."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .folders import _without_empty_fp32_note

__all__ = ["load_single_file"]


def load_single_file(cls: Any, path: str | os.PathLike, allow_pickle: bool, kwargs: dict[str, Any], load: Any) -> Any:
    """``StepDiffPipeline.from_single_file``: diffusers' ``FromSingleFileMixin.from_single_file`` (``load``: one
    checkpoint in the original key layout; ``config=`` a folder or repo with the configs), with ``from_pretrained``'s
    pickle rule: a ``.ckpt``/``.pt``/``.bin`` file is a pickle, which can run code when loaded, and is refused unless
    ``allow_pickle=True``. Only ``.safetensors`` and ``.gguf`` files load by default. Every model comes back in eval
    mode, as from ``from_pretrained`` (diffusers leaves a single-file T5 in training mode, with dropout on).

    Without ``config=`` (and ``original_config=``), a local SD 1.x/2.x, SDXL or SD3 file loads offline: the
    configs are derived from its tensor shapes and its family's conventions (``stepdiff.single_file``), the
    CLIP tokenizers are built from the CLIP vocabulary stepdiff ships; an SD3 file's T5 is left out (with a
    warning) unless ``tokenizer_3=`` is given. All models load in float32 unless ``torch_dtype`` says otherwise.
    """
    import warnings

    import torch

    name = str(path).split("?")[0].rstrip("/")
    if not allow_pickle and not name.endswith((".safetensors", ".gguf")):
        raise OSError(
            f"{str(path)!r} is not a .safetensors file: diffusers reads other single files as pickles, which can run "
            "code when loaded; stepdiff loads only safetensors by default. Pass allow_pickle=True to from_single_file "
            "if you trust this file"
        )
    if "config" not in kwargs and "original_config" not in kwargs and Path(name).exists():
        from ..single_file import offline_kwargs

        kwargs, notes = offline_kwargs(name, cls, kwargs, allow_pickle)
        for note in notes:
            warnings.warn(note, UserWarning, stacklevel=3)
    if "torch_dtype" not in kwargs and "dtype" not in kwargs:
        kwargs["torch_dtype"] = torch.float32  # as from_pretrained: one dtype for every component
    with _without_empty_fp32_note():
        pipe = load(str(path), **kwargs)
    for component in pipe.components.values():
        # diffusers leaves a single-file T5 (SD3's text_encoder_3) in training mode: its dropout would make
        # every prompt encode differently; from_pretrained sets every model to eval mode, and so do we
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe
