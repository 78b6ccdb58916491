"""GQA attention: fused QKV, per-head QK RMSNorm, partial rotary, causal SDPA.

With `attention_output_gate` (Qwen3.5's full-attention layers) the fused projection also yields a
per-channel gate, o <- o * sigmoid(W_g x) before o_proj; its rows follow q, k, v in qkv_proj.
With `attention_qkv_bias` (GLM-4) qkv_proj has a bias (the gate rows' part of it is that of the gate).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .loading import load_
from .norm import RMSNorm
from .rotary import apply_rotary


class GQAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.gated = config.attention_output_gate
        # [q; k; v] (+ [gate], as many channels as q) rows of the fused projection
        self.split = [self.n_heads, self.n_kv, self.n_kv] + ([self.n_heads] if self.gated else [])
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split) * self.head_dim, bias=config.attention_qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        zc = config.zero_centered_rms_norm
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, zero_centered=zc) if config.use_qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, zero_centered=zc) if config.use_qk_norm else nn.Identity()

    @torch.no_grad()
    def load_weights(self, q, k, v, o, *, q_bias=None, k_bias=None, v_bias=None, gate=None, q_norm=None,
                     k_norm=None, norms_zero_centered=False) -> None:
        """An attention given as separate q, k, v (and gate) rows, fused here into qkv_proj."""
        load_(self.qkv_proj.weight, torch.cat([q, k, v] + ([gate] if self.gated else [])), "qkv_proj")
        if (self.qkv_proj.bias is None) != (q_bias is None):
            raise ValueError("qkv_proj: the teacher's q/k/v biases and the student's attention_qkv_bias disagree")
        if q_bias is not None:
            gate_bias = [torch.zeros_like(q_bias)] if self.gated else []  # no teacher has both: the gate's stays 0
            load_(self.qkv_proj.bias, torch.cat([q_bias, k_bias, v_bias] + gate_bias), "qkv_proj.bias")
        load_(self.o_proj.weight, o, "o_proj")
        if q_norm is not None:
            self.q_norm.load_scale(q_norm, zero_centered=norms_zero_centered, name="q_norm")
            self.k_norm.load_scale(k_norm, zero_centered=norms_zero_centered, name="k_norm")

    def forward(self, x, rope, attn_mask=None, state: dict | None = None):
        # x [B, T, hidden]; rope = (cos, sin) [B, T, rotary_dim] or None
        B, T, _ = x.shape
        q, k, v, *gate = self.qkv_proj(x).view(B, T, -1, self.head_dim).split(self.split, dim=2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if state is not None:
            if "k" in state:
                k, v = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], dim=2)
            state["k"], state["v"] = k, v
        # attn_mask: None means plain causal attention over a fresh sequence
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1, enable_gqa=self.n_kv != self.n_heads
        )
        o = o.transpose(1, 2).reshape(B, T, -1)  # [B, T, H*D]
        if self.gated:
            o = o * torch.sigmoid(gate[0].reshape(B, T, -1))  # gate [B, T, H, D] -> [B, T, H*D]
        return self.o_proj(o)
