"""Train the digits feature network and compute the reference statistics of real digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qdiff.eval.digits_features import DigitsFeatureNet
from qdiff.eval.features import extract_features
from qdiff.eval.metrics import reference_stats
from qdiff.models.zoo.digits_data import load_digits_split, random_affine


def train_feature_net(steps: int = 1500, batch_size: int = 128, lr: float = 2e-3,
                      seed: int = 0) -> DigitsFeatureNet:
    """Classifier trained with augmentation on the train split (AdamW, cosine decay)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = load_digits_split("train")
    net = DigitsFeatureNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    net.train()
    progress = tqdm(range(steps), desc="feature net", unit="step")
    for _ in progress:
        index = torch.randint(len(train.labels), (batch_size,), generator=generator)
        images = random_affine(train.images[index], generator)
        loss = F.cross_entropy(net((images + 1) / 2).logits, train.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return net.eval()


def held_out_accuracy(net: DigitsFeatureNet) -> float:
    held_out = load_digits_split("held_out")
    logits = extract_features(net, (held_out.images + 1) / 2).logits
    return (logits.argmax(1) == held_out.labels).float().mean().item()


def held_out_reference_stats(net: DigitsFeatureNet) -> dict[str, torch.Tensor]:
    """FID/sFID statistics of the real held-out digits, under ADM's reference-batch names."""
    held_out = load_digits_split("held_out")
    stats = reference_stats(extract_features(net, (held_out.images + 1) / 2))
    return {name: torch.from_numpy(value) for name, value in stats.items()}
