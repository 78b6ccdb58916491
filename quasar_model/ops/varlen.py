"""Packed documents: N documents laid end to end in one row (batch size 1), their boundaries given
as cu_seqlens [N+1] = [0, end_1, ..., end_N = T], the layout flash-linear-attention's varlen kernels
take. The Triton kernels handle it natively; the PyTorch paths run the op on each document in turn
(`per_document`), each from its own initial state, which is the definition the kernels must match.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

State = torch.Tensor | tuple[torch.Tensor, ...]      # one tensor, or a tuple (GSA's (hk, hv)); N first


def check_cu_seqlens(cu_seqlens, batch: int) -> None:
    """Structure of packed-document boundaries: a 1-D int32/int64 [N+1] tensor over one row."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N+1] of document boundaries")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32/int64 (LongTensor), got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got B={batch}")


def check_cu_seqlens_bounds(bounds: list[int], T: int) -> None:
    """Values of the boundaries (host-side: only where the caller needs them on the host anyway)."""
    if bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T} without decreasing, got {bounds}")


def per_document(op: Callable, tensors: Sequence[torch.Tensor | None], cu_seqlens: torch.Tensor,
                 initial_state: State | None = None, output_final_state: bool = False):
    """op(*segments, h0, output_final_state) -> (o [1, t, ...], final state or None) run on each document.

    tensors [1, T, ...] are cut along time at the boundaries (None entries pass through as None);
    document n starts from initial_state's row n. Returns (o [1, T, ...], the final states stacked
    to [N, ...] (per part for a tuple state) or None).
    """
    bounds = cu_seqlens.tolist()
    check_cu_seqlens_bounds(bounds, tensors[0].shape[1])
    outs, finals = [], []
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        segments = [None if x is None else x[:, bos:eos] for x in tensors]
        o, final = op(*segments, _row(initial_state, n), output_final_state)
        outs.append(o)
        finals.append(final)
    o = torch.cat(outs, dim=1)
    if not output_final_state:
        return o, None
    if isinstance(finals[0], tuple):
        return o, tuple(torch.cat(parts, dim=0) for parts in zip(*finals))
    return o, torch.cat(finals, dim=0)


def _row(state: State | None, n: int) -> State | None:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(x[n:n + 1] for x in state)
    return state[n:n + 1]
