"""Reading a single-file checkpoint's header: every tensor's shape and the file's metadata, its key layout's
family and variant, and a clear error for a file that is not a whole SD 1.x/2.x, SDXL or SD3 checkpoint."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PICKLE_SUFFIXES", "SingleFile", "inspect", "read_shapes"]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_UNET = "model.diffusion_model."
_FAMILY_OF = {"v1": "sd", "v2": "sd", "xl": "sdxl", "sd3": "sd3"}
_FAMILY_NAME = {"v1": "SD 1.x", "v2": "SD 2.x", "xl": "SDXL", "sd3": "SD3"}
_EXPECTED = (
    "expected a Stable Diffusion checkpoint in the original single-file layout: SD 1.x/2.x (model.diffusion_model.*, "
    "first_stage_model.*, cond_stage_model.*), SDXL (conditioner.embedders.*) or SD3 (model.diffusion_model."
    "joint_blocks.*, text_encoders.*)"
)


@dataclass
class SingleFile:
    """What a checkpoint's header says: its key layout's family and variant, and every tensor's shape."""

    path: Path
    variant: str  # "v1" (SD 1.x), "v2" (SD 2.x), "xl" (SDXL), "sd3"
    shapes: dict[str, tuple[int, ...]] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def family(self) -> str:
        return _FAMILY_OF[self.variant]

    @property
    def has_t5(self) -> bool:
        return any(k.startswith("text_encoders.t5xxl.") for k in self.shapes)


def _where(path: str | os.PathLike) -> str:
    return repr(str(path))


def read_shapes(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every tensor's name and shape, and the file's metadata, from the header alone (a pickle checkpoint, only with
    ``allow_pickle``, is read with ``torch.load(weights_only=True, mmap=True)``)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise OSError(
                f"{_where(path)} is a pickle checkpoint, which can run code when loaded; stepdiff loads only safetensors "
                "by default. Pass allow_pickle=True (CLI: --allow-pickle) if you trust this file, or convert it to "
                ".safetensors"
            )
        import torch

        try:
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise ValueError(f"{_where(path)} is not a readable checkpoint ({' '.join(str(e).split())[:200]}); "
                             f"{_EXPECTED}") from None
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{_where(path)} holds a {type(state).__name__}, not a dict of tensors; {_EXPECTED}")
        return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}, {}
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{_where(path)} is neither a model folder nor a .safetensors file; {_EXPECTED}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{_where(path)} is not a readable .safetensors file ({' '.join(str(e).split())[:200]}); "
                         f"{_EXPECTED}") from None
    return shapes, metadata


def _other_kind(keys: list[str]) -> str | None:
    """What a file that is not a whole SD/SDXL/SD3 checkpoint holds, where its keys say."""
    def some(*parts: str) -> bool:
        return any(any(p in k for p in parts) for k in keys)

    if some("lora_unet_", "lora_te", ".lora_down.", ".lora_A.", "lora.down"):
        return "a LoRA (load it onto a model with load_lora_weights)"
    if some("control_model.", "controlnet_cond_embedding"):
        return "a ControlNet (pass it with --controlnet / controlnet=, a ControlNet folder)"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "a FLUX model, which stepdiff does not run"
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.")) for k in keys):
        return "a VAE alone, not a whole model"
    if any(k.startswith(("down_blocks.", "transformer_blocks.")) for k in keys):
        return "one diffusers-format model's weights (a UNet or transformer alone), not a whole model"
    if some("string_to_param", "emb_params"):
        return "a textual-inversion embedding (load it with load_textual_inversion)"
    return None


def _variant(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    keys = list(shapes)
    if _UNET + "joint_blocks.0.x_block.attn.qkv.weight" in shapes:
        variant = "sd3"
    elif _UNET + "input_blocks.0.0.weight" in shapes:
        if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
            variant = "xl"
        elif any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            raise ValueError(f"{_where(path)} is an SDXL refiner (one OpenCLIP text encoder, conditioner.embedders.0."
                             "model.*), which stepdiff does not load from a single file; use an SDXL base checkpoint")
        elif any(k.startswith("cond_stage_model.model.") for k in keys):
            variant = "v2"
        elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
            variant = "v1"
        elif any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
            raise ValueError(f"{_where(path)} holds an SDXL UNet and CLIP-L but not the second text encoder "
                             "(conditioner.embedders.1.model.*); " + _EXPECTED)
        else:
            raise ValueError(f"{_where(path)} holds a UNet (model.diffusion_model.*) but no text encoder "
                             "(cond_stage_model.* or conditioner.embedders.*), which stepdiff cannot load offline; "
                             "use a checkpoint that includes its text encoder, or a model folder")
    else:
        other = _other_kind(keys)
        sample = ", ".join(sorted(keys)[:3]) if keys else "no tensors at all"
        what = f"is {other}" if other else f"holds no model stepdiff knows (keys like {sample})"
        raise ValueError(f"{_where(path)} {what}; {_EXPECTED}")
    vae = _vae_prefix(shapes)
    if vae is None:
        raise ValueError(f"{_where(path)} holds an {_FAMILY_NAME[variant]} denoiser but no VAE (first_stage_model.*); "
                         "stepdiff loads single files that include their VAE")
    if variant == "sd3":
        missing = [name for name in ("clip_l", "clip_g") if not any(k.startswith(f"text_encoders.{name}.") for k in keys)]
        if missing:
            raise ValueError(
                f"{_where(path)} is an SD3 checkpoint without its CLIP text encoders ({', '.join(missing)} missing: "
                "text_encoders.clip_l.*, text_encoders.clip_g.*), which stepdiff cannot load offline; use a file "
                "that includes them (such as sd3_medium_incl_clips.safetensors) or a model folder"
            )
    return variant


@functools.lru_cache(maxsize=16)
def _inspect(path: str, mtime_ns: int, size: int, allow_pickle: bool) -> SingleFile:
    shapes, metadata = read_shapes(path, allow_pickle)
    return SingleFile(Path(path), _variant(Path(path), shapes), shapes, metadata)


def inspect(path: str | os.PathLike, allow_pickle: bool = False) -> SingleFile:
    """Read and check a single-file checkpoint's header: a clear ``ValueError`` (or ``OSError`` for a pickle file
    without ``allow_pickle``) naming the file and what was expected, before any weight loads."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError as e:
        raise FileNotFoundError(f"{_where(path)} cannot be read: {e.strerror or e}") from None
    if not path.is_file():
        raise IsADirectoryError(f"{_where(path)} is not a file")
    return _inspect(str(path), stat.st_mtime_ns, stat.st_size, allow_pickle)


def _vae_prefix(shapes: dict[str, tuple[int, ...]]) -> str | None:
    for prefix in ("first_stage_model.", "vae."):
        if prefix + "encoder.conv_in.weight" in shapes:
            return prefix
    return None
