"""RMSNorm, with or without a learned scale (the quasar branch normalises its input weightlessly)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics: bf16 sums of squares lose too much precision over thousands of channels
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)

    def reset_parameters(self):
        if self.weight is not None:
            init.ones_(self.weight)
