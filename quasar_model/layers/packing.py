"""Packed documents for the recurrent branches.

A packed batch (position ids reset per document) is flattened to one row and split by
`cu_seqlens`, the layout flash-linear-attention's varlen kernels take; each document then starts
from a zero state. Decoding never packs, so states only flow when `cu_seqlens` is None.
"""
from __future__ import annotations

import torch


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, T] position ids -> document boundaries over the flattened B*T tokens, or None if unpacked."""
    B, T = position_ids.shape
    starts = torch.zeros_like(position_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = position_ids[:, 1:] <= position_ids[:, :-1]
    if B == starts.sum():
        return None
    idx = torch.nonzero(starts.flatten(), as_tuple=False).flatten()
    return torch.cat([idx, idx.new_tensor([B * T])])


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T] index of the document each token belongs to (within its row)."""
    resets = torch.zeros_like(position_ids, dtype=torch.long)
    resets[:, 1:] = (position_ids[:, 1:] <= position_ids[:, :-1]).long()
    return resets.cumsum(-1)


def flat(x: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """[B, T, ...] -> [1, B*T, ...] when packed; unchanged otherwise."""
    return x if cu_seqlens is None else x.reshape(1, -1, *x.shape[2:])
