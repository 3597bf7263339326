"""The model that ships in the package."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_CONTROLNET_NAME", "DEFAULT_MODEL_NAME", "default_controlnet", "default_model"]

DEFAULT_MODEL_NAME = "shapes-v3"
# The ControlNet trained for the shipped model (condition: the shape's silhouette, white on black).
DEFAULT_CONTROLNET_NAME = "shapes-control-v1"


def _shipped(name: str, marker: str, what: str, train: str) -> Path:
    """The package's folder ``name``, or a FileNotFoundError saying how to get one when its ``marker`` is missing."""
    folder = Path(__file__).parent / name
    if not (folder / marker).is_file():
        raise FileNotFoundError(
            f"the shipped {what} is missing from {folder}; reinstall stepdiff, or pass a {what} folder "
            f"(train one with: python -m {train}, in a source checkout)"
        )
    return folder


def default_model() -> Path:
    """Folder of the shipped shapes model: ``AutoPipelineForText2Image.from_pretrained(default_model())``."""
    return _shipped(DEFAULT_MODEL_NAME, "model_index.json", "model", "tools.train_shapes --out DIR")


def default_controlnet() -> Path:
    """Folder of the shipped ControlNet for the shipped model: ``ControlNetModel.from_pretrained(default_controlnet())``.

    Its control image is the shape's silhouette, white on black, at the output size
    (``stepdiff.shapes.dataset.silhouette``).
    """
    return _shipped(DEFAULT_CONTROLNET_NAME, "config.json", "ControlNet",
                    "tools.train_control --base MODEL --out DIR")
