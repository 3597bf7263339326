"""What ``stepdiff serve`` offers: one model (``--model``) or every model folder in ``--models DIR``, at most
``--max-loaded`` of them in memory; the LoRA files of ``--loras DIR``; a ControlNet (``--controlnet``, or the
shipped one for the shipped model); an IP-Adapter (``--ip-adapter``). Builds the ``PipelinePool`` a ``Studio`` runs on."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .pool import IP_ADAPTER_WEIGHTS, PipelinePool, find_loras, find_models

__all__ = ["open_catalog"]


def open_catalog(model: Path, *, models: Path | None = None, loras: Path | None = None,
                 controlnet: Path | None = None, ip_adapter: Path | None = None, max_loaded: int = 2,
                 device: str = "cpu", dtype: str = "float32",
                 loader: Any = None, max_steps: int = 500) -> tuple[Any, PipelinePool, Any]:
    """``(default pipeline, pool, limits)``. With ``models``, the default is ``model`` when it is one of them, else
    the first by name; it is loaded now and the others on first use. Problems name the flag (ValueError)."""
    from .server import limits_for

    if loader is None:
        from ..loading import load_pipeline as loader

    def load(folder: Path) -> Any:
        pipe = loader(folder, dtype)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    if models is not None:
        if not models.is_dir():
            raise ValueError(f"--models {str(models)!r} is not a folder")
        folders = find_models(models)
        if not folders:
            raise ValueError(f"--models {str(models)!r} holds no model folder (a folder with a model_index.json)")
        default = next((n for n, f in folders.items() if f.resolve() == Path(model).resolve()), next(iter(folders)))
    else:
        folders = {Path(model).name: Path(model)}
        default = Path(model).name
    if max_loaded < 1:
        raise ValueError(f"--max-loaded must be >= 1, got {max_loaded}")
    found_loras: dict[str, Path] = {}
    if loras is not None:
        if not loras.is_dir():
            raise ValueError(f"--loras {str(loras)!r} is not a folder")
        found_loras = find_loras(loras)
    if controlnet is not None and not (controlnet / "config.json").is_file():
        raise ValueError(f"--controlnet {str(controlnet)!r} is not a ControlNet folder (it has no config.json)")
    if ip_adapter is not None and not ((ip_adapter / IP_ADAPTER_WEIGHTS).is_file()
                                       and (ip_adapter / "image_encoder" / "config.json").is_file()):
        raise ValueError(f"--ip-adapter {str(ip_adapter)!r} is not an IP-Adapter folder (it needs "
                         f"{IP_ADAPTER_WEIGHTS} and image_encoder/config.json)")
    pipe = load(folders[default])
    pool = PipelinePool(folders, default, load, max_loaded=max_loaded, controlnet=controlnet, loras=found_loras,
                        preloaded={default: pipe}, ip_adapter=ip_adapter)
    limits = replace(limits_for(folders[default], max_steps), models=tuple(folders) if models is not None else (),
                     loras=tuple(found_loras))
    return pipe, pool, limits
