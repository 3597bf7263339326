"""Prompt adherence of a shapes model on the held-out split, judged from pixels."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..callbacks import CFGCutoffCallback
from .dataset import COLORS, caption, eval_pairs
from .judge import judge

__all__ = ["evaluate", "evaluate_table", "format_table"]


def evaluate(
    pipe, guidance: float, steps: int = 25, seeds_per_combo: int = 9, batch: int = 24,
    callback: Any = None, desc: str = "eval",
) -> dict[str, Any]:
    """Accuracy per attribute and all-three over the held-out (combo, seed) pairs."""
    pairs = eval_pairs(seeds_per_combo)
    hits = {"background": 0, "color": 0, "shape": 0, "all": 0}
    per_color = {c: [0, 0] for c in COLORS}  # colour -> [correct shape colour, total]
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
            per_color[color][0] += ok[1]
            per_color[color][1] += 1
    n = len(pairs)
    return {
        "n": n,
        **{k: v / n for k, v in hits.items()},
        "per_color": {c: ok / total for c, (ok, total) in per_color.items() if total},
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
