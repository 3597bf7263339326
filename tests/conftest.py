import os
import signal

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a model hub
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

import stepdiff
from stepdiff.testing import make_tiny_sd, make_tiny_sdxl

diffusers_logging.disable_progress_bar()
# Under pytest-xdist (pyproject's addopts: two worker processes) each worker gets one torch thread: two workers on a
# 2-core machine use both cores; one process on two threads used 1.2 of them (the suite's models are tiny).
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(int(os.environ.get("STEPDIFF_TEST_THREADS", "1" if _XDIST_WORKER else "2")))

# Which tests share a worker (``--dist loadgroup``): a file's tests stay together, so its module fixtures (a studio
# server, a browser, a local Ray) are made once; the files that start a local Ray share one worker, and so do the two
# that drive Chromium, so two of them never run at once.
_SHARED_WORKER = {"test_batch_ray": "ray", "test_studio_ray": "ray",
                  "test_studio_browser": "browser", "test_studio_browser_modes": "browser"}


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_SHARED_WORKER.get(item.path.stem, item.path.stem)))


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def sd_v_folder(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


def _load(cls, folder):
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd_pipe(sd_folder):
    return _load(stepdiff.StableDiffusionPipeline, sd_folder)


@pytest.fixture
def sdxl_pipe(sdxl_folder):
    return _load(stepdiff.StableDiffusionXLPipeline, sdxl_folder)


@pytest.fixture(params=["sd", "sdxl"])
def pipe(request, sd_folder, sdxl_folder):
    """Each test using this runs on both families."""
    if request.param == "sd":
        return _load(stepdiff.StableDiffusionPipeline, sd_folder)
    return _load(stepdiff.StableDiffusionXLPipeline, sdxl_folder)


class ModelCallCounter:
    """Records the batch size of every denoiser call."""

    def __init__(self, module):
        self.rows: list[int] = []
        self.hidden: list[torch.Tensor] = []
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.rows.append(sample.shape[0])
        hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.hidden.append(hidden)

    @property
    def calls(self) -> int:
        return len(self.rows)


@pytest.fixture
def count_calls():
    counters = []

    def make(pipe):
        counter = ModelCallCounter(pipe.denoiser)
        counters.append(counter)
        return counter

    yield make
    for c in counters:
        c._handle.remove()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory):
    from stepdiff.testing import make_tiny_sd3

    return make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture
def sd3_pipe(sd3_folder):
    return _load(stepdiff.StableDiffusion3Pipeline, sd3_folder)


@pytest.fixture(scope="session")
def flux_folder(tmp_path_factory):
    """The classic library's tiny Flux test config, guidance-distilled (FLUX.1-dev style: guidance_embeds=True)."""
    from stepdiff.testing import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("tiny-flux"), guidance_embeds=True)


@pytest.fixture(scope="session")
def flux_plain_folder(tmp_path_factory):
    """The same config without the guidance embedding (FLUX.1-schnell style)."""
    from stepdiff.testing import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("tiny-flux-plain"), guidance_embeds=False)


@pytest.fixture(scope="session")
def sd_inpaint_folder(tmp_path_factory):
    """A 9-channel (inpainting) UNet."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd-inpaint"), in_channels=9)


@pytest.fixture(scope="session")
def sdxl_inpaint_folder(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-inpaint"), in_channels=9)


def test_image(size: int = 32, seed: int = 0):
    """A random RGB picture and a mask whose right half is white (repaint)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = PIL.Image.fromarray(((np.arange(size)[None, :].repeat(size, 0) >= size // 2) * 255).astype(np.uint8))
    return image, mask


test_image.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def sd_controlnet_folder(tmp_path_factory, sd_folder):
    """A tiny random ControlNet for the tiny SD model (``ControlNetModel.from_pretrained`` loads it)."""
    from stepdiff.testing import make_tiny_controlnet

    return make_tiny_controlnet(tmp_path_factory.mktemp("tiny-sd-controlnet"), sd_folder)


@pytest.fixture(scope="session")
def sdxl_controlnet_folder(tmp_path_factory, sdxl_folder):
    from stepdiff.testing import make_tiny_controlnet

    return make_tiny_controlnet(tmp_path_factory.mktemp("tiny-sdxl-controlnet"), sdxl_folder)


def control_image(size: int = 32, seed: int = 5):
    """A random control picture (the tiny ControlNets take RGB at the output size)."""
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


control_image.__test__ = False


@pytest.fixture
def run_cli(capsys):
    """``stepdiff.cli.main`` in-process: (exit code, stdout, stderr)."""
    from stepdiff.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def loader():
    """``loader(fn)``: every model load of this test (CLI, batch, studio) calls ``fn`` instead, through
    stepdiff.loading's seam; the real loader is back after the test."""
    from stepdiff.loading import set_loader

    previous = []

    def use(fn):
        previous.append(set_loader(fn))

    yield use
    if previous:
        set_loader(previous[0])


@pytest.fixture(autouse=True)
def _signal_handlers_per_test():
    """Every test starts with Python's default SIGINT/SIGTERM handlers and leaves them so: a library a test drives
    in this process (Ray's driver, a server) may install its own, and the CLI's signal tests check that the CLI puts
    back what it found."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    for s, handler in defaults.items():
        signal.signal(s, handler)
    yield
    for s, handler in defaults.items():
        signal.signal(s, handler)


JOB_FINAL_STATES = ("finished", "cancelled", "failed", "interrupted")


def wait_job(client, job_id, states=JOB_FINAL_STATES, step=None, timeout=120):
    """Poll a studio job (``GET /api/jobs/{id}``) until it is in ``states`` (and past ``step``, if given)."""
    import time

    deadline = time.monotonic() + timeout
    job = client.get(f"/api/jobs/{job_id}").json()
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in states and (step is None or job["steps_completed"] >= step):
            return job
        time.sleep(0.005)
    raise AssertionError(f"job {job_id} is {job['state']} at step {job['steps_completed']}, not {states}: {job}")
