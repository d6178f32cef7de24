"""Train the class-conditional UNet of the embedded teacher on VQ-f4 latents of digits.

The shape follows LDM-4 ImageNet at toy scale: a UNet2DConditionModel whose top level
has no attention and whose lower levels cross-attend to one class token; the class
embedding trains with it, and 10% of labels are replaced by the null class so that the
same network also predicts the unconditional noise for classifier-free guidance. An EMA
of the weights is what ships, as in LDM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from qdiff.models.class_embedder import ClassEmbedder
from qdiff.models.zoo.digits_data import NUM_CLASSES, load_digits_split, random_affine

CONTEXT_DIM = 64


def build_class_unet(latent_channels: int = 3, latent_size: int = 8) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=2,
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=4, norm_num_groups=16,
    )


def build_ddim_scheduler() -> DDIMScheduler:
    """LDM-4's noise schedule: 1000 steps, scaled-linear betas 0.0015 -> 0.0195."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                         beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


@torch.no_grad()
def encode_latent_dataset(vae: VQModel, copies: int, generator: torch.Generator,
                          batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled pre-quantization latents of `copies` augmented passes over the train split.

    Encoding once up front keeps the VAE out of the diffusion training loop.
    """
    train = load_digits_split("train")
    vae.eval()
    latents, labels = [], []
    for copy in range(copies):
        images = train.images if copy == 0 else random_affine(train.images, generator)
        for start in range(0, len(images), batch_size):
            latents.append(vae.encode(images[start:start + batch_size]).latents)
        labels.append(train.labels)
    return torch.cat(latents) * vae.config.scaling_factor, torch.cat(labels)


def _denoising_loss(model: nn.ModuleDict, scheduler: DDIMScheduler, latents: torch.Tensor,
                    labels: torch.Tensor, generator: torch.Generator,
                    label_dropout: float) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(latents),),
                              generator=generator)
    drop = torch.rand(len(labels), generator=generator) < label_dropout
    labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    context = model["class_embedder"](labels)
    prediction = model["unet"](noisy, timesteps, encoder_hidden_states=context).sample
    return F.mse_loss(prediction, noise)


def ema_step(model: nn.Module, ema: AveragedModel, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LRScheduler, loss: torch.Tensor) -> None:
    """One optimizer step on `loss` (gradient norm clipped to 1), then the learning-rate
    schedule's step and the EMA's update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    ema.update_parameters(model)


def train_class_ldm(vae: VQModel, steps: int = 6000, batch_size: int = 128, lr: float = 1e-3,
                    label_dropout: float = 0.1, ema_decay: float = 0.999, latent_copies: int = 16,
                    seed: int = 0) -> tuple[UNet2DConditionModel, ClassEmbedder]:
    """The EMA UNet and class embedder after `steps` AdamW steps with cosine decay."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    latents, labels = encode_latent_dataset(vae, latent_copies, generator)
    model = nn.ModuleDict({"unet": build_class_unet(latents.shape[1], latents.shape[-1]),
                           "class_embedder": ClassEmbedder(NUM_CLASSES, CONTEXT_DIM)})
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    scheduler = build_ddim_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.05)
    model.train()
    progress = tqdm(range(steps), desc="denoiser", unit="step")
    for _ in progress:
        index = torch.randint(len(labels), (batch_size,), generator=generator)
        loss = _denoising_loss(model, scheduler, latents[index], labels[index], generator,
                               label_dropout)
        ema_step(model, ema, optimizer, schedule, loss)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    trained = ema.module.eval()
    return trained["unet"], trained["class_embedder"]
