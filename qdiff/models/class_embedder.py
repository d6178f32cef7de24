"""Class id -> cross-attention context, as LDM-4 ImageNet's `ClassEmbedder` does."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ClassEmbedder(ModelMixin, ConfigMixin):
    """A learned embedding per class plus one for the null class (id `num_classes`).

    The output, shape (N, 1, embed_dim), is the denoiser's `encoder_hidden_states`: the
    class reaches the UNet only through cross-attention. The null class is the
    unconditional branch of classifier-free guidance (class 1000 for LDM-4 ImageNet).
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, embed_dim: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        if class_labels.min() < 0 or class_labels.max() > self.null_class:
            raise ValueError(f"class labels must lie in 0..{self.null_class - 1} "
                             f"(or {self.null_class} for the null class), got "
                             f"{class_labels.min().item()}..{class_labels.max().item()}.")
        return self.embedding(class_labels)[:, None, :]
