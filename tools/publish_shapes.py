"""Copy a trained run's model into the package as the shipped default model.

    python -m tools.publish_shapes runs/shapes --dest src/stepdiff/models/shapes-v1 --scheduler ddim [--overwrite]

``--dest`` is required and an existing folder is replaced only with ``--overwrite``, so a slip never
wipes the installed package's model.

Writes the standard folder plus stepdiff.json (recommended guidance, training vocabulary, training
settings and wall time), with the chosen default scheduler, and fits the preview table
(latent_rgb.json) for the model's VAE.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from stepdiff.preview import fit_latent_rgb, images_to_tensor
from stepdiff.schedulers import make_scheduler
from stepdiff.shapes.dataset import VOCABULARY, all_combos, sample_batch

__all__ = ["publish"]


def publish(run: Path, dest: Path, guidance: float, scheduler: str, karras: bool = False, overwrite: bool = False) -> Path:
    from stepdiff.pipelines import StableDiffusionPipeline

    if not (run / "model" / "model_index.json").is_file():
        raise FileNotFoundError(f"run={str(run)!r} has no finished model/ folder; train it first")
    if dest.exists():
        if not overwrite:
            raise FileExistsError(f"dest={str(dest)!r} already exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(dest)
    shutil.copytree(run / "model", dest)
    pipe = StableDiffusionPipeline.from_pretrained(dest)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config, karras=karras)
    pipe.scheduler.save_pretrained(dest / "scheduler")
    # Stable Diffusion's own scheduler keys, so that swapping in any scheduler (DDIM, PNDM, ...) with
    # from_config gets SD's settings rather than each class's defaults (DDIM would clip x0 to [-1, 1]).
    config_file = dest / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index = json.loads((dest / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(pipe.scheduler).__name__]
    (dest / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    images = images_to_tensor(sample_batch(np.random.default_rng(7), 512, all_combos())[0])
    fit_latent_rgb(pipe.vae, images, name=f"fitted:{dest.name}").save(dest)
    info = {
        "name": dest.name,
        "guidance_scale": guidance,
        "vocabulary": list(VOCABULARY),
        "prompt_template": "a {color} {shape} on a {background} background",
        "train_config": json.loads((run / "train_config.json").read_text()),
        "train_time": json.loads((run / "train_time.json").read_text()),
    }
    (dest / "stepdiff.json").write_text(json.dumps(info, indent=1) + "\n")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="training run folder (holds model/)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="unipc")
    parser.add_argument("--karras", action="store_true")
    parser.add_argument("--dest", type=Path, required=True, help="model folder to write (package: src/stepdiff/models/NAME)")
    parser.add_argument("--overwrite", action="store_true", help="replace --dest if it exists")
    args = parser.parse_args()
    try:
        print(publish(args.run, args.dest, args.guidance, args.scheduler, args.karras, args.overwrite))
    except (FileNotFoundError, FileExistsError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
