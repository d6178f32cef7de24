"""The teacher walker: the stock pipeline samples, and qdiff records every denoiser call.

The trajectory qdiff learns from is the one `pipe(**call_kwargs)` samples -- the same
scheduler, guidance (batched or as separate calls), latents and generators -- because it
is that call: the tap answers each denoiser call with the teacher's own return value,
untouched, and keeps a copy of the question and the answer.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import DiffusionPipeline

from .call import DenoiserCall, ask_in_own_dtype, detached, prediction, timestep_of
from .tap import DenoiserTap


def record_calls(pipe: DiffusionPipeline, call_kwargs: Mapping[str, Any]
                 ) -> tuple[Any, list[DenoiserCall]]:
    """`pipe(**call_kwargs)` and every denoiser call it made, in order.

    Give `call_kwargs` one generator per sample (`generator=[...]`) so that a sample's
    noise does not depend on the batch it is drawn in.

    Args:
        pipe: The teacher pipeline.
        call_kwargs: The arguments of `pipe(...)`.

    Returns:
        `(output, calls)`: the pipeline's output and its denoiser calls.
    """
    calls: list[DenoiserCall] = []

    def answer(component: str, index: int, args: tuple, kwargs: dict) -> Any:
        teacher = tap.original(component)
        with torch.no_grad():
            result = ask_in_own_dtype(teacher, args, kwargs)
        calls.append(DenoiserCall(component, index, detached(args), detached(kwargs),
                                  detached(timestep_of(teacher, args, kwargs)),
                                  detached(prediction(result))))
        return result

    with DenoiserTap(pipe, answer) as tap:
        output = pipe(**call_kwargs)
    return output, calls
