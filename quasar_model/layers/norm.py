"""RMSNorm, with or without a learned scale (the quasar branch normalises its input weightlessly).

zero_centered=True stores the scale as an offset from one, y * (1 + w) with w starting at 0
(Qwen3.5's RMSNorm): the same function as a plain scale of 1 + w, but a teacher's small w keeps its
precision in bf16 (1 + w rounded to bf16 would lose it), and weight decay pulls towards the identity.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from .loading import load_


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True, zero_centered: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered = bool(zero_centered)
        init_value = torch.zeros(dim) if self.zero_centered else torch.ones(dim)
        self.weight = nn.Parameter(init_value) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics: bf16 sums of squares lose too much precision over thousands of channels
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * (1.0 + self.weight.float() if self.zero_centered else self.weight.float())
        return y.to(x.dtype)

    def reset_parameters(self):
        if self.weight is not None:
            (init.zeros_ if self.zero_centered else init.ones_)(self.weight)

    def load_scale(self, w: torch.Tensor, *, zero_centered: bool, name: str = "norm") -> None:
        """w: another norm's weight, scaling by (1 + w) when zero_centered, else by w; stored in this
        norm's own convention (the offset is added only when the two differ, so a copy stays exact)."""
        offset = float(zero_centered) - float(self.zero_centered)
        load_(self.weight, w if offset == 0 else w + offset, name)
