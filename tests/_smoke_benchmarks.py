"""Run benchmark scripts, each in its own process, sharing one interpreter start: the imports every script makes
(torch, diffusers, transformers, stepdiff: most of a smoke run's time) happen once here, then each script runs in a
child forked from this process, as ``python benchmarks/SCRIPT ARGS`` would run it (``__name__ == "__main__"``, its
own ``sys.argv``, a fresh temporary folder as the current folder, its output in a file).

    python tests/_smoke_benchmarks.py OUT_JSON TIMEOUT JOBS SCRIPT:ARG,ARG ...

Runs up to JOBS children at a time, each with at most TIMEOUT seconds. Writes one JSON object per run to OUT_JSON: ``{"run", "code", "seconds", "output"}`` (the output's last 6000
characters). Nothing here has run a torch operation before forking, so the children start torch's thread pools
fresh. tests/test_benchmarks.py drives it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _child(script: Path, args: list[str], log: Path, folder: Path) -> None:
    """In the forked child: run the script as __main__; never returns."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        os.setpgid(0, 0)  # a group of its own: a timeout ends the servers and workers it started too
        os.chdir(folder)
        sys.argv = [str(script), *args]
        sys.path.insert(0, str(script.parent))
        import runpy

        runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _preload() -> None:
    """Import what the scripts use, once: diffusers and transformers load their classes on first use, which costs
    more than most smoke runs themselves."""
    import diffusers
    import transformers

    for name in ("AutoencoderKL", "AutoencoderTiny", "AutoPipelineForText2Image", "ControlNetModel",
                 "StableDiffusion3Pipeline", "StableDiffusionControlNetPipeline", "StableDiffusionImg2ImgPipeline",
                 "StableDiffusionInpaintPipeline", "StableDiffusionPipeline", "StableDiffusionXLControlNetInpaintPipeline",
                 "StableDiffusionXLPipeline", "UNet2DConditionModel"):
        getattr(diffusers, name)
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "T5EncoderModel"):
        getattr(transformers, name)
    import DeepCache  # noqa: F401 - the step-caching anchors bench_fast.py compares against (test extra)
    import tgate  # noqa: F401

    import stepdiff.batch
    import stepdiff.caching
    import stepdiff.cli
    import stepdiff.preview
    import stepdiff.shapes.evaluate
    import stepdiff.testing  # noqa: F401


def main() -> None:
    out, timeout, jobs, runs = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    os.environ["HF_HUB_OFFLINE"] = "1"
    _preload()
    results: dict[int, dict] = {}
    running: dict[int, tuple[int, float, Path]] = {}  # pid -> (run number, start, log)
    waiting = list(enumerate(runs))
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        while waiting or running:
            while waiting and len(running) < jobs:
                n, run = waiting.pop(0)
                name, _, rest = run.partition(":")
                folder, log = Path(tmp) / f"run{n}", Path(tmp) / f"run{n}.log"
                folder.mkdir()
                pid = os.fork()
                if pid == 0:
                    _child(BENCHMARKS / name, rest.split(",") if rest else [], log, folder)
                running[pid] = (n, time.perf_counter(), log)
            time.sleep(0.05)
            for pid, (n, started, log) in list(running.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                code = os.waitstatus_to_exitcode(status) if done else None
                if code is None and time.perf_counter() - started > timeout:
                    code = "timeout"
                if code is None:
                    continue
                try:
                    os.killpg(pid, signal.SIGKILL)  # on a timeout, and anything it left running (a server)
                except (ProcessLookupError, PermissionError):
                    pass
                if not done:
                    os.waitpid(pid, 0)
                del running[pid]
                text = log.read_text(errors="replace") if log.exists() else ""
                results[n] = {"run": runs[n], "code": code, "seconds": round(time.perf_counter() - started, 2),
                              "output": text[-6000:]}
                print(f"{runs[n]}: {code} in {results[n]['seconds']} s", flush=True)
    out.write_text(json.dumps([results[n] for n in sorted(results)], indent=1))


if __name__ == "__main__":
    main()
