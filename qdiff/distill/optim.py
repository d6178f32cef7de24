"""AdamW over the student's trainable parts, one group per role, and the LR schedule.

Groups: QALoRA per layer (learning rate proportional to the layer's mean weight step
size: with Adam, scaling a gradient does nothing, scaling the rate does -- EfficientDM),
temporal activation step sizes (optionally one group per table, rate proportional to its
mean step, for the same reason), weight step sizes, and QVGen's Phi. Everything else in
the student stays frozen -- except, for full QAT (`distill.base_weight_lr` > 0), the base
weights themselves, in one more group.
"""

from __future__ import annotations

import torch
from torch import nn

from qdiff.config import RunConfig
from qdiff.quant import act_param_groups, lora_param_groups, quant_parameters


def freeze_all_but_quant_params(student: nn.Module, train_base_weights: bool = False,
                                train_weight_scales: bool = True) -> None:
    """Only the parts the optimizer updates take gradients: a frozen weight step size costs
    its layer the full weight gradient for nothing (and `lora.low_rank_backward` needs it)."""
    student.requires_grad_(False)
    params = quant_parameters(student)
    trainable = params.lora + params.act_scales + params.aux
    trainable += params.weight_scales if train_weight_scales else []
    for param in trainable + (params.base_weights if train_base_weights else []):
        param.requires_grad_(True)


def build_optimizer(student: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    params = quant_parameters(student)
    groups = lora_param_groups(student, cfg.distill.lr, cfg.lora.scale_aware_lr)
    groups += act_param_groups(student, cfg.distill.act_lr, cfg.distill.scale_aware_act_lr)
    groups += [
        {"params": [p for p in params.weight_scales if p.requires_grad], "lr": cfg.distill.weight_scale_lr,
         "name": "weight_scales"},
        {"params": params.aux, "lr": cfg.distill.aux_lr, "name": "aux"},
    ]
    if cfg.distill.base_weight_lr > 0:
        groups.append({"params": params.base_weights, "lr": cfg.distill.base_weight_lr,
                       "name": "base_weights"})
    groups = [group for group in groups if group["params"]]
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.AdamW(groups, weight_decay=cfg.distill.weight_decay)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then linear decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """The schedule is a pure function of the step, so a resumed run needs no scheduler state."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
