"""The GLA branch: gated linear attention with a fixed per-head, per-layer decay.

g_h = -slope_h * (1 - max(l-1, 0)/(L-1) + 1e-5), slope_h = 2^(-0.5 (h+1)): early layers forget
fast, late layers remember long. S <- e^{g_h} S + k v^T, o = S^T q / sqrt(d).
Output W_o(GroupRMSNorm(o) * sigmoid(W_g x)). With `hybrid_gla_data_dependent_gate` the decay is
instead per key channel, logsigmoid(W x)/16 from a low-rank projection (as in Quasar-10B).
With `hybrid_gla_nope` the branch ignores the rotary embedding at every position (Quasar-10B's
GLA layers are NoPE: the decay alone carries order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ..ops.gla import gated_linear_attention
from .loading import load_, load_gqa_shaped_branch
from .norm import RMSNorm
from .packing import flat
from .rotary import apply_rotary

GATE_LOGIT_NORMALIZER = 16.0


def fixed_log_decay(n_heads: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    slope = torch.tensor([2.0 ** (-0.5 * (h + 1)) for h in range(n_heads)])
    depth = max(layer_idx - 1, 0) / max(n_layers - 1, 1)
    return -slope * (1.0 - depth + 1e-5)


class GLABranch(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        H, Hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.backend = H, Hkv, d, config.kernel_backend
        self.q_proj = nn.Linear(config.hidden_size, H * d, bias=False)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * Hkv * d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(d, config.rms_norm_eps), RMSNorm(d, config.rms_norm_eps)
        self.data_dependent = config.hybrid_gla_data_dependent_gate
        self.nope = config.hybrid_gla_nope
        if self.data_dependent:
            self.gk_down = nn.Linear(config.hidden_size, 16, bias=False)
            self.gk_up = nn.Linear(16, H * d, bias=True)
        self.decay_args = (H, layer_idx, config.num_hidden_layers)
        self.register_buffer("log_decay", fixed_log_decay(*self.decay_args), persistent=False)
        self.g_proj = nn.Linear(config.hidden_size, H * d, bias=False)
        self.o_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_proj = nn.Linear(H * d, config.hidden_size, bias=False)

    def reset_parameters(self):
        init.copy_(self.log_decay, fixed_log_decay(*self.decay_args))  # not saved: rebuilt on load

    @torch.no_grad()
    def load_from_attention(self, q, k, v, o, *, gate=None, q_norm=None, k_norm=None, norms_zero_centered=False,
                            **_) -> None:
        """An attention's projections as the branch's start (its q/k biases have no place here); an
        attention output gate becomes g_proj: both gate the read-out by sigmoid(W x) per channel."""
        load_gqa_shaped_branch(self, q, k, v, o, q_norm=q_norm, k_norm=k_norm, norms_zero_centered=norms_zero_centered)
        if gate is not None:
            load_(self.g_proj.weight, gate, "branch.g_proj")

    def forward(self, x, state=None, token_mask=None, cu_seqlens=None, rope=None, **_):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv, self.head_dim).unbind(2)
        k = self.k_norm(k)
        if rope is not None and not self.nope:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        if self.data_dependent:
            g = F.logsigmoid(self.gk_up(self.gk_down(x)).float()) / GATE_LOGIT_NORMALIZER
            g = g.view(B, T, self.n_heads, self.head_dim)
        else:
            g = self.log_decay.float().expand(B, T, self.n_heads)
        if token_mask is not None:  # padding neither writes nor decays
            m = token_mask.to(k.dtype)[..., None, None]
            k, v = k * m, v * m
            g = g * (m[..., 0] if g.dim() == 3 else m)
        o, new_state = gated_linear_attention(
            flat(q, cu_seqlens), flat(k, cu_seqlens), flat(v, cu_seqlens), flat(g.contiguous(), cu_seqlens),
            scale=self.head_dim ** -0.5, initial_state=state, output_final_state=cu_seqlens is None,
            cu_seqlens=cu_seqlens, backend=None if self.backend == "auto" else self.backend,
        )
        o = self.o_norm(o.reshape(B, T, self.n_heads, self.head_dim)).reshape(B, T, -1)
        return self.o_proj(o * torch.sigmoid(self.g_proj(x))), new_state
