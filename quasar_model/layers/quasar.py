"""The Quasar branch: a continuous-time delta rule.

x^ = RMSNorm(x) (no weight); q, k, v = SiLU(W x^) per head; q, k L2-normalised; beta = sigmoid(W_b x^).
The state S follows the delta-rule gradient flow dS/dt = k (v - S^T k)^T for a time beta, whose
exact solution is one delta-rule step with size alpha = (1 - exp(-beta |k|^2)) / |k|^2
(= 1 - exp(-beta) for unit k). So it runs on any delta-rule kernel with per-token beta = alpha.
Output: W_o(RMSNorm(o) * sigmoid(G(x))), G a low-rank gate with bias.

Optional state decay (config.hybrid_quasar_use_decay, off by default): before each write the state
is multiplied by exp(psi), psi = -exp(A_log) * softplus(W_f x^ + dt_bias) per head and token (the
gated delta rule; A_log and dt_bias get the Mamba2 init). Padded tokens get psi = 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

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
        self.use_decay = bool(getattr(config, "hybrid_quasar_use_decay", False))
        if self.use_decay:  # no parameters at all when the decay is off
            self.decay_proj = nn.Linear(config.hidden_size, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        if not self.use_decay:
            return
        # Mamba2 init as in the Raven branch: A ~ U(0, 16]; dt log-uniform in [1e-3, 0.1], stored as
        # its inverse softplus (transformers.initialization skips tensors loaded from a checkpoint)
        init.copy_(self.A_log, torch.empty_like(self.A_log).uniform_(0, 16).clamp_min(1e-4).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1)))
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))

    def log_decay(self, xh: torch.Tensor) -> torch.Tensor:
        """x^ [B, T, hidden] -> psi [B, T, H] (fp32, <= 0)."""
        return -self.A_log.float().exp() * F.softplus(self.decay_proj(xh).float() + self.dt_bias.float())

    def forward(self, x, state=None, token_mask=None, cu_seqlens=None, **_):
        # x [B, T, hidden] -> y [B, T, hidden], new state [B, H, d, d]
        B, T, _ = x.shape
        xh = self.in_norm(x)
        q, k, v = F.silu(self.qkv_proj(xh)).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
        beta = torch.sigmoid(self.beta_proj(xh).float())  # [B, T, H]
        alpha = continuous_time_step(beta, k.pow(2).sum(-1))
        g = self.log_decay(xh) if self.use_decay else None  # [B, T, H] or None
        if token_mask is not None:  # padding writes nothing (and, with the decay, forgets nothing)
            alpha = alpha * token_mask[..., None]
            if g is not None:
                g = g * token_mask[..., None]
        o, new_state = delta_rule(
            flat(q.to(v.dtype), cu_seqlens), flat(k.to(v.dtype), cu_seqlens), flat(v, cu_seqlens),
            flat(alpha.to(v.dtype), cu_seqlens), scale=self.head_dim ** -0.5, initial_state=state,
            output_final_state=cu_seqlens is None, cu_seqlens=cu_seqlens,
            backend=None if self.backend == "auto" else self.backend,
            g=None if g is None else flat(g, cu_seqlens),
        )
        o = self.o_norm(o.reshape(B, T, self.n_heads, self.head_dim)).reshape(B, T, -1)
        o = o * torch.sigmoid(self.gate_up(self.gate_down(x)))
        return self.o_proj(o), new_state
