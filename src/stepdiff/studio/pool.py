"""The studio's pipelines: the served models (at most ``max_loaded`` in memory, least recently used unloaded), the
views a job runs on, and the LoRA sets applied to them.

A *view* is a pipeline of the kind a job needs (text to image, image to image, inpainting, each with or without a
ControlNet) with the job's scheduler, built on the loaded model's modules: nothing is copied or loaded again.

LoRA scheduling. A LoRA changes the denoiser's modules, which every view of a model shares, so two jobs with
different LoRA sets must never run on one model at the same time. Each loaded model has a gate: the jobs that hold
it all use the same LoRA set (``()`` for none). A job whose set differs waits until the model's running jobs have
finished, then its set is applied (``load_lora_weights`` once per file, then ``set_adapters`` with the job's
scales, or ``disable_lora`` for none) and it runs; jobs with the set already applied go in at once. With one
worker (the default) jobs simply run in queue order; with several, jobs of the same set run side by side and a
job with another set waits for them (so a steady stream of one set can hold another back until the queue drains
of it: the queue is FIFO, so at most the jobs already started go first). A model that holds running jobs is never
unloaded: a job that needs another model while ``max_loaded`` models are busy waits for one to be free.

The IP-Adapter (``--ip-adapter``) goes through the same gate: loaded, it replaces the denoiser's attention processors
and every run of the model then needs an IP-Adapter image, so it is part of the gate's key. A job with an
``ip_adapter_image`` waits for the model's other jobs, then the adapter is loaded (``load_ip_adapter``); a job without
one waits for the IP-Adapter jobs, then it is unloaded (``unload_ip_adapter``). Switching reads the adapter's file
again: a stream of mixed jobs pays that each time the kind changes.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["IP_ADAPTER_WEIGHTS", "LoadedModel", "PipelinePool", "find_loras", "find_models"]

LORA_SUFFIXES = (".safetensors",)
IP_ADAPTER_WEIGHTS = "ip-adapter.safetensors"  # in the --ip-adapter folder, with image_encoder/


def find_models(folder: Path) -> dict[str, Path]:
    """Every model folder (one with a model_index.json) directly in ``folder``, by name, sorted."""
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "model_index.json").is_file()}


def find_loras(folder: Path) -> dict[str, Path]:
    """Every LoRA in ``folder``: a ``.safetensors`` file (named by its stem) or a folder holding
    ``pytorch_lora_weights.safetensors`` (named by the folder), sorted by name."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in LORA_SUFFIXES:
            found[p.stem] = p
        elif p.is_dir() and (p / "pytorch_lora_weights.safetensors").is_file():
            found[p.name] = p
    return found


@dataclass
class LoadedModel:
    name: str
    folder: Path
    pipe: Any
    controlnet: Any = None  # loaded on first use
    users: int = 0  # jobs running on it now
    lora_key: tuple = ()  # the LoRA set applied: ((name, scale), ...)
    ip: bool = False  # the IP-Adapter (--ip-adapter) loaded into it
    adapters: set[str] = field(default_factory=set)  # LoRA files loaded into it
    views: dict[tuple, Any] = field(default_factory=dict)


class PipelinePool:
    """Thread-safe. ``loader(folder) -> pipeline`` loads a model; ``preloaded`` are models already in memory."""

    def __init__(self, folders: dict[str, Path], default: str, loader: Callable[[Path], Any], *, max_loaded: int = 1,
                 controlnet: Path | None = None, loras: dict[str, Path] | None = None,
                 preloaded: dict[str, Any] | None = None, ip_adapter: Path | None = None) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        self.folders, self.default, self.loader, self.max_loaded = folders, default, loader, max_loaded
        self.controlnet_folder = controlnet
        self.ip_adapter_folder = ip_adapter
        self.loras = loras or {}
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._cond = threading.Condition()
        self.loads = 0
        self.unloads = 0
        for name, pipe in (preloaded or {}).items():
            self._loaded[name] = LoadedModel(name, folders[name], pipe)

    @property
    def names(self) -> list[str]:
        return list(self.folders)

    def loaded(self) -> list[str]:
        with self._cond:
            return list(self._loaded)

    def peek(self, name: str | None = None) -> LoadedModel | None:
        """The loaded model ``name`` (default: the default model) if it is in memory, without using it."""
        with self._cond:
            return self._loaded.get(name or self.default)

    @contextlib.contextmanager
    def use(self, name: str | None, loras: list[dict[str, Any]] | None = None,
            ip_adapter: bool = False) -> Iterator[LoadedModel]:
        """The model ``name`` loaded, with the LoRA set ``loras`` applied and the IP-Adapter loaded or not
        (``ip_adapter``), held for the length of the block."""
        name = name or self.default
        key = tuple((lora["name"], float(lora["scale"])) for lora in loras or [])
        model = self._acquire(name, key, ip_adapter)
        try:
            yield model
        finally:
            with self._cond:
                model.users -= 1
                self._cond.notify_all()

    def _acquire(self, name: str, key: tuple, ip: bool = False) -> LoadedModel:
        with self._cond:
            while True:
                model = self._loaded.get(name)
                if model is not None:
                    if model.users == 0 or (model.lora_key == key and model.ip == ip):
                        break
                elif len(self._loaded) < self.max_loaded or any(m.users == 0 for m in self._loaded.values()):
                    model = self._load(name)
                    break
                self._cond.wait()
            self._loaded.move_to_end(name)
            if model.lora_key != key:  # nobody runs on it (checked above): the modules are ours to change
                self._apply_loras(model, key)
            if model.ip != ip:
                self._apply_ip_adapter(model, ip)
            model.users += 1
            return model

    def _load(self, name: str) -> LoadedModel:
        """Under the lock: make room (unload the least recently used idle models), then load ``name``."""
        while len(self._loaded) >= self.max_loaded:
            victim = next(n for n, m in self._loaded.items() if m.users == 0)
            del self._loaded[victim]
            self.unloads += 1
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        model = LoadedModel(name, self.folders[name], self.loader(self.folders[name]))
        self.loads += 1
        self._loaded[name] = model
        return model

    def _apply_loras(self, model: LoadedModel, key: tuple) -> None:
        pipe = model.pipe
        for name, _ in key:
            if name not in model.adapters:
                pipe.load_lora_weights(str(self.loras[name]), adapter_name=name)
                model.adapters.add(name)
        if key:
            pipe.set_adapters([n for n, _ in key], adapter_weights=[s for _, s in key])
        elif model.adapters:
            pipe.disable_lora()
        model.lora_key = key

    def _apply_ip_adapter(self, model: LoadedModel, on: bool) -> None:
        """Load the IP-Adapter into ``model`` (its attention processors and image encoder), or unload it: a model
        with an IP-Adapter loaded needs an IP-Adapter image for every run, so only jobs with one run on it then."""
        if on:
            if self.ip_adapter_folder is None:
                raise ValueError("this server has no IP-Adapter (start it with --ip-adapter DIR)")
            model.pipe.load_ip_adapter(str(self.ip_adapter_folder), subfolder="", weight_name=IP_ADAPTER_WEIGHTS)
        else:
            model.pipe.unload_ip_adapter()
        model.ip = on
        model.views = {k: v for k, v in model.views.items() if not k[-1]}  # they hold the image encoder unloaded

    def controlnet_for(self, model: LoadedModel) -> Any:
        """The ControlNet of ``model`` (``--controlnet``, else the shipped one for the shipped model), loaded once."""
        if model.controlnet is None:
            from diffusers import ControlNetModel

            folder = self.controlnet_folder or shipped_controlnet_for(model.folder)
            if folder is None:
                raise ValueError("this server has no ControlNet for its model (start it with --controlnet DIR)")
            unet = getattr(model.pipe, "unet", None)
            dtype = unet.dtype if unet is not None else None
            net = ControlNetModel.from_pretrained(folder, **({"torch_dtype": dtype} if dtype is not None else {}))
            if unet is not None:
                net.to(unet.device)
            model.controlnet = net
        return model.controlnet

    def view(self, model: LoadedModel, scheduler: str | None, kind: str, control: bool) -> Any:
        """The pipeline of ``kind`` (with a ControlNet when ``control``) and ``scheduler`` on ``model``'s modules."""
        with self._cond:
            key = (scheduler, kind, control, model.ip)
            pipe = model.views.get(key)
        if pipe is not None:
            return pipe
        pipe = make_view(model.pipe, scheduler, kind, self.controlnet_for(model) if control else None)
        with self._cond:
            return model.views.setdefault(key, pipe)


def shipped_controlnet_for(folder: Path) -> Path | None:
    """The shipped ControlNet when ``folder`` is the shipped model, else None."""
    from ..models import default_controlnet, default_model

    try:
        return default_controlnet() if Path(folder).resolve() == default_model().resolve() else None
    except FileNotFoundError:
        return None


def make_view(base: Any, scheduler: str | None, kind: str, controlnet: Any) -> Any:
    """A pipeline of ``kind`` over ``base``'s modules (plus ``controlnet``), with its own scheduler object."""
    from ..pipelines.registry import entry_for_class_name, load, pipeline_for
    from ..schedulers import make_scheduler

    entry = entry_for_class_name(type(base).__name__)
    target = None if entry is None else pipeline_for(entry.family, kind, controlnet=controlnet is not None)
    if target is None:
        what = f"{kind} with a ControlNet" if controlnet is not None else kind
        raise ValueError(f"{type(base).__name__} has no {what} pipeline in stepdiff")
    cls = load(target)
    expected, optional = cls._get_signature_keys(cls)
    parts = {k: v for k, v in base.components.items() if k in expected or k in optional}
    parts["scheduler"] = make_scheduler(scheduler, base.scheduler.config) if scheduler is not None \
        else type(base.scheduler).from_config(base.scheduler.config)
    if controlnet is not None:
        parts["controlnet"] = controlnet
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
