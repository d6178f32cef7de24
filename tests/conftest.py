"""Shared fixtures: tiny random pipelines built from the zoo's configs, and the assets."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"
# A distillation run of a few seconds: 4-step trajectories of 4 samples, rank-4 LoRA, a log
# line per step, no sample grid but the end-of-run one (drawn at the training batch)
TINY_RUN = ["distill.trajectory_steps=4", "distill.batch_size=4", "quant.calibration_samples=2",
            "distill.log_every=1", "distill.sample_every=1000", "lora.rank=4", "eval.steps=2"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster than two oversubscribing a busy CPU, and repeatable.

    Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quiet():
    """No diffusers or transformers progress bars in the test log.

    Use it with `pytestmark = pytest.mark.usefixtures("one_thread", "quiet")`.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    yield


@pytest.fixture
def random_class_ldm_pipeline():
    """The embedded teacher's architecture with random weights (seeded)."""
    from qdiff.models.class_embedder import ClassEmbedder
    from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline
    from qdiff.models.zoo.train_autoencoder import build_vq_f4
    from qdiff.models.zoo.train_denoiser import CONTEXT_DIM, build_class_unet, build_ddim_scheduler

    torch.manual_seed(0)
    return ClassConditionalLDMPipeline(
        unet=build_class_unet().eval(), class_embedder=ClassEmbedder(10, CONTEXT_DIM).eval(),
        vae=build_vq_f4().eval(), scheduler=build_ddim_scheduler())


@pytest.fixture(scope="session")
def teacher():
    """The embedded teacher pipeline, loaded once."""
    import qdiff

    pipe = qdiff.load_pipeline(ASSETS / "tiny-ldm-digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def feature_net():
    from qdiff.eval.digits_features import DigitsFeatureNet

    return DigitsFeatureNet.from_pretrained(ASSETS / "digits-features").eval()


def micro_class_ldm_pipeline():
    """A class-conditional LDM pipeline of a few thousand parameters (seeded): for tests of
    exports and their files, where the architecture matters and the weights do not."""
    from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel

    from qdiff.models import ClassConditionalLDMPipeline, ClassEmbedder

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    vae = VQModel(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=4,
                  norm_num_groups=4, num_vq_embeddings=16)
    return ClassConditionalLDMPipeline(unet=unet.eval(), class_embedder=ClassEmbedder(10, 16).eval(),
                                       vae=vae.eval(), scheduler=DDIMScheduler())


def micro_student(pipe, quant, aux=None, calibrate: bool = True):
    """A quantized copy of `pipe.unet` (LoRA rank 2), calibrated on random inputs at two
    timesteps unless `calibrate=False`."""
    import copy

    from qdiff.config import LoRAConfig
    from qdiff.quant import calibrating, quantize_, set_timesteps

    student = copy.deepcopy(pipe.unet)
    quantize_(student, quant, LoRAConfig(rank=2), aux)
    if calibrate:
        set_timesteps(student, [900.0, 100.0])
        with torch.no_grad(), calibrating(student):
            for t in (900.0, 100.0):
                student(torch.randn(2, 4, 8, 8), t, encoder_hidden_states=torch.randn(2, 1, 16))
    return student


@contextmanager
def ctrl_c_at_training_step(step: int):
    """Within the block, training raises KeyboardInterrupt at its `step`-th optimizer step
    (counted from 1 over every run the block starts), as Ctrl-C or a kill stops it there."""
    from qdiff.distill import loop

    original, calls = loop._optimizer_step, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return original(*args)

    loop._optimizer_step = interrupted
    try:
        yield
    finally:
        loop._optimizer_step = original
