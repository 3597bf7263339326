"""A pipeline folder written as one single-file checkpoint in the original key layout, proven by diffusers' own
forward converters before it is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .ldm_layout import _clip_to_ldm, _open_clip_to_ldm, _sd3_transformer_to_ldm, _unet_to_ldm, _vae_to_ldm

__all__ = ["save_single_file"]

_State = dict[str, torch.Tensor]


def _component(folder: Path, name: str) -> tuple[_State, dict]:
    from safetensors.torch import load_file

    files = sorted((folder / name).glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"save_single_file: expected one .safetensors file in {folder / name}, found {len(files)}")
    return load_file(str(files[0])), json.loads((folder / name / "config.json").read_text())


class _Checkpoint:
    """The single file being built (``state``), and per component how diffusers converts it back (``back``) and the
    folder's weights it must give (``expected``)."""

    def __init__(self) -> None:
        self.state: _State = {}
        self.back: dict[str, Callable[[], _State]] = {}
        self.expected: dict[str, _State] = {}

    def prove(self) -> None:
        """The proof: diffusers' forward conversion gives back every weight of the folder, under its own name."""
        for name, convert in self.back.items():
            converted, want = convert(), self.expected[name]
            if converted.keys() != want.keys() or any(not torch.equal(converted[k], want[k]) for k in want):
                wrong = sorted(set(converted) ^ set(want)) or [k for k in want if not torch.equal(converted[k], want[k])]
                raise RuntimeError(f"save_single_file: diffusers does not convert the {name} back: {wrong[:5]}")


def _second_encoder(folder: Path, text_config: dict) -> _State:
    text_2, text_2_config = _component(folder, "text_encoder_2")
    if text_2_config["hidden_size"] == text_config["hidden_size"]:
        raise ValueError(
            f"save_single_file: both text encoders in {folder} are {text_config['hidden_size']} wide; diffusers' "
            "from_single_file tells CLIP-L from the second CLIP encoder by width only and would load the first "
            "encoder's weights into the second (make the folder with text_encoder_2_width=48)"
        )
    return text_2


def _add_unet(ckpt: _Checkpoint, folder: Path, text: _State, clip_prefix: str) -> None:
    """SD 1.x and SDXL: the UNet (``model.diffusion_model.*``) and CLIP-L."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint

    unet, unet_config = _component(folder, "unet")
    ckpt.state.update(_unet_to_ldm(unet, unet_config))
    ckpt.state.update(_clip_to_ldm(text, clip_prefix))
    ckpt.back["unet"] = lambda: convert_ldm_unet_checkpoint(ckpt.state, unet_config)
    ckpt.back["text_encoder"] = lambda: convert_ldm_clip_checkpoint(ckpt.state)
    ckpt.expected.update(unet=unet, text_encoder=_clip_to_ldm(text, ""))


def _add_open_clip(ckpt: _Checkpoint, text_2: _State) -> None:
    """SDXL's second text encoder, in OpenCLIP layout."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix = "conditioner.embedders.1.model."
    ckpt.state.update(_open_clip_to_ldm(text_2, prefix))
    ckpt.back["text_encoder_2"] = lambda: convert_open_clip_checkpoint(None, ckpt.state, prefix)


def _add_sd3(ckpt: _Checkpoint, folder: Path, text: _State, text_2: _State) -> None:
    """SD3: the MMDiT transformer, CLIP-L and CLIP-G, and T5 where the folder has one."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_sd3_t5_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    projection = text["text_projection.weight"]
    if projection.shape[0] != projection.shape[1] or not torch.equal(projection, torch.eye(projection.shape[0])):
        raise ValueError(
            f"save_single_file: CLIP-L's text_projection in {folder} is not the identity, which diffusers' "
            "from_single_file puts there for SD3 (make the folder with identity_text_projection=True)"
        )
    transformer, transformer_config = _component(folder, "transformer")
    ckpt.state.update(_sd3_transformer_to_ldm(transformer, transformer_config))
    ckpt.state.update(_clip_to_ldm(text, "text_encoders.clip_l.transformer."))
    ckpt.state.update(_clip_to_ldm(text_2, "text_encoders.clip_g.transformer."))
    ckpt.back["transformer"] = lambda: convert_sd3_transformer_checkpoint_to_diffusers(dict(ckpt.state))  # it pops
    ckpt.back["text_encoder"] = lambda: convert_ldm_clip_checkpoint(ckpt.state, "text_encoders.clip_l.transformer.")
    ckpt.back["text_encoder_2"] = lambda: convert_ldm_clip_checkpoint(ckpt.state, "text_encoders.clip_g.transformer.")
    ckpt.expected.update(transformer=transformer, text_encoder=text)
    if (folder / "text_encoder_3").is_dir():
        t5, _ = _component(folder, "text_encoder_3")
        # save_pretrained stores the tied input embedding once, as shared.weight; diffusers' single-file T5
        # loader does not re-tie, and would leave encoder.embed_tokens on the meta device
        t5.setdefault("encoder.embed_tokens.weight", t5["shared.weight"].clone())
        ckpt.state.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()})
        ckpt.back["text_encoder_3"] = lambda: convert_sd3_t5_checkpoint_to_diffusers(ckpt.state)
        ckpt.expected["text_encoder_3"] = t5


def save_single_file(folder: str | Path, path: str | Path) -> Path:
    """Write the SD, SDXL or SD3 pipeline folder ``folder`` (e.g. from ``make_tiny_sd``) as one ``.safetensors``
    file in the original single-file key layout that ``from_single_file`` reads: CompVis/LDM names for SD 1.x
    (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``), Stability's SGM
    names for SDXL (``conditioner.embedders.0.transformer.*`` for CLIP-L, ``conditioner.embedders.1.model.*`` in
    OpenCLIP layout for the second encoder), and SD3's (MMDiT ``joint_blocks``, ``text_encoders.clip_l``/``clip_g``
    /``t5xxl``). Load it back with ``Pipeline.from_single_file(path, config=folder)``, which takes configs,
    tokenizers and scheduler from the folder.

    The file is checked before it is written: diffusers' own converters must turn it back into exactly the folder's
    weights. Raises ``ValueError`` for folders that diffusers cannot load back from one file: SDXL/SD3 folders whose
    two CLIP encoders have the same width (diffusers tells them apart by width only, and would load the first
    encoder's weights into the second), and SD3 folders whose CLIP-L projection is not the identity (diffusers
    replaces it with the identity).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import save_file

    folder, path = Path(folder), Path(path)
    family = "sd3" if (folder / "transformer").is_dir() else "sdxl" if (folder / "text_encoder_2").is_dir() else "sd"
    ckpt = _Checkpoint()
    vae, vae_config = _component(folder, "vae")
    text, text_config = _component(folder, "text_encoder")
    ckpt.state.update(_vae_to_ldm(vae, vae_config))
    ckpt.back["vae"] = lambda: convert_ldm_vae_checkpoint(ckpt.state, vae_config)
    ckpt.expected["vae"] = vae
    text_2: _State = {}
    if family in ("sdxl", "sd3"):
        text_2 = _second_encoder(folder, text_config)
        ckpt.expected["text_encoder_2"] = text_2
    if family == "sd":
        _add_unet(ckpt, folder, text, "cond_stage_model.transformer.")
    elif family == "sdxl":
        _add_unet(ckpt, folder, text, "conditioner.embedders.0.transformer.")
        _add_open_clip(ckpt, text_2)
    else:
        _add_sd3(ckpt, folder, text, text_2)
    ckpt.prove()
    save_file({k: v.contiguous() for k, v in ckpt.state.items()}, str(path))
    return path
