"""What a batch row is: its fields (``FIELDS``), the defaults a row leaves a field to, one checked row with its
content key, and the error that names a bad row's line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..request import GenerationRequest

__all__ = ["FIELDS", "BatchDefaults", "BatchRow", "RowError"]

# The fields a JSONL object or a CSV header may name (aliases map onto them).
FIELDS = (
    "prompt", "negative_prompt", "seed", "steps", "width", "height", "size", "guidance_scale", "cfg_cutoff",
    "cfg_cutoff_step", "guidance_interval", "scheduler", "karras", "cache", "fast",
)
_ALIASES = {"negative": "negative_prompt", "guidance": "guidance_scale", "num_inference_steps": "steps"}


class RowError(ValueError):
    """A bad row: ``line`` is its line number in the input (1-based), ``str(e)`` says what and where."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source} line {line}: {message}")
        self.line = line
        self.reason = message


@dataclass(frozen=True)
class BatchDefaults:
    """What a row that leaves a field out gets (the CLI's flags). ``None``: the model's own value."""

    negative_prompt: str | None = None
    seed: int = 0  # a row without a seed gets seed + its index (0-based, data rows only)
    steps: int = 25
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    cfg_cutoff: float | None = None
    cfg_cutoff_step: int | None = None
    guidance_interval: tuple[float, float] | None = None
    scheduler: str | None = None
    karras: bool = False
    cache: str | None = None  # a step caching spec (stepdiff.caching.parse_cache_spec), normalized
    fast: bool = False  # the --fast preset (stepdiff.caching.fast_preset); not with cache


@dataclass(frozen=True)
class BatchRow:
    """One image to make. ``line`` is where it is in the input; ``index`` its place among the data rows."""

    line: int
    index: int
    prompt: str
    seed: int
    steps: int
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    cfg_cutoff: float | None = None
    cfg_cutoff_step: int | None = None
    guidance_interval: tuple[float, float] | None = None
    scheduler: str | None = None
    karras: bool = False
    cache: str | None = None
    fast: bool = False
    key: str = field(default="", compare=False)

    def params(self) -> dict[str, Any]:
        """The parameters that decide the image (what the key hashes, with the model). Step caching is named
        only when a row uses it, so the rows of a manifest written before it existed keep their keys."""
        params = {  # spelled out: dataclasses.asdict deep-copies, and planning a million rows calls this a million times
            "prompt": self.prompt, "seed": self.seed, "steps": self.steps, "width": self.width, "height": self.height,
            "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt, "cfg_cutoff": self.cfg_cutoff,
            "cfg_cutoff_step": self.cfg_cutoff_step,
            "guidance_interval": None if self.guidance_interval is None else list(self.guidance_interval),
            "scheduler": self.scheduler, "karras": self.karras,
        }
        if self.cache is not None:
            params["cache"] = self.cache
        if self.fast:
            params["fast"] = True
        return params

    def request(self) -> GenerationRequest:
        """The row as a request (for its guidance callbacks and its image's metadata)."""
        return GenerationRequest(
            prompt=self.prompt, negative_prompt=self.negative_prompt, seed=self.seed, steps=self.steps,
            width=self.width, height=self.height, guidance_scale=self.guidance_scale, cfg_cutoff=self.cfg_cutoff,
            cfg_cutoff_step=self.cfg_cutoff_step, guidance_interval=self.guidance_interval, scheduler=self.scheduler,
            karras=self.karras,
        )

    def group(self) -> tuple:
        """Rows with the same group can share one pipeline call (only prompt, negative prompt and seed differ)."""
        return (self.steps, self.width, self.height, self.guidance_scale, self.cfg_cutoff, self.cfg_cutoff_step,
                self.guidance_interval, self.scheduler, self.karras, self.cache, self.fast)

    @property
    def file_name(self) -> str:
        return f"{self.key[:20]}.png"


def _canonical(name: str) -> str:
    return _ALIASES.get(name, name)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
