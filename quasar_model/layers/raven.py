"""The Raven branch: gated slot attention with top-k slot routing and a Mamba2 decay.

Router m = sigmoid(W_r x) over M slots per head; keep the top-k, renormalise to 1 -> r.
A = -exp(A_log) * softplus(W_a x + dt_bias) per head; slot forget f = A r (0 on unselected slots),
write strength s = 1 - exp(f): a slot that is written is forgotten by the same amount.
Hk <- Hk diag(e^f) + k s^T;  p = softmax_M(q^T Hk / sqrt(d));  Hv <- diag(e^f) Hv + s v^T;  o = Hv^T p.
The 1/sqrt(d) read scale (choice) is flash-linear-attention GSA's default.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ..ops.gated_slot import gated_slot_attention
from .loading import load_gqa_shaped_branch
from .norm import RMSNorm
from .packing import flat


class RavenBranch(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        H, Hkv, d, M = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hybrid_raven_slots
        self.n_heads, self.n_kv, self.head_dim, self.slots = H, Hkv, d, M
        self.topk, self.backend = config.hybrid_raven_topk, config.kernel_backend
        self.q_proj = nn.Linear(config.hidden_size, H * d, bias=False)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * Hkv * d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(d, config.rms_norm_eps), RMSNorm(d, config.rms_norm_eps)
        self.router = nn.Linear(config.hidden_size, H * M, bias=False)
        self.dt_proj = nn.Linear(config.hidden_size, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.o_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_proj = nn.Linear(H * d, config.hidden_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # Mamba2 init: A ~ U(0, 16]; dt log-uniform in [1e-3, 0.1], stored as its inverse softplus
        # (transformers.initialization skips tensors already loaded from a checkpoint)
        init.copy_(self.A_log, torch.empty_like(self.A_log).uniform_(0, 16).clamp_min(1e-4).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1)))
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))

    @torch.no_grad()
    def load_from_attention(self, q, k, v, o, *, q_norm=None, k_norm=None, norms_zero_centered=False, **_) -> None:
        """An attention's projections as the branch's start; its biases and output gate have no place here."""
        load_gqa_shaped_branch(self, q, k, v, o, q_norm=q_norm, k_norm=k_norm, norms_zero_centered=norms_zero_centered)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> r [B, T, H, M]: top-k slot weights per head, renormalised to sum 1."""
        B, T, _ = x.shape
        m = torch.sigmoid(self.router(x).float()).view(B, T, self.n_heads, self.slots)
        top, idx = m.topk(self.topk, dim=-1)
        return torch.zeros_like(m).scatter(-1, idx, top / top.sum(-1, keepdim=True))

    def forward(self, x, state=None, token_mask=None, cu_seqlens=None, **_):
        B, T, _ = x.shape
        q = self.q_norm(F.silu(self.q_proj(x)).view(B, T, self.n_heads, self.head_dim))
        k, v = F.silu(self.kv_proj(x)).view(B, T, 2, self.n_kv, self.head_dim).unbind(2)
        k = self.k_norm(k)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        A = -torch.exp(self.A_log.float()) * F.softplus(self.dt_proj(x).float() + self.dt_bias.float())  # [B,T,H]
        f = A[..., None] * self.route(x)  # [B, T, H, M], <= 0
        if token_mask is not None:  # padding neither writes nor forgets
            f = f * token_mask[..., None, None]
        s = -torch.expm1(f)
        o, new_state = gated_slot_attention(
            flat(q, cu_seqlens), flat(k, cu_seqlens), flat(v, cu_seqlens), flat(s.to(v.dtype), cu_seqlens),
            flat(f.to(v.dtype), cu_seqlens), scale=self.head_dim ** -0.5, initial_state=state,
            output_final_state=cu_seqlens is None, cu_seqlens=cu_seqlens,
            backend=None if self.backend == "auto" else self.backend,
        )
        o = self.o_norm(F.silu(o.reshape(B, T, self.n_heads, self.head_dim))).reshape(B, T, -1)
        return self.o_proj(o), new_state
