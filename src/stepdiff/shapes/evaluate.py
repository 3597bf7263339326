"""Prompt adherence of a shapes model on the held-out split, judged from pixels."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..callbacks import CFGCutoffCallback
from .dataset import COLORS, SHAPES, caption, eval_pairs
from .judge import judge

__all__ = ["evaluate", "evaluate_table", "format_breakdown", "format_table"]


def evaluate(
    pipe, guidance: float, steps: int = 25, seeds_per_combo: int = 9, batch: int = 24,
    callback: Any = None, desc: str = "eval",
) -> dict[str, Any]:
    """Accuracy per attribute and all-three over the held-out (combo, seed) pairs.

    Also: ``per_color`` (shape colour right, per requested colour), ``per_color_all`` and ``per_shape_all``
    (all three right, per requested colour / shape), ``per_shape`` (shape type right, per requested shape),
    ``per_combo`` (all three right, per held-out combination) and ``confusion`` (requested shape -> judged
    shape -> count; "none" when the judge finds no shape).
    """
    pairs = eval_pairs(seeds_per_combo)
    hits = {"background": 0, "color": 0, "shape": 0, "all": 0}
    per_color = {c: [0, 0] for c in COLORS}  # colour -> [correct shape colour, total]
    per_color_all = {c: [0, 0] for c in COLORS}
    per_shape = {s: [0, 0] for s in SHAPES}
    per_shape_all = {s: [0, 0] for s in SHAPES}
    per_combo: dict[str, list[int]] = {}
    confusion = {s: {j: 0 for j in (*SHAPES, "none")} for s in SHAPES}
    model_rows = steps_done = 0
    started = time.perf_counter()
    pipe.set_progress_bar_config(disable=True)
    for start in tqdm(range(0, len(pairs), batch), desc=desc, leave=False):
        chunk = pairs[start : start + batch]
        prompts = [caption(*combo) for combo, _ in chunk]
        generators = [torch.Generator(pipe.device).manual_seed(seed) for _, seed in chunk]
        out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   callback_on_step_end=callback)
        model_rows += out.record.model_rows
        steps_done += out.steps_completed * len(chunk)
        for ((color, shape, background), _), image in zip(chunk, out.images):
            v = judge(image)
            ok = (v.background == background, v.color == color, v.shape == shape)
            for key, good in zip(("background", "color", "shape"), ok):
                hits[key] += good
            hits["all"] += all(ok)
            for table, key, good in ((per_color, color, ok[1]), (per_color_all, color, all(ok)),
                                     (per_shape, shape, ok[2]), (per_shape_all, shape, all(ok)),
                                     (per_combo.setdefault(caption(color, shape, background), [0, 0]), None, all(ok))):
                cell = table if key is None else table[key]
                cell[0] += good
                cell[1] += 1
            confusion[shape][v.shape if v.shape in SHAPES else "none"] += 1
    n = len(pairs)

    def rates(table: dict[str, list[int]]) -> dict[str, float]:
        return {k: ok / total for k, (ok, total) in table.items() if total}

    return {
        "n": n,
        **{k: v / n for k, v in hits.items()},
        "per_color": rates(per_color),
        "per_color_all": rates(per_color_all),
        "per_shape": rates(per_shape),
        "per_shape_all": rates(per_shape_all),
        "per_combo": rates(per_combo),
        "confusion": confusion,
        "model_rows": model_rows,
        "mean_steps": steps_done / n,
        "seconds": time.perf_counter() - started,
    }


def evaluate_table(pipe, guidances, default_guidance: float, cutoffs, steps: int = 25,
                   seeds_per_combo: int = 9, batch: int = 24) -> list[dict[str, Any]]:
    rows = []
    for g in guidances:
        rows.append({"setting": f"guidance {g:g}", **evaluate(pipe, g, steps, seeds_per_combo, batch, desc=f"g={g:g}")})
    for ratio in cutoffs:
        cb = CFGCutoffCallback(cutoff_step_ratio=ratio)
        rows.append({"setting": f"guidance {default_guidance:g} + CFG cutoff {ratio:g}",
                     **evaluate(pipe, default_guidance, steps, seeds_per_combo, batch, callback=cb, desc=f"cut={ratio:g}")})
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
