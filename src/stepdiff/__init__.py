"""stepdiff: text-to-image diffusion whose denoising loop can be steered at every step."""

from transformers.utils import logging as _tf_logging

# diffusers' pipeline modules import transformers' image processors, which warn once that torchvision
# is missing (stepdiff needs no image processor). Quiet that during our own import only.
_verbosity = _tf_logging.get_verbosity()
_tf_logging.set_verbosity_error()

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from . import callbacks
from .control import CancelToken
from .models import default_model
from .output import RunRecord, StepDiffPipelineOutput
from .pipelines import (
    AutoPipelineForText2Image,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    StepDiffPipeline,
)

__version__ = "0.1.0"

__all__ = [
    "AutoPipelineForText2Image",
    "CancelToken",
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "RunRecord",
    "StableDiffusion3Pipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StepDiffPipeline",
    "StepDiffPipelineOutput",
    "UniPCMultistepScheduler",
    "__version__",
    "callbacks",
    "default_model",
]
