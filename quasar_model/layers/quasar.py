"""The Quasar branch: a continuous-time delta rule.

x^ = RMSNorm(x) (no weight); q, k, v = SiLU(W x^) per head; q, k L2-normalised; beta = sigmoid(W_b x^).
The state S follows the delta-rule gradient flow dS/dt = k (v - S^T k)^T for a time beta, whose
exact solution is one delta-rule step with size alpha = (1 - exp(-beta |k|^2)) / |k|^2
(= 1 - exp(-beta) for unit k). So it runs on any delta-rule kernel with per-token beta = alpha.
Output: W_o(RMSNorm(o) * sigmoid(G(x))), G a low-rank gate with bias.

Optional state decay (config.hybrid_quasar_use_decay, off by default): before each write the state
is multiplied by exp(psi), psi = -exp(A_log) * softplus(W_f x^ + dt_bias) per head and token (the
gated delta rule; A_log and dt_bias get the Mamba2 init). Padded tokens get psi = 0.

Gated-DeltaNet form (Qwen3.5's linear-attention layers; every option off by default):
- hybrid_quasar_conv_kernel = K: q, k, v = SiLU(conv_K(W x^)), a causal depthwise convolution over
  the last K tokens (ops/short_conv.py), whose K-1 inputs are kept with S in the decoding cache;
- separate head counts: Hk q/k heads of dim dk, Hv = m Hk value heads of dim dv, each q/k head
  repeated over m consecutive value heads (the state is [Hv, dk, dv]; beta, psi per value head);
- hybrid_quasar_input_norm = False: x^ = x (the layer's input norm already ran);
- hybrid_quasar_l2norm_eps = 1e-6: q, k <- x * rsqrt(|x|^2 + eps), fla's l2norm, bit for bit;
- hybrid_quasar_step = "softplus": the continuous time is beta_c = softplus(W_b x^). Keys are unit
  (L2-normalised), so alpha = 1 - exp(-beta_c) = 1 - sigmoid(-W_b x^) = sigmoid(W_b x^): exactly
  the discrete rule's (Qwen3.5's, fla's) beta = sigmoid(b). Unit keys are assumed, not measured:
  with the eps above |k|^2 is 1 - O(eps / |k|^2), and using it would move alpha off the teacher's.
- the decay above is Qwen3.5's g = -exp(A_log) * softplus(a + dt_bias), with a = decay_proj(x^);
- hybrid_quasar_output_gate = "silu_z": W_o(RMSNorm(o) * SiLU(W_z x)) per value head (Qwen3.5's
  z-gated RMSNorm), instead of the low-rank sigmoid gate.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ..ops.delta_rule import delta_rule
from ..ops.short_conv import short_conv
from .loading import load_
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
        Hk, Hv, dk, dv = config.quasar_heads()
        self.n_k_heads, self.n_heads, self.head_dim, self.v_dim = Hk, Hv, dk, dv
        self.backend = config.kernel_backend
        self.in_norm = (RMSNorm(config.hidden_size, config.rms_norm_eps, elementwise_affine=False)
                        if config.hybrid_quasar_input_norm else None)
        self.l2_eps = float(config.hybrid_quasar_l2norm_eps)
        self.softplus_step = config.hybrid_quasar_step == "softplus"
        self.split = [Hk * dk, Hk * dk, Hv * dv]  # rows of qkv_proj: [q; k; v]
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split), bias=False)
        K = config.hybrid_quasar_conv_kernel
        # [channels, taps], the last tap on the current token (nn.Conv1d's depthwise weight, squeezed)
        self.conv_weight = nn.Parameter(torch.empty(sum(self.split), K)) if K else None
        self.beta_proj = nn.Linear(config.hidden_size, Hv, bias=False)
        self.o_norm = RMSNorm(dv, config.rms_norm_eps)
        self.z_gate = config.hybrid_quasar_output_gate == "silu_z"
        if self.z_gate:
            self.z_proj = nn.Linear(config.hidden_size, Hv * dv, bias=False)
        else:
            self.gate_down = nn.Linear(config.hidden_size, config.hybrid_quasar_gate_rank, bias=False)
            self.gate_up = nn.Linear(config.hybrid_quasar_gate_rank, Hv * dv, bias=True)
        self.o_proj = nn.Linear(Hv * dv, config.hidden_size, bias=False)
        self.use_decay = bool(config.hybrid_quasar_use_decay)
        if self.use_decay:  # no parameters at all when the decay is off
            self.decay_proj = nn.Linear(config.hidden_size, Hv, bias=False)
            self.A_log = nn.Parameter(torch.empty(Hv))
            self.dt_bias = nn.Parameter(torch.empty(Hv))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        if self.conv_weight is not None:  # nn.Conv1d's default for a depthwise kernel (fan-in = taps)
            bound = self.conv_weight.shape[1] ** -0.5
            init.uniform_(self.conv_weight, -bound, bound)
        if not self.use_decay:
            return
        # Mamba2 init as in the Raven branch: A ~ U(0, 16]; dt log-uniform in [1e-3, 0.1], stored as
        # its inverse softplus (transformers.initialization skips tensors loaded from a checkpoint)
        init.copy_(self.A_log, torch.empty_like(self.A_log).uniform_(0, 16).clamp_min(1e-4).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1)))
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))

    @torch.no_grad()
    def load_from_attention(self, q, k, v, o, **_) -> None:
        """A GQA attention's q, k, v, o as the branch's start, the usual linearisation init: one q/k/v
        per head, each KV head's rows repeated over its group (norms, biases and gates are left out)."""
        if k.shape[0] % self.head_dim or self.n_k_heads % (k.shape[0] // self.head_dim):
            raise ValueError(f"branch.qkv_proj: teacher k rows {k.shape[0]} are not whole heads of the "
                             f"branch's {self.n_k_heads} heads of dim {self.head_dim}")
        n_kv = k.shape[0] // self.head_dim
        rep = self.n_k_heads // n_kv

        def repeat_heads(w):  # [n_kv*d, hidden] -> [n_kv*rep*d, hidden]
            return w.view(n_kv, self.head_dim, -1).repeat_interleave(rep, dim=0).reshape(n_kv * rep * self.head_dim, -1)

        load_(self.qkv_proj.weight, torch.cat([q, repeat_heads(k), repeat_heads(v)]), "branch.qkv_proj")
        load_(self.o_proj.weight, o, "branch.o_proj")

    @torch.no_grad()
    def load_gated_deltanet(self, qkv, conv, beta, decay, A_log, dt_bias, o_norm, z, o) -> None:
        """A gated DeltaNet (Qwen3.5's linear attention) in this branch's gated-DeltaNet form: the same
        math and the same [q; k; v] layout. conv [C, K] (a depthwise kernel's taps); o_norm is the
        z-gated norm's plain weight."""
        for dst, src, name in ((self.qkv_proj.weight, qkv, "qkv_proj"), (self.conv_weight, conv, "conv_weight"),
                               (self.beta_proj.weight, beta, "beta_proj"), (self.decay_proj.weight, decay, "decay_proj"),
                               (self.A_log, A_log, "A_log"), (self.dt_bias, dt_bias, "dt_bias"),
                               (self.o_norm.weight, o_norm, "o_norm"), (self.z_proj.weight, z, "z_proj"),
                               (self.o_proj.weight, o, "o_proj")):
            load_(dst, src, f"branch.{name}")

    def log_decay(self, xh: torch.Tensor) -> torch.Tensor:
        """x^ [B, T, hidden] -> psi [B, T, H] (fp32, <= 0)."""
        return -self.A_log.float().exp() * F.softplus(self.decay_proj(xh).float() + self.dt_bias.float())

    def _l2norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.l2_eps > 0:
            return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + self.l2_eps)
        return F.normalize(x, dim=-1)

    def forward(self, x, state=None, token_mask=None, cu_seqlens=None, **_):
        # x [B, T, hidden] -> y [B, T, hidden], new state: S [B, Hv, dk, dv], or (S, conv [B, K-1, C])
        # with the convolution
        B, T, _ = x.shape
        S, conv_state = state if self.conv_weight is not None and state is not None else (state, None)
        xh = x if self.in_norm is None else self.in_norm(x)
        qkv = self.qkv_proj(xh)  # [B, T, C], C = 2 Hk dk + Hv dv
        new_conv = None
        if self.conv_weight is not None:
            if token_mask is not None:  # a padded token is no one's neighbour in the convolution
                qkv = qkv * token_mask[..., None].to(qkv.dtype)
            qkv, new_conv = short_conv(flat(qkv, cu_seqlens), self.conv_weight, conv_state,
                                       output_final_state=cu_seqlens is None, cu_seqlens=cu_seqlens)
            qkv = qkv.reshape(B, T, -1)
        q, k, v = F.silu(qkv).split(self.split, dim=-1)
        q = q.reshape(B, T, self.n_k_heads, self.head_dim)
        k = k.reshape(B, T, self.n_k_heads, self.head_dim)
        v = v.reshape(B, T, self.n_heads, self.v_dim)
        q, k = self._l2norm(q.float()), self._l2norm(k.float())
        if self.n_heads != self.n_k_heads:  # each q/k head serves n_heads/n_k_heads consecutive value heads
            q = q.repeat_interleave(self.n_heads // self.n_k_heads, dim=2)  # [B, T, Hv, dk]
            k = k.repeat_interleave(self.n_heads // self.n_k_heads, dim=2)
        b = self.beta_proj(xh).float()  # [B, T, Hv]
        if self.softplus_step:  # unit keys: 1 - exp(-softplus(b)) = sigmoid(b) (module docstring)
            alpha = -torch.expm1(-F.softplus(b))
        else:
            alpha = continuous_time_step(torch.sigmoid(b), k.pow(2).sum(-1))
        g = self.log_decay(xh) if self.use_decay else None  # [B, T, Hv] or None
        if token_mask is not None:  # padding writes nothing (and, with the decay, forgets nothing)
            alpha = alpha * token_mask[..., None]
            if g is not None:
                g = g * token_mask[..., None]
        o, new_S = delta_rule(
            flat(q.to(v.dtype), cu_seqlens), flat(k.to(v.dtype), cu_seqlens), flat(v, cu_seqlens),
            flat(alpha.to(v.dtype), cu_seqlens), scale=self.head_dim ** -0.5, initial_state=S,
            output_final_state=cu_seqlens is None, cu_seqlens=cu_seqlens,
            backend=None if self.backend == "auto" else self.backend,
            g=None if g is None else flat(g, cu_seqlens),
        )
        o = self.o_norm(o.reshape(B, T, self.n_heads, self.v_dim))  # [B, T, Hv, dv]
        if self.z_gate:
            o = (o * F.silu(self.z_proj(x).view(B, T, self.n_heads, self.v_dim).float()).to(o.dtype))
            o = o.reshape(B, T, -1)
        else:
            o = o.reshape(B, T, -1) * torch.sigmoid(self.gate_up(self.gate_down(x)))
        new_state = new_S if self.conv_weight is None else (new_S, new_conv)
        return self.o_proj(o), new_state
