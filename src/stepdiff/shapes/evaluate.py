"""Prompt adherence of a shapes model on the held-out split, judged from pixels."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..callbacks import CFGCutoffCallback
from .dataset import COLORS, SHAPES, caption, eval_pairs
from .judge import judge
from .varied import varied_caption

__all__ = ["evaluate", "evaluate_table", "format_breakdown", "format_table"]


def evaluate(
    pipe, guidance: float, steps: int = 25, seeds_per_combo: int = 9, batch: int = 24,
    callback: Any = None, desc: str = "eval", varied: bool = False, limit: int | None = None,
) -> dict[str, Any]:
    """Accuracy per attribute and all-three over the held-out (combo, seed) pairs (``limit``: the first N only, a
    quick check such as a benchmark's smoke run).

    ``varied``: each pair's prompt is a caption as people write it (:func:`~stepdiff.shapes.varied.varied_caption`,
    evaluation split, drawn from the pair's seed) instead of the canonical template; ``prompts`` lists them.

    Also: ``per_color`` (shape colour right, per requested colour), ``per_color_all`` and ``per_shape_all``
    (all three right, per requested colour / shape), ``per_shape`` (shape type right, per requested shape),
    ``per_combo`` (all three right, per held-out combination) and ``confusion`` (requested shape -> judged
    shape -> count; "none" when the judge finds no shape).
    """
    pairs = eval_pairs(seeds_per_combo)[:limit]
    tally = _Tally()
    model_rows = steps_done = 0
    started = time.perf_counter()
    pipe.set_progress_bar_config(disable=True)
    all_prompts = [varied_caption(combo, np.random.default_rng(seed), "eval") if varied else caption(*combo)
                   for combo, seed in pairs]
    for start in tqdm(range(0, len(pairs), batch), desc=desc, leave=False):
        chunk = pairs[start : start + batch]
        prompts = all_prompts[start : start + batch]
        generators = [torch.Generator(pipe.device).manual_seed(seed) for _, seed in chunk]
        out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   callback_on_step_end=callback)
        model_rows += out.record.model_rows
        steps_done += out.steps_completed * len(chunk)
        for ((color, shape, background), _), image in zip(chunk, out.images):
            tally.add(color, shape, background, judge(image))
    n = len(pairs)
    return {
        "n": n,
        **tally.rates(n),
        "model_rows": model_rows,
        "mean_steps": steps_done / n,
        "seconds": time.perf_counter() - started,
        "prompts": "varied" if varied else "canonical",
    }


class _Tally:
    """What ``evaluate`` counts: hits per attribute, [right, total] per colour, shape and combination, and the
    shape confusion (requested shape -> judged shape -> count)."""

    def __init__(self) -> None:
        self.hits = {"background": 0, "color": 0, "shape": 0, "all": 0}
        self.per_color = {c: [0, 0] for c in COLORS}  # colour -> [correct shape colour, total]
        self.per_color_all = {c: [0, 0] for c in COLORS}
        self.per_shape = {s: [0, 0] for s in SHAPES}
        self.per_shape_all = {s: [0, 0] for s in SHAPES}
        self.per_combo: dict[str, list[int]] = {}
        self.confusion = {s: {j: 0 for j in (*SHAPES, "none")} for s in SHAPES}

    def add(self, color: str, shape: str, background: str, v: Any) -> None:
        """One judged image ``v`` of the requested ``color`` ``shape`` on ``background``."""
        ok = (v.background == background, v.color == color, v.shape == shape)
        for key, good in zip(("background", "color", "shape"), ok):
            self.hits[key] += good
        self.hits["all"] += all(ok)
        for table, key, good in ((self.per_color, color, ok[1]), (self.per_color_all, color, all(ok)),
                                 (self.per_shape, shape, ok[2]), (self.per_shape_all, shape, all(ok)),
                                 (self.per_combo.setdefault(caption(color, shape, background), [0, 0]), None, all(ok))):
            cell = table if key is None else table[key]
            cell[0] += good
            cell[1] += 1
        self.confusion[shape][v.shape if v.shape in SHAPES else "none"] += 1

    def rates(self, n: int) -> dict[str, Any]:
        def rates(table: dict[str, list[int]]) -> dict[str, float]:
            return {k: ok / total for k, (ok, total) in table.items() if total}

        return {
            **{k: v / n for k, v in self.hits.items()},
            "per_color": rates(self.per_color),
            "per_color_all": rates(self.per_color_all),
            "per_shape": rates(self.per_shape),
            "per_shape_all": rates(self.per_shape_all),
            "per_combo": rates(self.per_combo),
            "confusion": self.confusion,
        }


def evaluate_table(pipe, guidances, default_guidance: float, cutoffs, steps: int = 25,
                   seeds_per_combo: int = 9, batch: int = 24, varied: bool = False) -> list[dict[str, Any]]:
    """One row per guidance scale and per CFG cutoff ratio; with ``varied``, each setting also on varied captions
    (the row after it, its setting ending in "varied captions")."""
    rows = []
    settings = [(f"guidance {g:g}", g, None, f"g={g:g}") for g in guidances]
    settings += [(f"guidance {default_guidance:g} + CFG cutoff {r:g}", default_guidance,
                  CFGCutoffCallback(cutoff_step_ratio=r), f"cut={r:g}") for r in cutoffs]
    for name, g, cb, desc in settings:
        for v in (False, True) if varied else (False,):
            rows.append({"setting": name + (", varied captions" if v else ""),
                         **evaluate(pipe, g, steps, seeds_per_combo, batch, callback=cb, desc=desc, varied=v)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | background | shape colour | shape type | all three | worst colour | model rows | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        worst = min(r["per_color"].items(), key=lambda kv: kv[1])
        lines.append(
            f"| {r['setting']} | {r['background']:.1%} | {r['color']:.1%} | {r['shape']:.1%} | {r['all']:.1%} | "
            f"{worst[0]} {worst[1]:.1%} | {r['model_rows']} | {r['n']} |"
        )
    return "\n".join(lines)


def format_breakdown(row: dict[str, Any]) -> str:
    """Per-shape and per-colour accuracy, the shape confusion table and the weakest combinations, for one setting."""
    lines = [f"### {row['setting']}", "", "| shape | shape type right | all three right |", "|---|---|---|"]
    lines += [f"| {s} | {row['per_shape'][s]:.1%} | {row['per_shape_all'][s]:.1%} |" for s in row["per_shape"]]
    lines += ["", "| shape colour | colour right | all three right |", "|---|---|---|"]
    lines += [f"| {c} | {row['per_color'][c]:.1%} | {row['per_color_all'][c]:.1%} |" for c in row["per_color"]]
    judged = list(next(iter(row["confusion"].values())))
    lines += ["", "| asked for \\ judged | " + " | ".join(judged) + " |", "|---|" + "---|" * len(judged)]
    lines += [f"| {s} | " + " | ".join(str(counts[j]) for j in judged) + " |" for s, counts in row["confusion"].items()]
    worst = sorted(row["per_combo"].items(), key=lambda kv: kv[1])[:3]
    lines += ["", "weakest combinations: " + "; ".join(f"{combo} {rate:.1%}" for combo, rate in worst)]
    return "\n".join(lines)
