"""The model that ships in the package."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_CONTROLNET_NAME", "DEFAULT_MODEL_NAME", "default_controlnet", "default_model"]

DEFAULT_MODEL_NAME = "shapes-v2"
# The ControlNet trained for the shipped model (condition: the shape's silhouette, white on black).
DEFAULT_CONTROLNET_NAME = "shapes-control-v1"


def default_model() -> Path:
    """Folder of the shipped shapes model: ``AutoPipelineForText2Image.from_pretrained(default_model())``."""
    folder = Path(__file__).parent / DEFAULT_MODEL_NAME
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the shipped model is missing from {folder}; reinstall stepdiff, or pass a model folder "
            "(train one with: python -m tools.train_shapes --out DIR, in a source checkout)"
        )
    return folder


def default_controlnet() -> Path:
    """Folder of the shipped ControlNet for the shipped model: ``ControlNetModel.from_pretrained(default_controlnet())``.

    Its control image is the shape's silhouette, white on black, at the output size
    (``stepdiff.shapes.dataset.silhouette``).
    """
    folder = Path(__file__).parent / DEFAULT_CONTROLNET_NAME
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped ControlNet is missing from {folder}; reinstall stepdiff, or pass a ControlNet folder "
            "(train one with: python -m tools.train_control --base MODEL --out DIR, in a source checkout)"
        )
    return folder
