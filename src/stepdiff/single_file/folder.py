"""The derived configs written as a weights-free diffusers folder (what ``from_single_file(config=...)`` reads),
with CLIP tokenizers built from the BPE vocabulary stepdiff ships."""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from .configs import derive_configs
from .header import SingleFile, inspect

__all__ = ["config_folder", "write_clip_tokenizer", "write_config_folder"]


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[str]]:
    """OpenAI's CLIP vocabulary and merges, built from the BPE file as CLIP's own tokenizer builds them."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    data = resources.files("stepdiff").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(data).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = [*byte_tokens, *(t + "</w>" for t in byte_tokens), *("".join(m.split()) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(out: str | os.PathLike, pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> Path:
    """A CLIP tokenizer folder (the released SD models' tokenizers: OpenAI's 49408-token BPE vocabulary, padded
    with ``pad_token``: ``<|endoftext|>`` for CLIP-L in SD 1.x, SDXL and SD3, ``!`` for the OpenCLIP encoders)."""
    from transformers import CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_bpe()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token=pad_token,
                                  model_max_length=model_max_length)
    tokenizer.save_pretrained(out)
    return out


_FOLDERS: dict[tuple, Path] = {}


def _remove_folders() -> None:
    for folder in _FOLDERS.values():
        shutil.rmtree(folder.parent, ignore_errors=True)


def write_config_folder(info: SingleFile, out: str | os.PathLike) -> Path:
    """The derived configs as a weights-free diffusers folder: what ``from_single_file(config=...)`` reads."""
    out = Path(out)
    configs = derive_configs(info)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(configs.pop("model_index"), indent=2))
    for name, config in configs.items():
        if name.startswith("tokenizer"):
            write_clip_tokenizer(out / name, **config)
            continue
        (out / name).mkdir(exist_ok=True)
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        (out / name / filename).write_text(json.dumps(config, indent=2))
    return out


def config_folder(path: str | os.PathLike, allow_pickle: bool = False) -> Path:
    """The derived config folder of a checkpoint, written once per process into a temporary folder (removed at
    exit): model_index.json, each component's config, the scheduler and the CLIP tokenizers."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
        key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = None
    folder = _FOLDERS.get(key)  # type: ignore[arg-type]
    if folder is None or not (folder / "model_index.json").is_file():
        info = inspect(resolved, allow_pickle)
        if not _FOLDERS:
            import atexit

            atexit.register(_remove_folders)
        folder = write_config_folder(info, Path(tempfile.mkdtemp(prefix="stepdiff-single-file-")) / "configs")
        _FOLDERS[key] = folder  # type: ignore[index]
    return folder
