"""The model that ships in the package."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_MODEL_NAME", "default_model"]

DEFAULT_MODEL_NAME = "shapes-v1"


def default_model() -> Path:
    """Folder of the shipped shapes model: ``AutoPipelineForText2Image.from_pretrained(default_model())``."""
    folder = Path(__file__).parent / DEFAULT_MODEL_NAME
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the shipped model is missing from {folder}; reinstall stepdiff, or pass a model folder "
            "(train one with: python -m tools.train_shapes --out DIR, in a source checkout)"
        )
    return folder
