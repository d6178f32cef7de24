"""Shared fixtures: tiny random pipelines built from the zoo's configs, and the assets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster than two oversubscribing a busy CPU, and repeatable.

    Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
