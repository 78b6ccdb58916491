"""GLM-4 (`glm4`) and GLM-4.5 (`glm4_moe`).

    glm4      q/k/v biases                      ->  attention_qkv_bias (qkv_proj's bias)
              RoPE on interleaved pairs          ->  q/k rows permuted into the student's half layout
              post_self_attn / post_mlp norms    ->  sandwich_norm (mixer_out_norm, ffn_out_norm)
              fused gate_up_proj                 ->  gate_proj, up_proj
    glm4_moe  q/k/v biases                      ->  attention_qkv_bias
              sigmoid router, group-limited      ->  the student's MoE: gate, n_group/topk_group,
              (n_group, topk_group), correction      expert_bias (selection only, as the teacher's),
              bias, routed_scaling_factor,           routed_scaling_factor, moe_norm_topk_prob,
              norm_topk_prob, shared experts,        shared_experts, first_k_dense_replace
              first_k_dense_replace

GLM-4's rotary: RoPE on interleaved pairs (2i, 2i+1) of the first rotary_dim channels of a head;
the student rotates pairs (i, i + rotary_dim/2). Permuting q's and k's rows (weights, biases, norm
scales) by [0, 2, 4, ..., 1, 3, 5, ...] inside the rotary channels maps one onto the other exactly:
pair i keeps its frequency, and q.k is unchanged by a permutation applied to both. No model option
needed. GLM-4.5 rotates halves, as the student does. The MTP layers of the released GLM-4.5
checkpoints are not part of transformers' model and are not carried over.
"""
from __future__ import annotations

import torch

from .common import AttentionWeights, TeacherFamily


def rotary_dim_of(tc, head_dim: int) -> int:
    rope = getattr(tc, "rope_parameters", None) or {}
    return int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))


def deinterleave(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Channel order [0, 2, ..., r-2, 1, 3, ..., r-1, r, ..., d-1]: interleaved pairs -> rotate-half pairs."""
    return torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2),
                      torch.arange(rotary_dim, head_dim)])


def _permute_heads(t: torch.Tensor | None, head_dim: int, order: torch.Tensor) -> torch.Tensor | None:
    """Rows of each head of a [n*d, ...] (or [n*d]) tensor reordered by `order`."""
    if t is None:
        return None
    shaped = t.reshape(-1, head_dim, *t.shape[1:])
    return shaped[:, order].reshape(t.shape)


class Glm4(TeacherFamily):
    model_types = ("glm4",)
    qkv_bias = True
    sandwich_norm = True

    def norms(self, layer) -> dict:
        return super().norms(layer) | dict(mixer_out=layer.post_self_attn_layernorm.weight,
                                           ffn_out=layer.post_mlp_layernorm.weight)

    def attention(self, attn, tc) -> AttentionWeights:
        w = super().attention(attn, tc)
        d = attn.head_dim
        order = deinterleave(d, rotary_dim_of(tc, d)).to(w.q.device)
        for name in ("q", "k", "q_bias", "k_bias", "q_norm", "k_norm"):
            setattr(w, name, _permute_heads(getattr(w, name), d, order))
        return w

    def mlp(self, mlp):
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)   # the teacher chunks [gate | up]
        return gate, up, mlp.down_proj.weight


class Glm4Moe(TeacherFamily):
    model_types = ("glm4_moe",)
    qkv_bias = True
    moe = True

    def check(self, tc) -> None:
        super().check(tc)
        per_group = tc.n_routed_experts // max(tc.n_group, 1)
        if tc.n_group < 1 or tc.n_routed_experts % tc.n_group or per_group < 2:
            raise ValueError(f"teacher n_group={tc.n_group}: must split n_routed_experts={tc.n_routed_experts} "
                             "into groups of >= 2 experts (a group is scored by its best two)")

    def config_fields(self, tc, **kw) -> dict:
        return super().config_fields(tc, **kw) | dict(
            num_experts=tc.n_routed_experts, num_experts_per_tok=tc.num_experts_per_tok,
            moe_intermediate_size=tc.moe_intermediate_size, num_shared_experts=tc.n_shared_experts,
            n_group=tc.n_group, topk_group=tc.topk_group, routed_scaling_factor=float(tc.routed_scaling_factor),
            first_k_dense_replace=tc.first_k_dense_replace, moe_router_score="sigmoid",
            moe_norm_topk_prob=bool(tc.norm_topk_prob))
