"""Qwen3.5 (`qwen3_5_text`, the text model `Qwen3_5ForCausalLM`) and Qwen3.5-MoE (`qwen3_5_moe_text`).

    teacher                                          student
    every RMSNorm (1 + w)                        ->  zero_centered_rms_norm: the same w
    full attention: q_proj = per head [q_h; gate_h]  ->  GQA with attention_output_gate, qkv_proj =
                    k, v, o, q/k norm, partial rope      [q; k; v; gate]; partial_rotary_factor
    linear attention (gated DeltaNet):           ->  a replace-mode hybrid layer (hybrid_replace_layers)
        in_proj_qkv, conv1d (K taps)                 whose quasar branch is in gated-DeltaNet form:
        in_proj_b, in_proj_a, A_log, dt_bias         qkv_proj, conv_weight, beta_proj (softplus step),
        norm (z-gated), in_proj_z, out_proj          decay_proj, A_log, dt_bias, o_norm, z_proj, o_proj
    qwen3_5_moe_text: the layers above, and
        softmax top-k router (renormalised)      ->  moe_router_score="softmax"
        shared expert (own width) x sigmoid      ->  moe_shared_expert_intermediate_size,
        (shared_expert_gate)                         moe_shared_expert_gate

In "add" mode its attention layers stay attention; `replacement_mode="replace"` swaps them for
branches alone too (default GLA: the Quasar-10B step), from the attention's q/k/v/o, its q/k norms
and its output gate (GLA's g_proj), which is not exact by design. The MTP head of the released
checkpoints is not part of transformers' model and is not carried over.
"""
from __future__ import annotations

from .common import AttentionWeights, TeacherFamily

LAYER_TYPES = ("linear_attention", "full_attention")


class Qwen35(TeacherFamily):
    model_types = ("qwen3_5_text",)
    gated = True

    def check(self, tc) -> None:
        super().check(tc)
        unknown = sorted(set(getattr(tc, "layer_types", None) or []) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"teacher layer_types has {unknown}: only {LAYER_TYPES} map onto the student")
        if tc.linear_num_value_heads % tc.linear_num_key_heads:
            raise ValueError(f"teacher linear_num_value_heads={tc.linear_num_value_heads} is not a multiple of "
                             f"linear_num_key_heads={tc.linear_num_key_heads}")

    def config_fields(self, tc, *, hybrid_layers, cycle, replacement_mode) -> dict:
        """Its gated DeltaNet layers become replace-mode quasar layers (the teacher's own recurrence).
        Its attention layers stay attention in "add" mode, unless `hybrid_layers` names some, which
        then get a branch beside the attention; in "replace" mode every attention layer (or those
        named) becomes a branch alone. Branch kinds on the attention layers cycle through `cycle`
        (default GLA, the Quasar-10B swap)."""
        types = list(tc.layer_types)
        linear = [i for i, t in enumerate(types) if t == "linear_attention"]
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        attention_branches = hybrid_layers
        if attention_branches is None:
            attention_branches = full if replacement_mode == "replace" else []
        stray = sorted(set(attention_branches) - set(full))
        if stray:
            raise ValueError(f"hybrid layers {stray} are not full-attention layers of the teacher (its gated "
                             f"DeltaNet layers {linear} are quasar layers already)")
        kinds = list(cycle) if cycle else ["gla"]
        attention_kind = {i: kinds[n % len(kinds)] for n, i in enumerate(sorted(attention_branches))}
        hybrid = sorted(linear + list(attention_branches))
        fields = super().config_fields(tc, hybrid_layers=hybrid_layers, cycle=cycle, replacement_mode=replacement_mode)
        return fields | dict(
            hybrid_attention_layers=hybrid,
            hybrid_layerwise_cycle=[attention_kind.get(i, "quasar") for i in hybrid] or ["quasar"],
            hybrid_replace_layers=linear,
            zero_centered_rms_norm=True, attention_output_gate=True, use_qk_norm=True,
            hybrid_quasar_num_key_heads=tc.linear_num_key_heads, hybrid_quasar_num_value_heads=tc.linear_num_value_heads,
            hybrid_quasar_key_head_dim=tc.linear_key_head_dim, hybrid_quasar_value_head_dim=tc.linear_value_head_dim,
            hybrid_quasar_conv_kernel=tc.linear_conv_kernel_dim, hybrid_quasar_input_norm=False,
            hybrid_quasar_l2norm_eps=1e-6,  # fla's l2norm, as transformers computes it
            hybrid_quasar_step="softplus", hybrid_quasar_use_decay=True, hybrid_quasar_output_gate="silu_z",
            hybrid_gla_nope=True,  # branches on its attention layers: GLA + NoPE, the Quasar-10B step
        )

    def recurrent(self, layer) -> dict | None:
        la = getattr(layer, "linear_attn", None)
        if la is None:
            return None
        return dict(qkv=la.in_proj_qkv.weight, conv=la.conv1d.weight.squeeze(1),  # [C, 1, K] -> [C, K]
                    beta=la.in_proj_b.weight, decay=la.in_proj_a.weight, A_log=la.A_log, dt_bias=la.dt_bias,
                    o_norm=la.norm.weight, z=la.in_proj_z.weight, o=la.out_proj.weight)

    def attention(self, attn, tc) -> AttentionWeights:
        w = super().attention(attn, tc)
        d, hidden = attn.head_dim, w.q.shape[-1]
        per_head = w.q.view(-1, 2 * d, hidden)  # q_proj holds per head [q_h; gate_h] ([H*2d, hidden])
        w.q, w.gate = per_head[:, :d].reshape(-1, hidden), per_head[:, d:].reshape(-1, hidden)
        return w


class Qwen35Moe(Qwen35):
    model_types = ("qwen3_5_moe_text",)
    moe = True

    def config_fields(self, tc, **kw) -> dict:
        # every layer sparse; softmax over all experts, top-k renormalised; one gated shared expert
        # of its own width. intermediate_size only sizes dense FFNs, of which there are none.
        return super().config_fields(tc, **kw) | dict(
            num_experts=tc.num_experts, num_experts_per_tok=tc.num_experts_per_tok,
            moe_intermediate_size=tc.moe_intermediate_size, num_shared_experts=1,
            moe_shared_expert_intermediate_size=tc.shared_expert_intermediate_size,
            moe_shared_expert_gate=True, n_group=1, topk_group=1, routed_scaling_factor=1.0,
            first_k_dense_replace=0, moe_router_score="softmax", moe_norm_topk_prob=True,
            intermediate_size=tc.shared_expert_intermediate_size)
