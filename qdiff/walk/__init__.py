"""Any diffusers pipeline is a teacher: the stock pipeline walks, qdiff listens.

    output, calls = record_calls(pipe, call_kwargs)             # teacher walker
    walk_with_student(pipe, {"unet": student}, call_kwargs, on_call)   # student walker
    x0_scale(pipe.scheduler, call.timestep)                     # x0 loss weight
    calibrate_on_calls(pipe, {"unet": student}, [call_kwargs])   # PTQ on the same calls
    pipeline_timesteps(pipe, call_kwargs)                       # the grid a call will visit

`DenoiserTap` is the seam both walkers use: every denoiser call of the pipeline's own
`__call__` goes to a handler (`qdiff.walk.tap`).
"""

from .calibration import calibrate_on_calls
from .call import DenoiserCall, prediction, with_prediction
from .student import StopWalk, sample_with_students, walk_with_student
from .tap import DENOISER_COMPONENTS, DenoiserProxy, DenoiserTap, denoiser_components
from .teacher import record_calls
from .timesteps import denoiser_timesteps, pipeline_timesteps, use_scheduler
from .x0 import is_flow_matching, x0_scale

__all__ = [
    "DENOISER_COMPONENTS", "DenoiserCall", "DenoiserProxy", "DenoiserTap", "StopWalk",
    "calibrate_on_calls", "denoiser_components", "denoiser_timesteps", "is_flow_matching", "pipeline_timesteps",
    "prediction", "record_calls", "sample_with_students", "use_scheduler", "walk_with_student",
    "with_prediction", "x0_scale",
]
