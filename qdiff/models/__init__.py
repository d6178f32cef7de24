"""Teacher pipelines: the families qdiff distils and the pipelines it defines itself."""

from qdiff.models.class_embedder import ClassEmbedder
from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline
from qdiff.models.class_video_pipeline import ClassConditionalVideoPipeline
from qdiff.models.loading import load_pipeline

__all__ = ["ClassEmbedder", "ClassConditionalLDMPipeline", "ClassConditionalVideoPipeline",
           "load_pipeline"]
