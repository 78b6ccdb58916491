"""The Quasar branch: a continuous-time delta rule.

x^ = RMSNorm(x) (no weight); q, k, v = SiLU(W x^) per head; q, k L2-normalised; beta = sigmoid(W_b x^).
The state S follows the delta-rule gradient flow dS/dt = k (v - S^T k)^T for a time beta, whose
exact solution is one delta-rule step with size alpha = (1 - exp(-beta |k|^2)) / |k|^2
(= 1 - exp(-beta) for unit k). So it runs on any delta-rule kernel with per-token beta = alpha.
Output: W_o(RMSNorm(o) * sigmoid(G(x))), G a low-rank gate with bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.delta_rule import delta_rule
from .norm import RMSNorm
from .packing import flat


def continuous_time_step(beta: torch.Tensor, k_sq_norm: torch.Tensor) -> torch.Tensor:
    """alpha = (1 - exp(-beta |k|^2)) / |k|^2, with its limit beta as |k| -> 0."""
    safe = k_sq_norm.clamp_min(1e-6)
    alpha = -torch.expm1(-beta * safe) / safe
    return torch.where(k_sq_norm > 1e-6, alpha, beta)


class QuasarBranch(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        H, d = config.num_attention_heads, config.head_dim
        self.n_heads, self.head_dim, self.backend = H, d, config.kernel_backend
        self.in_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, elementwise_affine=False)
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * H * d, bias=False)
        self.beta_proj = nn.Linear(config.hidden_size, H, bias=False)
        self.o_norm = RMSNorm(d, config.rms_norm_eps)
        self.gate_down = nn.Linear(config.hidden_size, config.hybrid_quasar_gate_rank, bias=False)
        self.gate_up = nn.Linear(config.hybrid_quasar_gate_rank, H * d, bias=True)
        self.o_proj = nn.Linear(H * d, config.hidden_size, bias=False)

    def forward(self, x, state=None, token_mask=None, cu_seqlens=None, **_):
        # x [B, T, hidden] -> y [B, T, hidden], new state [B, H, d, d]
        B, T, _ = x.shape
        xh = self.in_norm(x)
        q, k, v = F.silu(self.qkv_proj(xh)).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
        beta = torch.sigmoid(self.beta_proj(xh).float())  # [B, T, H]
        alpha = continuous_time_step(beta, k.pow(2).sum(-1))
        if token_mask is not None:  # padding writes nothing
            alpha = alpha * token_mask[..., None]
        o, new_state = delta_rule(
            flat(q.to(v.dtype), cu_seqlens), flat(k.to(v.dtype), cu_seqlens), flat(v, cu_seqlens),
            flat(alpha.to(v.dtype), cu_seqlens), scale=self.head_dim ** -0.5, initial_state=state,
            output_final_state=cu_seqlens is None, cu_seqlens=cu_seqlens,
            backend=None if self.backend == "auto" else self.backend,
        )
        o = self.o_norm(o.reshape(B, T, self.n_heads, self.head_dim)).reshape(B, T, -1)
        o = o * torch.sigmoid(self.gate_up(self.gate_down(x)))
        return self.o_proj(o), new_state
