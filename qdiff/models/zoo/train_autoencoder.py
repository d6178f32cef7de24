"""Train the VQ-f4 autoencoder of the embedded teacher (32x32x1 <-> 8x8x3, as LDM-4's VQ-f4).

Two phases, because a vector quantizer trained from a random codebook collapses onto a
few codes:
  1. warm-up: encoder and decoder learn without quantization (plus a small penalty that
     keeps latents near the unit ball, where the codebook will live);
  2. the codebook is seeded with encoder outputs, then everything trains through the
     quantizer; codes unused for a while are re-seeded with current latents.
The diffusion model later works on the continuous pre-quantization latents, and the
decoder snaps them to the codebook, as in LDM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import VQModel
from tqdm import tqdm

from qdiff.models.zoo.digits_data import IMAGE_SIZE, load_digits_split, random_affine

DEAD_CODE_INTERVAL = 100


def build_vq_f4(latent_channels: int = 3, num_codes: int = 256) -> VQModel:
    return VQModel(
        in_channels=1, out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=latent_channels,
        sample_size=IMAGE_SIZE, num_vq_embeddings=num_codes, vq_embed_dim=latent_channels,
        norm_num_groups=32, scaling_factor=1.0,
    )


def _flat_latents(vae: VQModel, images: torch.Tensor) -> torch.Tensor:
    latents = vae.encode(images).latents
    return latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])


def _reseed_codes(vae: VQModel, latents: torch.Tensor, codes: torch.Tensor,
                  generator: torch.Generator) -> None:
    """Set the codebook entries `codes` to randomly chosen current latents."""
    pick = torch.randint(len(latents), (len(codes),), generator=generator)
    vae.quantize.embedding.weight.data[codes] = latents[pick].detach()


def _step_loss(vae: VQModel, images: torch.Tensor, quantized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    latents = vae.encode(images).latents
    if not quantized:
        reconstruction = vae.decode(latents, force_not_quantize=True).sample
        penalty = 1e-3 * latents.pow(2).mean()
        return F.l1_loss(reconstruction, images) + penalty, torch.empty(0, dtype=torch.long)
    _, commit_loss, (_, _, indices) = vae.quantize(latents)
    reconstruction = vae.decode(latents).sample
    return F.l1_loss(reconstruction, images) + commit_loss, indices.reshape(-1)


def train_vq_autoencoder(steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
                         warmup_fraction: float = 0.3, seed: int = 0) -> VQModel:
    """A VQ-f4 autoencoder of the train split, its `scaling_factor` set to 1 / latent std."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = load_digits_split("train").images
    vae = build_vq_f4()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    warmup_steps = int(steps * warmup_fraction)
    usage = torch.zeros(vae.config.num_vq_embeddings)
    progress = tqdm(range(steps), desc="autoencoder", unit="step")
    for step in progress:
        images = random_affine(train[torch.randint(len(train), (batch_size,), generator=generator)],
                               generator)
        if step == warmup_steps:
            with torch.no_grad():
                _reseed_codes(vae, _flat_latents(vae, train[:512]),
                              torch.arange(vae.config.num_vq_embeddings), generator)
        loss, indices = _step_loss(vae, images, quantized=step >= warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        usage += torch.bincount(indices, minlength=len(usage))
        if step > warmup_steps and step % DEAD_CODE_INTERVAL == 0:
            with torch.no_grad():
                dead = (usage == 0).nonzero().flatten()
                if len(dead):
                    _reseed_codes(vae, _flat_latents(vae, images), dead, generator)
            usage.zero_()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        scale = 1.0 / _flat_latents(vae, train).std().item()
    vae.register_to_config(scaling_factor=scale)
    return vae


@torch.no_grad()
def reconstruction_error(vae: VQModel, images: torch.Tensor) -> float:
    """Mean absolute error in [-1, 1] pixel units after encode -> quantize -> decode."""
    vae.eval()
    return F.l1_loss(vae(images).sample, images).item()
