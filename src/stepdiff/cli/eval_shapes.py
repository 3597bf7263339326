"""``stepdiff eval-shapes``: generate the held-out prompts at fixed seeds and judge each image from its pixels."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import loading
from ..request import check_guidance
from .common import _at_least, _check_common, _check_memory, _check_new_file, _load
from .parser import _add_model_flags, _ratio

MAX_SEEDS_PER_COMBO = 10_000


def add_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("eval-shapes", help="judge prompt adherence of a shapes model on held-out prompts",
                       description="Generate the held-out prompts at fixed seeds and judge each image from its pixels.")
    _add_model_flags(e)
    e.add_argument("--guidance", type=float, nargs="+", default=None,
                   help="guidance scales to evaluate (default: 1.0 and the model's default)")
    e.add_argument("--cfg-cutoff", type=_ratio, nargs="*", default=[0.4], metavar="RATIO",
                   help="also evaluate CFGCutoffCallback at these ratios, at the default guidance (default 0.4)")
    e.add_argument("--seeds-per-combo", type=int, default=9,
                   help=f"seeds per held-out combination, 1 to {MAX_SEEDS_PER_COMBO} (default 9: 216 pairs)")
    e.add_argument("--batch", type=int, default=24, help="images per pipeline call (default 24)")
    e.add_argument("--varied", action="store_true",
                   help="also judge each setting on captions as people write them (articles, capitals, punctuation, "
                        "word order, 'a photo of', 'high quality', unknown words), one per pair")
    e.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")

    return e


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    from ..images import atomic_write
    from ..limits import ModelShape
    from ..shapes.evaluate import evaluate_table, format_breakdown, format_table

    folder = _check_common(args)
    for g in args.guidance or []:
        check_guidance(g, "--guidance")
    _at_least("--seeds-per-combo", args.seeds_per_combo, 1, MAX_SEEDS_PER_COMBO)
    _at_least("--batch", args.batch, 1)
    shape = ModelShape.from_folder(folder)
    _check_memory(args, shape, shape.native_size, shape.native_size, args.batch, f"--batch {args.batch} images")
    if args.json is not None:
        _check_new_file("--json", args.json, args.overwrite)
    pipe = _load(args, folder)
    default = loading.default_guidance(folder)
    guidances = args.guidance if args.guidance is not None else sorted({1.0, default})
    rows = evaluate_table(pipe, guidances=guidances, default_guidance=default, cutoffs=args.cfg_cutoff,
                          steps=args.steps, seeds_per_combo=args.seeds_per_combo, batch=args.batch,
                          varied=args.varied)
    print(format_table(rows))
    for row in rows:  # where the misses are: per shape, per colour, and which shape was drawn instead
        print()
        print(format_breakdown(row))
    if args.json is not None:
        import json

        data = json.dumps(rows, indent=1).encode()
        print(atomic_write(args.json, lambda f: f.write(data)))
    return 0


