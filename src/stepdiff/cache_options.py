"""Step caching as a user asks for it: ``--fast`` / ``--cache SPEC`` (generate, batch), a batch row's ``fast`` /
``cache``, a studio job's ``fast`` / ``cache``. Checked before any model loads; turned into the compute
policies of :mod:`stepdiff.caching` (callbacks) at run time.

The run start stays the authority (a policy refuses a pipeline it cannot serve); :func:`check_policies`
only says the same thing earlier, naming the flag or field, so that a bad setting costs no model load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .caching.presets import CACHE_GRAMMAR  # re-exported for the callers of this module

__all__ = ["CACHE_GRAMMAR", "cache_policies", "check_policies", "gate_step", "has_unet", "normalize_spec"]

def normalize_spec(spec: str) -> str:
    """``" DeepCache : 3 , tgate:10"`` -> ``"deepcache:3,tgate:10"`` (what is stored, hashed and shown)."""
    return ",".join(":".join(part.strip() for part in item.split(":")) for item in spec.split(",")).lower()


def cache_policies(fast: bool, cache: str | None, steps: int, name: str = "--cache") -> list[Any]:
    """The policies of a run: the ``--fast`` preset for ``steps`` denoising steps, or ``cache`` parsed
    (ValueError naming ``name``), or none."""
    from .caching import fast_preset, parse_cache_spec

    if fast:
        return fast_preset(steps)
    if cache is not None:
        return parse_cache_spec(cache, name=name)
    return []


def has_unet(folder: str | Path) -> bool:
    """Whether a model folder's (or single-file checkpoint's) denoiser is a UNet (SD 1.x/2.x, SDXL), from its layout
    only: no weights."""
    if Path(folder).is_file():
        from .single_file import config_folder

        folder = config_folder(folder)
    return not (Path(folder) / "transformer").is_dir()


def check_policies(policies: list[Any], name: str, unet: bool | None = None) -> None:
    """What the run start would refuse, said before any model work (``stepdiff.caching.check_policies``)."""
    from .caching import check_policies as check

    check(policies, name, unet)


def gate_step(policies: list[Any], num_steps: int) -> int | None:
    """The step from which a policy turns guidance off (T-GATE's gate, or the step after a ``CFGCutoffCallback``'s
    cutoff, such as the ``--fast`` preset's, over the run's ``num_steps`` model steps; None without either): a
    caller that sets the guidance scale of every step itself (the studio) keeps it off from there, as the
    library's loop does."""
    from .caching import TGateCallback
    from .callbacks import CFGCutoffCallback
    gates = [p.gate_step for p in policies if isinstance(p, TGateCallback)]
    gates += [p.cutoff_step_of(num_steps) + 1 for p in policies if isinstance(p, CFGCutoffCallback)]
    return min(gates) if gates else None
