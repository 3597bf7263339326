"""Custom schedules (``timesteps=`` / ``sigmas=``, e.g. Align-Your-Steps) on image-to-image runs, with
``num_inference_steps=None`` as AYS code passes it: strength cuts the custom schedule as in the classic pipelines.
(Text-to-image: test_drop_in.test_align_your_steps_timesteps_without_num_inference_steps.)"""

import diffusers
import numpy as np
import pytest
from diffusers.schedulers import AysSchedules

import stepdiff

from .conftest import gen, test_image

TOL = 1e-4
IMAGE, _ = test_image()
CASES = {
    # id: (ours, theirs, folder fixture, scheduler, schedule argument, strength)
    "sd-timesteps": (stepdiff.StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline, "sd_folder",
                     diffusers.DPMSolverMultistepScheduler, {"timesteps": AysSchedules["StableDiffusionTimesteps"]}, 0.4),
    "sd-sigmas": (stepdiff.StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline, "sd_folder",
                  diffusers.EulerDiscreteScheduler, {"sigmas": AysSchedules["StableDiffusionSigmas"]}, 0.3),
    "sdxl-timesteps": (stepdiff.StableDiffusionXLImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline,
                       "sdxl_folder", diffusers.DPMSolverMultistepScheduler,
                       {"timesteps": AysSchedules["StableDiffusionXLTimesteps"]}, 0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_img2img_custom_schedule_matches_diffusers(request, case):
    ours_cls, theirs_cls, fixture, scheduler, schedule, strength = CASES[case]
    folder = request.getfixturevalue(fixture)
    ours = ours_cls.from_pretrained(folder)
    theirs = theirs_cls.from_pretrained(folder, **({"safety_checker": None} if fixture == "sd_folder" else {}))
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
        p.scheduler = scheduler.from_config(p.scheduler.config)
    kw = dict(prompt="a photo of a cat", image=IMAGE, strength=strength, num_inference_steps=None, output_type="np",
              **schedule)
    full = len(schedule.get("timesteps", schedule.get("sigmas", [None])[:-1]))  # sigmas end on the last sigma
    out = ours(generator=gen(0), **kw)
    if theirs_cls is diffusers.StableDiffusionXLImg2ImgPipeline:  # refuses None; the custom schedule wins anyway
        kw["num_inference_steps"] = full
    expected = theirs(generator=gen(0), **kw).images
    assert np.abs(out.images - expected).max() <= TOL
    assert out.record.steps_total == int(full * strength)
