"""``stepdiff tiny-model``: a tiny random SD or SDXL model folder, for trying the API."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import _check_writable_dir


def add_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("tiny-model", help="write a tiny random SD or SDXL model folder (for trying the API)")
    t.add_argument("out", type=Path, help="folder to create (an existing non-empty folder only with --overwrite)")
    t.add_argument("--family", choices=("sd", "sdxl"), default="sd")
    t.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    return t


def cmd_tiny_model(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from ..testing import make_tiny_sd, make_tiny_sdxl

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"tiny-model OUT {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"tiny-model OUT {str(out)!r} is a folder that is not empty; pass --overwrite to replace it")
    _check_writable_dir("tiny-model OUT", out.parent)
    # Built beside its destination, then renamed into place: never half a model folder under its name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (make_tiny_sd if args.family == "sd" else make_tiny_sdxl)(tmp)
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)
        old = None
        if out.is_dir():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(out)
    return 0


