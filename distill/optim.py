"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

Groups: weight decay pulls weights toward 0, which is right for matrices and wrong for parameters
whose neutral value is not 0 or that are single numbers per channel: norm gains (1), biases, the
hybrid gates (alpha, branch gain, channel scale, loop gates), the branches' decay parameters
(A_log, dt_bias). Those are exactly the parameters with fewer than two dimensions, plus anything
named a norm or a bias. Engram parameters (hash tables, projections, gate norms) are touched by few
tokens per step, so they learn with `lr * engram_lr_multiplier` (Engram paper's recipe).

    lr(step) = lr * (step + 1) / warmup                                    step < warmup
             = lr * (r + (1 - r) * (1 + cos(pi * t)) / 2),  t = (step - warmup) / (total - warmup)
"""
from __future__ import annotations

import math

import torch
from torch import nn


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm gains, biases, gates, per-channel scales: every < 2-D parameter, and named norms/biases."""
    parts = name.split(".")
    return param.ndim < 2 or parts[-1] == "bias" or any("norm" in p for p in parts[:-1])


def is_engram(name: str) -> bool:
    return ".engram." in f".{name}"


def param_groups(model: nn.Module, *, weight_decay: float, engram_lr_multiplier: float = 1.0) -> list[dict]:
    """Up to four AdamW groups: {plain, engram} x {decay, no decay}; each carries `lr_scale`."""
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        buckets.setdefault((is_engram(name), no_weight_decay(name, p)), []).append(p)
    groups = []
    for (engram, no_wd), params in sorted(buckets.items()):
        groups.append({
            "params": params,
            "name": ("engram_" if engram else "") + ("no_decay" if no_wd else "decay"),
            "weight_decay": 0.0 if no_wd else weight_decay,
            "lr_scale": engram_lr_multiplier if engram else 1.0,
        })
    return groups


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    eps: float = 1e-8, engram_lr_multiplier: float = 1.0) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay=weight_decay, engram_lr_multiplier=engram_lr_multiplier)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]      # LambdaLR multiplies each group's initial lr
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


class WarmupCosine:
    """lr multiplier at a step: linear warmup to 1, cosine down to min_ratio at `total` steps.

    A class, not a closure, so LambdaLR's state_dict saves (and a resume restores) its settings.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.1):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer, *, warmup: int, total: int, min_ratio: float = 0.1):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio))
