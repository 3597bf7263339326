"""A submitted job checked against what the server has: its model, its scheduler, its caching and its pictures
(their uploads exist and their sizes fit), before it is queued; and its pictures read for the run."""

from __future__ import annotations

from typing import Any

from .execute import JobInputs
from .pool import shipped_controlnet_for
from .spec import FieldError, JobSpec
from .uploads import Uploads

__all__ = ["check_job", "check_pictures", "read_inputs"]


def check_job(studio: Any, spec: JobSpec) -> None:
    """What depends on the loaded model and the uploads, before a job is accepted."""
    try:
        studio.frames.check(spec.preview.method)
    except ValueError as e:
        raise FieldError("preview.method", spec.preview.method, "auto, linear or vae for this model "
                         f"({e})") from None
    check_pictures(studio, spec)
    if spec.scheduler is not None:
        from ..schedulers import make_scheduler

        try:
            make_scheduler(spec.scheduler, studio.pipeline.scheduler.config).set_timesteps(spec.steps)
        except ValueError as e:
            raise FieldError("steps", spec.steps, f"allowed by scheduler {spec.scheduler} ({e})") from None
    if spec.fast or spec.cache is not None:
        from ..cache_options import CACHE_GRAMMAR, cache_policies, check_policies

        name = "fast" if spec.fast else "cache"
        try:
            check_policies(cache_policies(spec.fast, spec.cache, spec.run_steps, name), name,
                           unet=hasattr(getattr(studio.pipeline, "unet", None), "up_blocks"))
        except ValueError as e:
            allowed = "false for this model" if spec.fast else f"{CACHE_GRAMMAR}, fbc or adaptive for this model"
            raise FieldError(name, spec.fast if spec.fast else spec.cache, allowed,
                             " ".join(str(e).split())) from None


def check_pictures(studio: Any, spec: JobSpec) -> None:
    """The job's pictures exist and fit: the init image's size becomes the output size (a multiple of the
    model's, within its limits), the mask has that size, the control picture the output size; a control
    picture needs a ControlNet for the model. Sets ``spec.width``/``height`` from the init image."""
    lim = studio.limits
    if spec.init_image is not None:
        init = studio.uploads.read("init_image", spec.init_image, "RGB")
        for side in init.size:
            if side % lim.size_multiple or not lim.min_size <= side <= lim.max_size:
                raise FieldError("init_image", spec.init_image, f"a picture whose sides are multiples of "
                                 f"{lim.size_multiple} in [{lim.min_size}, {lim.max_size}] for this model; this "
                                 f"one is {init.width}x{init.height}")
        spec.width, spec.height = init.size
    if spec.mask is not None:
        mask = studio.uploads.read("mask", spec.mask, "L")
        if mask.size != (spec.width, spec.height):
            raise FieldError("mask", spec.mask, f"a picture of init_image's size, {spec.width}x{spec.height}; "
                             f"this one is {mask.width}x{mask.height}")
    if spec.control is not None:
        control = studio.uploads.read("control", spec.control, "RGB")
        if control.size != (spec.width, spec.height):
            raise FieldError("control", spec.control, f"a picture of the output size, {spec.width}x{spec.height};"
                             f" this one is {control.width}x{control.height}")
        folder = studio.pool.folders[spec.model or studio.pool.default]
        if studio.pool.controlnet_folder is None and shipped_controlnet_for(folder) is None:
            raise FieldError("control", spec.control, "left out: this server has no ControlNet for its model "
                             "(start it with --controlnet DIR)")
    if spec.ip_adapter_image is not None:
        if getattr(studio.pool, "ip_adapter_folder", None) is None:
            raise FieldError("ip_adapter_image", spec.ip_adapter_image, "left out: this server has no IP-Adapter "
                             "(start it with --ip-adapter DIR)")
        studio.uploads.read("ip_adapter_image", spec.ip_adapter_image, "RGB")  # it exists and is a picture


def read_inputs(uploads: Uploads, spec: JobSpec) -> JobInputs:
    read = uploads.read
    return JobInputs(
        init=None if spec.init_image is None else read("init_image", spec.init_image, "RGB"),
        mask=None if spec.mask is None else read("mask", spec.mask, "L"),
        control=None if spec.control is None else read("control", spec.control, "RGB"),
        ip_image=None if spec.ip_adapter_image is None else read("ip_adapter_image", spec.ip_adapter_image, "RGB"),
    )

