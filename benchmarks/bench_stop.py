"""The picture of a stopped run (issue 26, item 2): the x0 estimate at the stop against finishing in a few steps.

    python benchmarks/bench_stop.py                       # 216 held-out pairs, stops at 10/30/60% (several minutes)
    python benchmarks/bench_stop.py --seeds-per-combo 3   # 72 pairs
    python benchmarks/bench_stop.py --smoke               # 2 pairs, 10 steps, no sheet: checks the script runs

The shipped model at the CLI's defaults (25 DDIM steps, guidance 7.5). Every held-out (prompt, seed) pair runs
once in full, then once per stop point with ``interrupt_output="finish"`` (3 finishing steps, ``--finish-steps``),
stopped by ``StopAtStep`` after round(ratio x steps) steps. The x0 estimate at the stop is taken from the same
stopped run (a callback keeps ``denoised`` at the stop step) and decoded as ``interrupt_output="denoised"`` decodes
it (``decode_latents`` + ``postprocess``): the same picture, without a second run. For each stop point and each
picture: adherence (all three of colour, shape and background right, judged from the pixels as
``stepdiff eval-shapes`` judges) and the PSNR against the full run's image of the same pair (mean over pairs),
and the model calls per image. Writes a picture sheet (full run / x0 at stop / finish for the three stop points,
a few prompts) to docs/images/stop_finish.png (``--sheet``, ``--no-sheet``) and the numbers as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import torch
from PIL import Image, ImageDraw

import stepdiff
from stepdiff.callbacks import StopAtStep
from stepdiff.models import default_model
from stepdiff.shapes.dataset import caption, eval_pairs
from stepdiff.shapes.judge import judge

GUIDANCE = 7.5
ROOT = Path(__file__).resolve().parent.parent


def load(folder=None):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(folder or default_model())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, chunk, steps: int, **kw):
    return pipe([caption(*combo) for combo, _ in chunk], num_inference_steps=steps, guidance_scale=GUIDANCE,
                generator=[torch.Generator().manual_seed(seed) for _, seed in chunk], output_type="np", **kw)


def stopped(pipe, chunk, steps: int, done: int, finish: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(x0 at the stop, finished picture, record) of runs stopped after ``done`` steps."""
    kept = {}

    def keep(p, i, t, kw):
        if i == done - 1:
            kept["denoised"] = kw["denoised"].clone()

    out = call(pipe, chunk, steps, interrupt_output=finish,
               callback_on_step_end=[keep, StopAtStep(cutoff_step_index=done - 1)],
               callback_on_step_end_tensor_inputs=["denoised"])
    record = out.record
    assert record.steps_completed == done and record.stop_output == "finish", record
    with torch.no_grad():  # as the pipeline's finish decodes
        x0 = pipe.image_processor.postprocess(pipe.decode_latents(kept["denoised"]), output_type="np")
    return x0, out.images, record.to_dict()


def adherent(images: np.ndarray, pairs) -> np.ndarray:
    ok = []
    for ((color, shape, background), _), image in zip(pairs, images):
        v = judge((image * 255).round().astype(np.uint8))
        ok.append((v.background, v.color, v.shape) == (background, color, shape))
    return np.array(ok)


def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    mse = ((images - reference) ** 2).reshape(len(images), -1).mean(1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    pairs = eval_pairs(args.seeds_per_combo)
    if args.pairs:
        pairs = pairs[: args.pairs]
    steps = args.steps
    stops = {r: max(1, min(steps - 1, int(r * steps + 0.5))) for r in args.ratios}
    finish = f"finish:{args.finish_steps}"
    full, x0s, finished = [], {r: [] for r in stops}, {r: [] for r in stops}
    calls = {"full": 0, **{f"x0 {r}": 0 for r in stops}, **{f"finish {r}": 0 for r in stops}}
    started = time.perf_counter()
    for start in range(0, len(pairs), args.batch):
        chunk = pairs[start : start + args.batch]
        out = call(pipe, chunk, steps)
        full.append(out.images)
        calls["full"] += out.record.model_calls * len(chunk)
        for r, done in stops.items():
            x0, images, record = stopped(pipe, chunk, steps, done, finish)
            x0s[r].append(x0)
            finished[r].append(images)
            calls[f"x0 {r}"] += record["model_calls"] * len(chunk)
            calls[f"finish {r}"] += (record["model_calls"] + record["finish_model_calls"]) * len(chunk)
        print(f"{start + len(chunk)}/{len(pairs)} pairs, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    full_images = np.concatenate(full)
    n = len(pairs)
    result = {
        "pairs": n, "steps": steps, "guidance": GUIDANCE, "finish_steps": args.finish_steps,
        "full": {"all_three": float(adherent(full_images, pairs).mean()), "calls_per_image": calls["full"] / n},
        "stops": [],
        "seconds": time.perf_counter() - started,
    }
    for r, done in stops.items():
        row = {"ratio": r, "steps_done": done}
        for name, images in (("x0", np.concatenate(x0s[r])), ("finish", np.concatenate(finished[r]))):
            ok = adherent(images, pairs)
            row[name] = {"all_three": float(ok.mean()), "psnr": float(psnr(images, full_images).mean()),
                         "calls_per_image": calls[f"{name} {r}"] / n}
        result["stops"].append(row)
    if args.sheet is not None:
        sheet(pairs, full_images, {r: np.concatenate(x0s[r]) for r in stops},
              {r: np.concatenate(finished[r]) for r in stops}, stops, args.sheet, args.sheet_prompts, steps)
        result["sheet"] = str(args.sheet)
    return result


def sheet(pairs, full, x0s, finished, stops, out: Path, count: int, steps: int, zoom: int = 2) -> None:
    """Rows: a few prompts (one per held-out combination, its first seed); columns: the full run, then for each
    stop point the x0 estimate at the stop and the finished picture."""
    picks, seen = [], set()
    for k, (combo, _) in enumerate(pairs):
        if combo not in seen:
            seen.add(combo)
            picks.append(k)
        if len(picks) == count:
            break
    columns = [("full run", f"{steps} steps", full)]
    for r, done in stops.items():
        columns += [("x0 at stop", f"step {done}/{steps}", x0s[r]), ("finish", f"from {done}/{steps}", finished[r])]
    h, w = (s * zoom for s in full.shape[1:3])
    pad, top = 6, 34
    image = Image.new("RGB", (len(columns) * (w + pad), top + len(picks) * (h + pad)), "white")
    draw = ImageDraw.Draw(image)
    for c, (title, sub, images) in enumerate(columns):
        x = c * (w + pad)
        draw.text((x + 2, 4), title, fill="black")
        draw.text((x + 2, 18), sub, fill="black")
        for row, k in enumerate(picks):
            tile = Image.fromarray((images[k] * 255).round().astype(np.uint8)).resize((w, h), Image.NEAREST)
            image.paste(tile, (x, top + row * (h + pad)))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)


def table(result: dict) -> str:
    n, steps = result["pairs"], result["steps"]
    lines = [
        f"| stop after | picture | all three ({n} pairs) | PSNR vs full run | model calls per image |",
        "|---|---|---|---|---|",
        f"| — (full run, {steps} steps) | final image | {result['full']['all_three']:.1%} | — | "
        f"{result['full']['calls_per_image']:.0f} |",
    ]
    for row in result["stops"]:
        for name, label in (("x0", "x0 at the stop"), ("finish", f"finish ({result['finish_steps']} steps)")):
            cell = row[name]
            lines.append(f"| {row['steps_done']}/{steps} ({row['ratio']:.0%}) | {label} | {cell['all_three']:.1%} | "
                         f"{cell['psnr']:.1f} dB | {cell['calls_per_image']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--seeds-per-combo", type=int, default=9, help="seeds per held-out combination (9: 216 pairs)")
    parser.add_argument("--pairs", type=int, default=None, help="only the first N pairs")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3, 0.6])
    parser.add_argument("--finish-steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sheet", type=Path, default=ROOT / "docs/images/stop_finish.png")
    parser.add_argument("--no-sheet", dest="sheet", action="store_const", const=None)
    parser.add_argument("--sheet-prompts", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--smoke", action="store_true", help="2 pairs, 10 steps, no sheet: a few seconds")
    args = parser.parse_args()
    if args.smoke:
        args.pairs, args.steps, args.sheet, args.seeds_per_combo, args.threads = 2, 10, None, 1, 1
    result = run(args)
    print(table(result))
    print(f"({result['seconds']:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
