"""Partial rotary embedding with the RoPE -> NoPE cutoff.

cos/sin are computed only for the position ids present, so memory never grows with
`max_position_embeddings` (5M in preview). Under `rope_short_nope_long`, positions at or past
`nope_after_position` get the identity rotation (cos=1, sin=0). A key below the cutoff keeps its
rotation when a query above it reads it: that is what the checkpoint does, so we keep it.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, theta: float, mode: str, use_nope: bool, nope_after: int):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.mode = mode if use_nope else "rope"
        self.nope_after, self.theta = nope_after, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / max(self.rotary_dim, 1)))

    def reset_parameters(self):
        # non-persistent buffers are not in checkpoints: from_pretrained rebuilds them through here
        init.copy_(self.inv_freq, self._inv_freq())

    @property
    def enabled(self) -> bool:
        return self.rotary_dim > 0 and self.mode != "nope"

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, T] -> cos, sin [B, T, rotary_dim]
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        if self.mode == "rope_short_nope_long":
            freqs = freqs.masked_fill((position_ids >= self.nope_after)[..., None], 0.0)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; rotates the first cos.shape[-1] dims of each head, passes the rest through."""
    r = cos.shape[-1]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
