"""The one form every teacher family is read into, and the plain decoder layout most families share.

A TeacherFamily reads a teacher's config and modules into plain tensors; student.py hands them to
the student's own load methods (modeling_quasar_long.py, layers/), which lay them into the
student's parameters. So the reading does not know the student's structure, and the writing does
not branch on families.

    attention   AttentionWeights: q, k, v, o [rows, hidden]; q/k/v biases (GLM); the output gate
                (Qwen3.5's); q/k norm scales and whether they scale by (1 + w)
    MLP         (gate, up, down): [I, hidden], [I, hidden], [hidden, I]
    MoE         router [E, hidden]; experts in nn.Linear's layout, gate_up [E, 2I, hidden] and
                down [E, hidden, I]; the selection-only correction bias; the shared expert(s) and
                Qwen3.5-MoE's shared-expert gate
    layer       input / post norms, and GLM-4's norms of the sublayers' outputs
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass
class AttentionWeights:
    """The arguments of GQAttention.load_weights (and of the branches' load_from_attention)."""
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
    norms_zero_centered: bool = False   # the q/k norms scale by (1 + w)


def head_dim_of(tc) -> int:
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def is_moe_block(mlp) -> bool:
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


class TeacherFamily:
    """A decoder family's layout. This base is the plain one (q/k/v/o attention without biases, SwiGLU
    MLP, RMSNorms scaling by w), which llama.py's families use as it is; the others override what
    differs."""
    model_types: tuple[str, ...] = ()
    qkv_bias = False         # attention_bias means biases on q/k/v only (the student's attention_qkv_bias)
    sandwich_norm = False    # norms of the attention's and the MLP's outputs (GLM-4)
    gated = False            # attention output gate in q_proj, (1 + w) norms (Qwen3.5)
    moe = False              # routed experts of its own, carried over as they are

    # ------------------------------------------------------------------ configs
    def check(self, tc) -> None:
        """Raise ValueError naming the first property of the config that does not map exactly."""
        family = tc.model_type
        if getattr(tc, "hidden_act", "silu") != "silu":
            raise ValueError(f"teacher hidden_act={tc.hidden_act!r}: the student's SwiGLU uses SiLU")
        if getattr(tc, "attention_bias", False) and not self.qkv_bias:
            raise ValueError("teacher attention_bias=True: the student's attention has q/k/v biases only "
                             f"(attention_qkv_bias), which {family} does not restrict itself to")
        if getattr(tc, "mlp_bias", False):
            raise ValueError("teacher mlp_bias=True: the student's MLP projections have no biases")
        rope = getattr(tc, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"teacher rope_type={rope.get('rope_type')!r}: only plain-theta RoPE maps onto the "
                             "student's rotary embedding")
        layer_types = getattr(tc, "layer_types", None) or []
        sliding = getattr(tc, "sliding_window", None) and (getattr(tc, "use_sliding_window", True)
                                                          or "sliding_attention" in layer_types)
        if sliding or "sliding_attention" in layer_types:
            raise ValueError(f"teacher sliding_window={tc.sliding_window!r}: the student attends over the whole "
                             "sequence, so sliding-window layers would not be reproduced")

    def config_fields(self, tc, *, hybrid_layers, cycle, replacement_mode) -> dict:
        """QuasarLongConfig fields that express this family's layers (student.student_config has the rest)."""
        return dict(use_qk_norm=bool(getattr(tc, "use_qk_norm", False)),
                    attention_qkv_bias=self.qkv_bias and bool(getattr(tc, "attention_bias", False)),
                    sandwich_norm=self.sandwich_norm)

    # ------------------------------------------------------------------ weights
    def norms(self, layer) -> dict:
        """QuasarLongDecoderLayer.load_norms' arguments."""
        return dict(input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
                    zero_centered=self.gated)

    def recurrent(self, layer) -> dict | None:
        """A recurrent layer's weights (QuasarBranch.load_gated_deltanet's arguments), None on attention layers."""
        return None

    def attention(self, attn, tc) -> AttentionWeights:
        w = AttentionWeights(q=attn.q_proj.weight, k=attn.k_proj.weight, v=attn.v_proj.weight,
                             o=attn.o_proj.weight, q_bias=attn.q_proj.bias, k_bias=attn.k_proj.bias,
                             v_bias=attn.v_proj.bias, norms_zero_centered=self.gated)
        if getattr(attn, "q_norm", None) is not None:
            w.q_norm, w.k_norm = attn.q_norm.weight, attn.k_norm.weight
        return w

    def mlp(self, mlp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight

    def moe_weights(self, mlp) -> dict:
        """A MoE block's weights (MoE.load_weights' arguments); the MoE families' blocks share this layout."""
        out = dict(router=mlp.gate.weight, gate_up=mlp.experts.gate_up_proj, down=mlp.experts.down_proj,
                   # selection-only bias: the student's expert_bias has the same role
                   expert_bias=getattr(mlp.gate, "e_score_correction_bias", None))
        shared = getattr(mlp, "shared_experts", None) or getattr(mlp, "shared_expert", None)
        if shared is not None and self.mlp(shared)[0].numel():  # GLM builds a width-0 one for n_shared_experts=0
            out["shared"] = self.mlp(shared)
        if getattr(mlp, "shared_expert_gate", None) is not None:
            out["shared_gate"] = mlp.shared_expert_gate.weight
        return out
