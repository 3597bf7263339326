"""The studio's job fields for pictures, counts, models and LoRAs, and the steer fields beyond guidance: one small
validator per field, each raising ``FieldError(field, value, allowed)``.

Named as the CLI flags (``init_image``, ``strength``, ``mask``, ``control``, ``control_scale``, ``control_end``,
``num_images``), and as the pipelines' arguments (``ip_adapter_image``, ``ip_adapter_scale``: ``serve --ip-adapter``).
A picture field holds the id of an upload (``POST /api/uploads``); what depends on the picture
itself (its size against the model's, the mask's size against the init image's) is checked when the job is
submitted (``Studio.check``), before any model work. The validators the CLI shares live in ``stepdiff.request``;
the studio's own (uploads, models, LoRAs, the IP-Adapter steer) are here, one per field.
"""

from __future__ import annotations

import re
from typing import Any

from ..request import (
    FieldError,
    _real,
    check_control_end,
    check_control_scale,
    check_num_images,
    check_strength,
    default_strength,
)

__all__ = ["MAX_IMAGES", "MAX_LORAS", "check_ip_adapter_scale", "check_lora_list", "check_model_name",
           "check_upload_id", "parse_inputs"]

MAX_IMAGES = 8  # images of one job (one run, one batch of rows)
MAX_IP_ADAPTER_SCALE = 10.0
MAX_LORAS = 8
MAX_LORA_SCALE = 10.0
UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")


def check_upload_id(name: str, value: Any) -> str:
    """``init_image``, ``mask``, ``control``: an upload's id (``POST /api/uploads`` answers it)."""
    if not isinstance(value, str) or not UPLOAD_ID.match(value):
        raise FieldError(name, value, "the id of an upload (POST /api/uploads): 32 hexadecimal characters")
    return value


def check_ip_adapter_scale(value: Any) -> float:
    return _real(value, "ip_adapter_scale", 0.0, MAX_IP_ADAPTER_SCALE)


def check_model_name(value: Any, names: list[str]) -> str:
    """``model``: one of the folders the server offers (``GET /api/models``)."""
    allowed = f"one of the served models: {', '.join(names)}" if names else "left out (this server serves one model)"
    if not isinstance(value, str) or value not in names:
        raise FieldError("model", value, allowed)
    return value


def check_lora_list(value: Any, names: list[str]) -> list[dict[str, Any]]:
    """``loras``: ``[{"name": ..., "scale": ...}, ...]``, names from ``GET /api/loras``, each at most once."""
    offered = f"one of: {', '.join(names)}" if names else "none: this server offers no LoRAs (start it with --loras DIR)"
    if not isinstance(value, list) or len(value) > MAX_LORAS:
        raise FieldError("loras", value, f'a list of at most {MAX_LORAS} objects {{"name": ..., "scale": ...}}')
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"name", "scale"} or "name" not in item:
            raise FieldError(f"loras[{i}]", item, 'an object {"name": NAME, "scale": S} (scale optional, default 1)')
        name = item["name"]
        if not isinstance(name, str) or not _NAME.match(name) or name not in names:
            raise FieldError(f"loras[{i}].name", name, offered)
        if any(o["name"] == name for o in out):
            raise FieldError(f"loras[{i}].name", name, "each LoRA at most once")
        scale = 1.0 if item.get("scale") is None else _real(item["scale"], f"loras[{i}].scale", -MAX_LORA_SCALE,
                                                             MAX_LORA_SCALE)
        out.append({"name": name, "scale": scale})
    return out


def parse_inputs(body: dict[str, Any], spec: Any, limits: Any) -> None:
    """The picture, count, model and LoRA fields of a job onto ``spec`` (a ``JobSpec`` whose other fields are parsed),
    with the CLI's rules between them."""
    from ..limits import MAX_SEED

    get = body.get
    if get("init_image") is not None:
        spec.init_image = check_upload_id("init_image", get("init_image"))
        for name in ("size", "width", "height"):
            if get(name) is not None:
                raise FieldError(name, get(name), "left out with init_image (the picture's size is the output size)")
    if get("mask") is not None:
        spec.mask = check_upload_id("mask", get("mask"))
        if spec.init_image is None:
            raise FieldError("mask", spec.mask, "given with init_image (the picture whose masked part is re-drawn)")
    if get("strength") is not None:
        if spec.init_image is None:
            raise FieldError("strength", get("strength"), "left out without init_image (strength is how much of "
                                                           "init_image is re-drawn)")
        spec.strength = check_strength(get("strength"))
    if spec.init_image is not None:
        if spec.strength is None:
            spec.strength = default_strength(spec.mask)
        if int(spec.steps * spec.strength) < 1:
            raise FieldError("strength", spec.strength, f"at least 1/steps = {1 / spec.steps:g} with steps "
                             f"{spec.steps} (int(steps x strength) steps run; 0 would leave no denoising step)")
    if get("control") is not None:
        spec.control = check_upload_id("control", get("control"))
        if spec.mask is not None:
            raise FieldError("control", spec.control, "left out with mask (ControlNet inpainting is not supported, "
                                                      "as with the CLI's --control and --mask)")
    for name, check in (("control_scale", check_control_scale), ("control_end", check_control_end)):
        if get(name) is not None:
            if spec.control is None:
                raise FieldError(name, get(name), "left out without control (the control picture)")
            setattr(spec, name, check(get(name)))
    if spec.control is not None:
        spec.control_scale = 1.0 if spec.control_scale is None else spec.control_scale
        spec.control_end = 1.0 if spec.control_end is None else spec.control_end
    if get("ip_adapter_image") is not None:
        spec.ip_adapter_image = check_upload_id("ip_adapter_image", get("ip_adapter_image"))
    if get("ip_adapter_scale") is not None:
        if spec.ip_adapter_image is None:
            raise FieldError("ip_adapter_scale", get("ip_adapter_scale"), "left out without ip_adapter_image")
        spec.ip_adapter_scale = check_ip_adapter_scale(get("ip_adapter_scale"))
    if spec.ip_adapter_image is not None and spec.ip_adapter_scale is None:
        spec.ip_adapter_scale = 1.0
    if get("num_images") is not None:
        spec.num_images = check_num_images(get("num_images"), most=MAX_IMAGES)
        if spec.seed + spec.num_images - 1 > MAX_SEED:
            raise FieldError("num_images", spec.num_images, f"at most {MAX_SEED - spec.seed + 1} with seed {spec.seed} "
                             "(image k has seed + k - 1, at most 2**64-1)")
    if get("model") is not None:
        spec.model = check_model_name(get("model"), list(limits.models))
    if get("loras") is not None:
        spec.loras = check_lora_list(get("loras"), list(limits.loras))
