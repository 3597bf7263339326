"""stepdiff command line: flags map onto library calls; no logic of its own beyond wiring and checks.

    stepdiff generate "a red circle on a blue background"
    stepdiff eval-shapes
    stepdiff tiny-model DIR --family sdxl
    stepdiff batch prompts.jsonl --out images/ [--ray --workers 2]

Every flag a user can get wrong is checked before any model loads: a bad value exits with status 2 and
one line on stderr naming the flag, the value and what is allowed. A run that fails or is aborted
leaves nothing behind (its reserved image names and its preview frames are removed) and says so.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..limits import MAX_CONTROL_SCALE, MAX_GUIDANCE, MAX_SEED, MAX_STEPS, SIZE_LIMIT_RATIO, SIZE_WARN_RATIO
from . import batch, eval_shapes, fit_preview, generate, serve, tiny_model
from .batch import cmd_batch
from .common import _names_hub_id, _one_line
from .eval_shapes import MAX_SEEDS_PER_COMBO, cmd_eval_shapes
from .fit_preview import MAX_FIT_COUNT, cmd_fit_preview
from .generate import cmd_generate
from .interrupts import Terminated, _terminate_aborts
from .parser import make_parser
from .serve import STUDIO_REQUIREMENTS, cmd_serve
from .tiny_model import cmd_tiny_model

__all__ = ["MAX_GUIDANCE", "MAX_SEED", "MAX_STEPS", "SIZE_LIMIT_RATIO", "SIZE_WARN_RATIO", "Terminated", "main"]
# Also importable from here, as before the CLI became a package: the commands, the parser and their limits.
_COMPAT = (MAX_CONTROL_SCALE, MAX_FIT_COUNT, MAX_SEEDS_PER_COMBO, STUDIO_REQUIREMENTS, cmd_batch,
           cmd_eval_shapes, cmd_fit_preview, cmd_generate, cmd_serve, cmd_tiny_model)

COMMANDS = {
    "generate": cmd_generate, "eval-shapes": cmd_eval_shapes, "fit-preview": cmd_fit_preview,
    "tiny-model": cmd_tiny_model, "batch": cmd_batch, "serve": cmd_serve,
}


def build_parser() -> argparse.ArgumentParser:
    return make_parser((generate, eval_shapes, fit_preview, batch, serve, tiny_model))


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: already printed
        return int(e.code or 0)
    if not _names_hub_id(args):  # (parsing imports no hub library, so this still decides its offline mode)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models only: nothing reaches a hub by accident
    try:
        with _terminate_aborts():
            return COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError) as e:
        print(f"stepdiff: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"stepdiff: aborted; {getattr(e, 'stepdiff_kept', 'nothing written')}", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"stepdiff: terminated; {getattr(e, 'stepdiff_kept', 'nothing written')}", file=sys.stderr)
        return 143
    except FloatingPointError as e:  # the run's numbers blew up (NaN/inf): the message names the step and the likely cause
        print(f"stepdiff: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug or the machine (out of memory): still one line; STEPDIFF_TRACEBACK=1 shows it
        if os.environ.get("STEPDIFF_TRACEBACK"):
            raise
        print(f"stepdiff: error: {type(e).__name__}: {_one_line(e)} (STEPDIFF_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1
