"""Writing images: atomically, with metadata other tools read (A1111 'parameters' text + JSON)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, PngImagePlugin

__all__ = ["a1111_parameters", "atomic_write", "check_writable_dir", "next_free_path", "save_png"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write whole or not at all: ``write(file)`` into a temporary file in the same folder, then an
    atomic rename. The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def a1111_parameters(prompt: str, negative: str | None, fields: dict[str, Any]) -> str:
    """The 'parameters' text chunk as the popular web UIs write it."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: str, record: dict[str, Any]) -> Path:
    """A PNG with a 'parameters' text chunk and a 'stepdiff' JSON chunk, written atomically."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("stepdiff", json.dumps(record, sort_keys=True))
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def check_writable_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what}: folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{what}: {str(path)!r} is not a folder")
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{what}: folder {str(path)!r} is not writable")


def next_free_path(folder: Path, stem: str, count: int) -> list[Path]:
    """``count`` paths stem-00001.png, ... that don't exist yet: nothing already produced is overwritten."""
    n, out = 1, []
    while len(out) < count:
        candidate = folder / f"{stem}-{n:05d}.png"
        if not candidate.exists():
            out.append(candidate)
        n += 1
    return out
