"""qdiff: quantization-aware distillation of diffusion models into low-bit diffusers pipelines."""

from qdiff.config import ConfigError, RunConfig, load_config
from qdiff.models import ClassConditionalLDMPipeline, ClassEmbedder, load_pipeline

__version__ = "0.1.0"

__all__ = [
    "ClassConditionalLDMPipeline",
    "ClassEmbedder",
    "ConfigError",
    "RunConfig",
    "load_config",
    "load_pipeline",
]
