"""The noise schedule stored in an LDM checkpoint <-> a diffusers DDIMScheduler.

latent-diffusion's `DDPM.register_schedule` keeps `betas` and a dozen tensors computed
from them (float64 maths, stored as float32). The converter takes the schedule from
`betas`, checks that the derived tensors agree with it (so a checkpoint with another
parameterisation fails instead of sampling wrongly), and the reverse mapping recomputes
them the same way.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from diffusers import DDIMScheduler


def derived_buffers(betas: np.ndarray) -> dict[str, torch.Tensor]:
    """`register_schedule`'s tensors for `betas` (v_posterior = 0), as float32."""
    betas = betas.astype(np.float64)
    alphas = 1.0 - betas
    cumprod = np.cumprod(alphas)
    previous = np.append(1.0, cumprod[:-1])
    posterior_variance = betas * (1.0 - previous) / (1.0 - cumprod)
    values = {
        "betas": betas, "alphas_cumprod": cumprod, "alphas_cumprod_prev": previous,
        "sqrt_alphas_cumprod": np.sqrt(cumprod), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(previous) / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - previous) * np.sqrt(alphas) / (1.0 - cumprod),
    }
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in values.items()}


SCHEDULE_BUFFERS = tuple(derived_buffers(np.array([0.1, 0.2])))


def scheduler_from_buffers(state: Mapping[str, torch.Tensor]) -> DDIMScheduler:
    """LDM's DDIM: scaled-linear betas when they are (as in every LDM release), else as stored."""
    betas = state["betas"].double().numpy()
    expected = derived_buffers(betas)
    for name in SCHEDULE_BUFFERS:
        if name in state and not torch.allclose(state[name].float(), expected[name], rtol=1e-4, atol=1e-6):
            raise ValueError(f"Schedule buffer '{name}' does not follow from 'betas' as in "
                             f"latent-diffusion's register_schedule; this is not an LDM DDPM "
                             f"checkpoint this converter understands.")
    start, end, count = float(betas[0]), float(betas[-1]), len(betas)
    scaled_linear = np.linspace(start ** 0.5, end ** 0.5, count) ** 2
    common = dict(num_train_timesteps=count, clip_sample=False, set_alpha_to_one=False,
                  steps_offset=1, prediction_type="epsilon")
    if np.allclose(scaled_linear, betas, rtol=1e-5, atol=1e-8):
        return DDIMScheduler(beta_start=round(start, 8), beta_end=round(end, 8),
                             beta_schedule="scaled_linear", **common)
    return DDIMScheduler(trained_betas=betas.tolist(), **common)


def buffers_from_scheduler(scheduler: DDIMScheduler) -> dict[str, torch.Tensor]:
    """The reverse: the checkpoint's schedule tensors from the scheduler's betas."""
    return derived_buffers(scheduler.betas.double().numpy())
