"""Train the embedded video teacher: a tiny class-conditional Wan transformer on moving digits.

The shape follows Wan 2.1 at toy scale: a WanTransformer3DModel with (1, 2, 2) patches,
self-attention over all frames' tokens with 3-D rotary positions, cross-attention to the
condition (here one class token from a learned ClassEmbedder, where Wan has T5 tokens),
trained by flow matching (rectified flow: x_t = (1 - s) x_0 + s noise, target
noise - x_0) with logit-normal sigmas as in SD3. It works on the 16x16 frames themselves
(no autoencoder). 10% of labels are replaced by the null class so that the same network
also gives the unconditional velocity for classifier-free guidance; an EMA of the weights
is what ships. Clips are drawn afresh every step (a random digit of the train split, a
small random rotation and zoom, a random motion), so the model never sees a clip twice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from qdiff.models.class_embedder import ClassEmbedder
from qdiff.models.zoo.digits_data import NUM_CLASSES, load_digits_split
from qdiff.models.zoo.moving_digits import clips_of
from qdiff.models.zoo.train_denoiser import ema_step

CONTEXT_DIM = 64


def build_video_transformer() -> WanTransformer3DModel:
    """About 0.6 M parameters: width 96 (3 heads of 32), 4 blocks, FFN 256; one grey channel.

    The width and depth are what it takes for the digit to keep its shape from frame to
    frame; a smaller transformer lets it change shape (docs/notes/research-log.md, Video).
    """
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=32, in_channels=1,
        out_channels=1, text_dim=CONTEXT_DIM, freq_dim=64, ffn_dim=256, num_layers=4,
        rope_max_seq_len=32)


def build_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flow matching on 1000 training timesteps (t = 1000 sigma), no shift at this size."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int,
                  warmup_fraction: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_fraction` of `steps` (at least one step), then cosine to 0.

    Unlike OneCycleLR it accepts any number of steps (OneCycleLR divides by zero at 20).
    """
    warmup = max(1, round(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _flow_loss(model: nn.ModuleDict, videos: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator, label_dropout: float) -> torch.Tensor:
    """MSE of the predicted velocity at a logit-normal sigma; `videos` is (N, C, F, H, W)."""
    n = len(videos)
    noise = torch.randn(videos.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(n, generator=generator))
    noisy = videos + sigma.view(n, 1, 1, 1, 1) * (noise - videos)
    drop = torch.rand(n, generator=generator) < label_dropout
    labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
    context = model["class_embedder"](labels)
    velocity = model["transformer"](noisy, sigma * 1000, context, return_dict=False)[0]
    return F.mse_loss(velocity, noise - videos)


def train_video_teacher(steps: int = 3000, batch_size: int = 32, lr: float = 1e-3,
                        label_dropout: float = 0.1, ema_decay: float = 0.995, seed: int = 0
                        ) -> tuple[WanTransformer3DModel, ClassEmbedder]:
    """The EMA transformer and class embedder after `steps` AdamW steps (warm-up, cosine)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = load_digits_split("train")
    model = nn.ModuleDict({"transformer": build_video_transformer(),
                           "class_embedder": ClassEmbedder(NUM_CLASSES, CONTEXT_DIM)})
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    model.train()
    progress = tqdm(range(steps), desc="video denoiser", unit="step", mininterval=10)
    for _ in progress:
        index = torch.randint(len(train.labels), (batch_size,), generator=generator)
        batch = clips_of(train, index, generator, augment=True)
        loss = _flow_loss(model, batch.clips.transpose(1, 2), batch.labels, generator,
                          label_dropout)
        ema_step(model, ema, optimizer, schedule, loss)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    trained = ema.module.eval()
    return trained["transformer"], trained["class_embedder"]
