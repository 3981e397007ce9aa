"""Optimizers and learning-rate schedules (warmup, then linear / cosine / exponential decay)."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def make_optimizer(params, settings, lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    lr = settings.learning_rate if lr is None else lr
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; use adamw or sgd")


def lr_factor(step: int, total: int, warmup: int, schedule: str, gamma: float) -> float:
    """Multiplier of the peak learning rate at `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    done = step - warmup
    remaining = max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - done / remaining)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done / remaining)))
    if schedule == "exponential":
        return gamma ** done
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; use linear, cosine, exponential or constant")


def make_scheduler(optimizer, settings, total_steps: int) -> LambdaLR:
    warmup = int(round(settings.warmup_ratio * total_steps))
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, settings.lr_schedule,
                                                      settings.lr_decay_gamma))
