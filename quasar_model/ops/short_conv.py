"""Causal depthwise short convolution (gated DeltaNet's q/k/v mixing over the last few tokens).

Per channel c and token t, with a kernel of K taps w[c, 0..K-1] (cross-correlation, as
`torch.nn.Conv1d`: the LAST tap multiplies the current token):

    y[t, c] = sum_{j=0}^{K-1} w[c, j] * x[t - (K-1) + j, c]        x[s] = 0 (or the state) for s < 0

Decoding keeps the K-1 inputs before the next token as the state ([B, K-1, C]), so a step is the
same formula over [state; x]. Packed documents (`cu_seqlens`) are convolved one by one: a window
never reaches into the previous document.

Two entry points:
  short_conv_reference  the tap loop above; reference for tests.
  short_conv            F.conv1d (grouped, one group per channel); same result.

Layout: x [B, T, C]; weight [C, K]; state [B, K-1, C]. No activation here (callers apply theirs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .varlen import per_document

__all__ = ["short_conv", "short_conv_reference"]


def _check(x, weight, state):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C], got shape {tuple(x.shape)}")
    B, _, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"weight must be [C, K] with C = {C}, got shape {tuple(weight.shape)}")
    K = weight.shape[1]
    if state is not None and tuple(state.shape) != (B, K - 1, C):
        raise ValueError(f"state must be [B, K-1, C] = {(B, K - 1, C)}, got {tuple(state.shape)}")


def _with_history(x: torch.Tensor, K: int, state: torch.Tensor | None) -> torch.Tensor:
    """[B, T, C] -> [B, K-1+T, C]: the K-1 inputs before x (the state, or zeros) prepended."""
    if state is None:
        return F.pad(x, (0, 0, K - 1, 0))
    return torch.cat([state.to(x.dtype), x], dim=1)


def short_conv_reference(x, weight, state=None, output_final_state=False):
    """The tap loop, fp32 at least. Returns (y [B, T, C] in x.dtype, final state [B, K-1, C] or None)."""
    _check(x, weight, state)
    T, K = x.shape[1], weight.shape[1]
    dt = torch.promote_types(x.dtype, torch.float32)
    xp = _with_history(x.to(dt), K, state)  # [B, K-1+T, C]
    y = sum(weight[:, j].to(dt) * xp[:, j:j + T] for j in range(K))
    final = xp[:, xp.shape[1] - (K - 1):] if output_final_state else None
    return y.to(x.dtype), final


def _conv(x, weight, state):
    # x [B, T, C] -> [B, T, C]; one group per channel, no padding: the history supplies the K-1 taps
    xp = _with_history(x, weight.shape[1], state)
    y = F.conv1d(xp.transpose(1, 2), weight.to(x.dtype)[:, None, :], groups=weight.shape[0])  # [B, C, T]
    return y.transpose(1, 2), xp


def short_conv(x, weight, state=None, output_final_state=False, cu_seqlens=None):
    """Causal depthwise conv. Returns (y [B, T, C], final state [B, K-1, C] or None).

    cu_seqlens: LongTensor [N+1] of document boundaries over one packed row (B must be 1); each
    document starts from zero history, and no state is returned (packed rows are never decoded).
    """
    _check(x, weight, state)
    K = weight.shape[1]
    if cu_seqlens is not None:
        if x.shape[0] != 1 or state is not None:
            raise ValueError("short_conv: packed documents (cu_seqlens) need B == 1 and no state")
        return per_document(lambda x, h0, final: (_conv(x, weight, None)[0], None), (x,), cu_seqlens)
    y, xp = _conv(x, weight, state)
    # the state is the last K-1 inputs, including history when T < K-1 (a decode step)
    return y, (xp[:, xp.shape[1] - (K - 1):] if output_final_state else None)
