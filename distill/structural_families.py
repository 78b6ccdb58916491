"""What differs between teacher families, read once: attention, MLP and MoE weights in the student's terms.

structural.py copies one normal form into the student; this module turns each family's layout into
it, so the copy code does not branch on families.

    attention (AttentionWeights)    q, k, v, o [rows, hidden]; q/k/v biases (GLM); the output gate
                                    split out of Qwen3.5's q_proj; q/k norm scales
    GLM-4 rotary                    RoPE on interleaved pairs (2i, 2i+1) of the first rotary_dim
                                    channels of a head; the student rotates pairs (i, i + rotary_dim/2).
                                    Permuting q's and k's rows (weights, biases, norm scales) by
                                    [0, 2, 4, ..., 1, 3, 5, ...] inside the rotary channels maps one
                                    onto the other exactly: pair i keeps its frequency, and q.k is
                                    unchanged by a permutation applied to both. No model option needed.
    MLP                             gate, up, down [I, hidden] / [hidden, I]; GLM-4 fuses gate_up_proj
    MoE (glm4_moe, qwen3_5_moe)     router, correction bias, experts [E, 2I, H] -> x @ W layout
                                    [E, H, 2I], shared expert(s) and Qwen3.5-MoE's shared-expert gate
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INTERLEAVED_ROTARY = ("glm4",)          # apply_rotary_pos_emb on pairs (2i, 2i+1)
SANDWICH_NORM = ("glm4",)               # post_self_attn_layernorm, post_mlp_layernorm
MOE_FAMILIES = ("glm4_moe", "qwen3_5_moe_text")


def rotary_dim_of(tc, head_dim: int) -> int:
    rope = getattr(tc, "rope_parameters", None) or {}
    return int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))


def deinterleave(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Channel order [0, 2, ..., r-2, 1, 3, ..., r-1, r, ..., d-1]: interleaved pairs -> rotate-half pairs."""
    return torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2),
                      torch.arange(rotary_dim, head_dim)])


@dataclass
class AttentionWeights:
    q: torch.Tensor                     # [H*d, hidden]
    k: torch.Tensor                     # [Hkv*d, hidden]
    v: torch.Tensor
    o: torch.Tensor                     # [hidden, H*d]
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    gate: torch.Tensor | None = None    # [H*d, hidden]: Qwen3.5's output gate
    q_norm: torch.Tensor | None = None  # [d]
    k_norm: torch.Tensor | None = None

    @property
    def qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat([self.q_bias, self.k_bias, self.v_bias])


def _bias(linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias


def _permute_heads(t: torch.Tensor | None, head_dim: int, order: torch.Tensor) -> torch.Tensor | None:
    """Rows of each head of a [n*d, ...] (or [n*d]) tensor reordered by `order`."""
    if t is None:
        return None
    shaped = t.reshape(-1, head_dim, *t.shape[1:])
    return shaped[:, order].reshape(t.shape)


def attention_weights(attn, tc, *, gated: bool) -> AttentionWeights:
    """The teacher attention module's tensors in the student's layout (see the module docstring)."""
    d = attn.head_dim
    q = attn.q_proj.weight
    gate = None
    if gated:  # Qwen3.5: q_proj holds per head [q_h; gate_h] ([H*2d, hidden])
        per_head = q.view(-1, 2 * d, q.shape[-1])
        q, gate = per_head[:, :d].reshape(-1, q.shape[-1]), per_head[:, d:].reshape(-1, q.shape[-1])
    w = AttentionWeights(q=q, k=attn.k_proj.weight, v=attn.v_proj.weight, o=attn.o_proj.weight,
                         q_bias=_bias(attn.q_proj), k_bias=_bias(attn.k_proj), v_bias=_bias(attn.v_proj),
                         gate=gate)
    if getattr(attn, "q_norm", None) is not None:
        w.q_norm, w.k_norm = attn.q_norm.weight, attn.k_norm.weight
    if getattr(tc, "model_type", None) in INTERLEAVED_ROTARY:
        order = deinterleave(d, rotary_dim_of(tc, d)).to(q.device)
        for name in ("q", "k", "q_bias", "k_bias", "q_norm", "k_norm"):
            setattr(w, name, _permute_heads(getattr(w, name), d, order))
    return w


def mlp_weights(mlp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [I, hidden], up [I, hidden], down [hidden, I]) of a SwiGLU MLP, fused (GLM-4) or not."""
    if hasattr(mlp, "gate_up_proj") and isinstance(mlp.gate_up_proj, torch.nn.Linear):
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)   # the teacher chunks [gate | up]
        return gate, up, mlp.down_proj.weight
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def is_moe_block(mlp) -> bool:
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


def moe_fields(tc) -> dict:
    """QuasarLongConfig fields of a MoE teacher's routing and experts (exact, see moe_weights)."""
    family = tc.model_type
    if family == "glm4_moe":
        return dict(num_experts=tc.n_routed_experts, num_experts_per_tok=tc.num_experts_per_tok,
                    moe_intermediate_size=tc.moe_intermediate_size, num_shared_experts=tc.n_shared_experts,
                    n_group=tc.n_group, topk_group=tc.topk_group,
                    routed_scaling_factor=float(tc.routed_scaling_factor),
                    first_k_dense_replace=tc.first_k_dense_replace, moe_router_score="sigmoid",
                    moe_norm_topk_prob=bool(tc.norm_topk_prob))
    if family == "qwen3_5_moe_text":
        # every layer sparse; softmax over all experts, top-k renormalised; one gated shared expert
        # of its own width. intermediate_size only sizes dense FFNs, of which there are none.
        return dict(num_experts=tc.num_experts, num_experts_per_tok=tc.num_experts_per_tok,
                    moe_intermediate_size=tc.moe_intermediate_size, num_shared_experts=1,
                    moe_shared_expert_intermediate_size=tc.shared_expert_intermediate_size,
                    moe_shared_expert_gate=True, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                    first_k_dense_replace=0, moe_router_score="softmax", moe_norm_topk_prob=True,
                    intermediate_size=tc.shared_expert_intermediate_size)
    raise ValueError(f"teacher model_type {family!r} has no MoE map")


def moe_weights(mlp) -> dict[str, torch.Tensor]:
    """A teacher MoE block's tensors under the student MoE's parameter names."""
    out = {"gate.weight": mlp.gate.weight,
           "gate_up_proj": mlp.experts.gate_up_proj.transpose(1, 2),   # [E, 2I, H] -> [E, H, 2I]
           "down_proj": mlp.experts.down_proj.transpose(1, 2)}         # [E, H, I] -> [E, I, H]
    bias = getattr(mlp.gate, "e_score_correction_bias", None)
    if bias is not None:  # selection-only bias: the student's expert_bias has the same role
        out["expert_bias"] = bias
    shared = getattr(mlp, "shared_experts", None) or getattr(mlp, "shared_expert", None)
    if shared is not None and mlp_weights(shared)[0].numel():  # GLM builds a width-0 one for n_shared_experts=0
        for name, t in zip(("gate_proj", "up_proj", "down_proj"), mlp_weights(shared)):
            out[f"shared_experts.{name}.weight"] = t
    if getattr(mlp, "shared_expert_gate", None) is not None:
        out["shared_expert_gate.weight"] = mlp.shared_expert_gate.weight
    return out
