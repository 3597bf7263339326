"""What ``--model`` names (a folder, a single file or a hub id) as a local path, and ``from_single_file``'s
keyword arguments for loading a checkpoint with no hub."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

from .folder import config_folder
from .header import _EXPECTED, _FAMILY_NAME, PICKLE_SUFFIXES, _where, inspect

__all__ = ["download_hub_id", "is_hub_id", "offline_kwargs", "resolve_model"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def offline_kwargs(path: str | os.PathLike, pipeline_class: type, kwargs: dict[str, Any],
                   allow_pickle: bool = False) -> tuple[dict[str, Any], list[str]]:
    """``from_single_file``'s keyword arguments for loading ``path`` with no hub: ``config=`` the derived folder,
    SD3's T5 left out where no ``tokenizer_3`` is given (the notes say so). Checks that the file's family is the
    class's before anything loads."""
    info = inspect(path, allow_pickle)
    family = getattr(pipeline_class, "family", "")
    if family and family != info.family:
        from ..pipelines.registry import REGISTRY, pipeline_for

        kind = next((e.kind for e in REGISTRY if e.name == pipeline_class.__name__), "text2image")
        right = pipeline_for(info.family, kind) or pipeline_for(info.family, "text2image")
        raise ValueError(
            f"{_where(info.path)} is an {_FAMILY_NAME[info.variant]} checkpoint, which {pipeline_class.__name__} cannot "
            f"load: use stepdiff.{right.name if right else 'AutoPipelineForText2Image'}"
        )
    kwargs = dict(kwargs)
    notes: list[str] = []
    kwargs["config"] = str(config_folder(info.path, allow_pickle))
    if info.variant == "sd3" and kwargs.get("tokenizer_3") is None:
        if info.has_t5 and "text_encoder_3" not in kwargs:
            notes.append(
                f"{info.path.name}: SD3's T5 text encoder is left out (its SentencePiece tokenizer is not available "
                "offline); prompts are encoded by CLIP-L and CLIP-G only. Pass tokenizer_3= (a T5TokenizerFast) to "
                "use the file's T5, or load a model folder"
            )
        kwargs.setdefault("text_encoder_3", None)
        kwargs["tokenizer_3"] = None
    return kwargs, notes


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a hub repo id (``owner/name``) rather than a local path."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "~")) and ".." not in text


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _root_cause(e: BaseException) -> str:
    """The first error in the chain (a refused connection, a DNS failure), in a few words."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return f"{type(e).__name__}: {_one_line(e)[:120]}"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_hub_id(repo_id: str, allow_pickle: bool = False) -> Path:
    """A hub id's snapshot folder, through diffusers' own ``DiffusionPipeline.download`` (the classic loader's first
    step): from the network when there is one, from the local hub cache when offline. Clear errors otherwise."""
    from diffusers import DiffusionPipeline

    offline = _hub_offline()
    local = ("give a local model folder (model_index.json plus one folder per component) or a single-file "
             ".safetensors checkpoint instead")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folder = DiffusionPipeline.download(repo_id, local_files_only=offline,
                                                use_safetensors=None if allow_pickle else True)
    except Exception as e:  # huggingface_hub, requests/httpx and diffusers each raise their own
        name = type(e).__name__
        if offline:
            raise OSError(
                f"{repo_id!r} is not a local folder or file; as a hub id it needs the hub, and stepdiff is offline here "
                f"(HF_HUB_OFFLINE=1) with no copy of it in the local hub cache; run with HF_HUB_OFFLINE=0 where the hub "
                f"is reachable, or {local}"
            ) from None
        if "NotFound" in name or "GatedRepo" in name or "401" in str(e) or "404" in str(e):
            raise FileNotFoundError(f"{repo_id!r} is not a model on the hub that can be downloaded ({name}); {local}") from None
        if "safetensors" in str(e).lower() and not allow_pickle:
            raise OSError(f"{repo_id!r} on the hub has no safetensors weights ({_one_line(e)}); stepdiff loads only "
                          "safetensors by default: pass --allow-pickle if you trust its pickle files") from None
        raise OSError(
            f"{repo_id!r} is not a local folder or file; as a hub id it needs the hub, which could not be reached "
            f"({_root_cause(e)}); "
            f"{local}, or set HF_HUB_OFFLINE=1 to use the local hub cache"
        ) from None
    return Path(folder)


def resolve_model(path: str | os.PathLike, allow_pickle: bool = False) -> Path:
    """What ``--model`` names, as a local path: a model folder (checked), a single-file checkpoint (its header
    checked), or a hub id's downloaded snapshot folder. Clear errors for everything else."""
    from ..pipelines.folders import check_folder

    path = Path(path)
    text = str(path)
    if path.is_dir():
        check_folder(path)
        return path
    if path.is_file():
        if path.suffix.lower() == ".safetensors" or path.suffix.lower() in PICKLE_SUFFIXES:
            inspect(path, allow_pickle)
            return path
        raise ValueError(f"{text!r} is neither a model folder nor a .safetensors file; {_EXPECTED}")
    if path.exists():
        raise ValueError(f"{text!r} is not a folder or a file")
    if is_hub_id(text):
        folder = download_hub_id(text, allow_pickle)
        check_folder(folder)
        return folder
    raise FileNotFoundError(
        f"{text!r} is not a folder, a .safetensors file or a hub id (owner/name): it does not exist; give a model "
        "folder (model_index.json plus one folder per component) or a single-file .safetensors checkpoint"
    )
