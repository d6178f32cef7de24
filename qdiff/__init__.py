"""qdiff: quantization-aware distillation of diffusion models into low-bit diffusers pipelines."""

from qdiff.config import ConfigError, RunConfig, load_config
# Importing qdiff.export puts the integer denoiser classes in sys.modules, where diffusers'
# DiffusionPipeline.from_pretrained looks up the classes an export's model_index.json names.
from qdiff.export import export_pipeline
from qdiff.models import (ClassConditionalLDMPipeline, ClassConditionalVideoPipeline, ClassEmbedder,
                          load_pipeline)

__version__ = "0.1.0"

__all__ = [
    "ClassConditionalLDMPipeline",
    "ClassConditionalVideoPipeline",
    "ClassEmbedder",
    "ConfigError",
    "RunConfig",
    "export_pipeline",
    "load_config",
    "load_pipeline",
]
