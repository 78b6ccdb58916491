"""Structural initialisation: a Quasar-Long student built from a dense teacher's own weights.

Stage 1 of the Quasar-10B recipe: start the student as the teacher, swap attention layers for
recurrent branches, then train with hidden-state MSE (layer by layer, against the live teacher)
plus CE/KD. Two kinds of swap:

- replacement mode "replace": the hybrid layer is the branch alone; the teacher's attention
  projections become the branch's, and the layer-wise MSE teaches the branch to produce what
  the attention did (the recipe proper: the swapped layers keep no KV cache);
- mode "add" (the spec's): GQA + sigmoid(a) * Branch; the attention stays, the branch starts off.
  Trained against a teacher whose function the trunk already computes, the branch's best move is
  to stay silent, so "add" students are structural copies to distill further, not a swap.

    teacher (qwen3 / llama / mistral decoder)       student (QuasarLongForCausalLM)
    embed_tokens, norm, lm_head (tied or not)   ->  the same
    layer i  input_layernorm                    ->  input_norm
             post_attention_layernorm           ->  post_norm
             self_attn q, k, v, o (+ q/k norm)  ->  GQA: qkv_proj = [q; k; v], o_proj, q/k norm
                                                    (mixer, or mixer.attn on a hybrid layer)
             mlp gate, up, down                 ->  dense SwiGLU; on MoE layers the shared expert,
                                                    with every routed expert's down_proj zero
    hybrid layer branch (quasar | raven | gla)  ->  q/k/v/o copied from the same attention

In "add" mode with the branch switched off (hybrid_alpha_init = -15, the spec's value) and no
routed expert contributing, the student computes the teacher's function (`logit_gap` measures
it). The branch copies of q/k/v/o start the recurrent read-out where the attention's is, the
usual linearisation init; what is not an attention projection (gates, decays, slot routers) keeps
its fresh init.

Qwen3.5 (`qwen3_5_text`, the text model `Qwen3_5ForCausalLM`) maps exactly too, through the
config options that express its layers (each off by default):

    teacher (qwen3_5_text)                           student
    every RMSNorm (1 + w)                        ->  zero_centered_rms_norm: the same w
    full attention: q_proj = per head [q_h; gate_h]  ->  GQA with attention_output_gate, qkv_proj =
                    k, v, o, q/k norm, partial rope      [q; k; v; gate]; partial_rotary_factor
    linear attention (gated DeltaNet):           ->  a replace-mode hybrid layer (hybrid_replace_layers)
        in_proj_qkv, conv1d (K taps)                 whose quasar branch is in gated-DeltaNet form:
        in_proj_b, in_proj_a, A_log, dt_bias         qkv_proj, conv_weight, beta_proj (softplus step),
        norm (z-gated), in_proj_z, out_proj          decay_proj, A_log, dt_bias, o_norm, z_proj, o_proj

In "add" mode its attention layers stay attention; `replacement_mode="replace"` swaps them for
branches alone too (default GLA: the Quasar-10B step), from the attention's q/k/v/o, its q/k norms
and its output gate (GLA's g_proj), which is not exact by design. The MTP head of the released
checkpoints is not part of transformers' model and is not carried over.

GLM-4 (`glm4`), GLM-4.5 (`glm4_moe`) and Qwen3.5-MoE (`qwen3_5_moe_text`) map exactly as well
(structural_families.py reads each layout into one form):

    glm4      q/k/v biases                      ->  attention_qkv_bias (qkv_proj's bias)
              RoPE on interleaved pairs          ->  q/k rows permuted into the student's half layout
              post_self_attn / post_mlp norms    ->  sandwich_norm (mixer_out_norm, ffn_out_norm)
              fused gate_up_proj                 ->  gate_proj, up_proj
    glm4_moe  sigmoid router, group-limited      ->  the student's MoE: gate, n_group/topk_group,
              (n_group, topk_group), correction      expert_bias (selection only, as the teacher's),
              bias, routed_scaling_factor,           routed_scaling_factor, moe_norm_topk_prob,
              norm_topk_prob, shared experts,        shared_experts, first_k_dense_replace
              first_k_dense_replace
    qwen3_5_moe_text  the Qwen3.5 layers above   ->  as for qwen3_5_text
              softmax top-k router (renormalised)->  moe_router_score="softmax"
              shared expert (own width) x sigmoid ->  moe_shared_expert_intermediate_size,
              (shared_expert_gate)                   moe_shared_expert_gate

A MoE teacher's experts are carried over as they are (no --experts upcycling on top); its balancing
bias keeps moving under the student's moe_balancing rule once training starts. The MTP layers of
the released GLM-4.5 checkpoints are not part of transformers' model and are not carried over.

Refused with a message naming the field: attention biases other than GLM's q/k/v ones, MLP biases,
rope scaling (only plain-theta RoPE is representable), sliding-window attention, activations other
than SiLU, GLM-4.5 groups of fewer than two experts, vision-language wrappers (their text model is
the teacher), and other families.
"""
from __future__ import annotations

import torch
from torch import nn

from .structural_families import (
    MOE_FAMILIES, SANDWICH_NORM, attention_weights, is_moe_block, mlp_weights, moe_fields, moe_weights,
)

SUPPORTED_FAMILIES = ("qwen3", "llama", "mistral", "qwen3_5_text", "qwen3_5_moe_text", "glm4", "glm4_moe")
QWEN35_LAYER_TYPES = ("linear_attention", "full_attention")
VL_WRAPPERS = {"qwen3_5": "Qwen3_5ForCausalLM, model_type 'qwen3_5_text'",
               "qwen3_5_moe": "Qwen3_5MoeForCausalLM, model_type 'qwen3_5_moe_text'"}
QKV_BIAS_FAMILIES = ("glm4", "glm4_moe")  # attention_bias: q/k/v only, o_proj has none


def is_qwen35(tc) -> bool:
    return getattr(tc, "model_type", None) in ("qwen3_5_text", "qwen3_5_moe_text")


def is_moe_teacher(tc) -> bool:
    return getattr(tc, "model_type", None) in MOE_FAMILIES


# -----------------------------------------------------------------------------
# configs

def check_teacher(tc) -> None:
    """Raise ValueError naming the first property of the teacher config that does not map exactly."""
    family = getattr(tc, "model_type", None)
    if family in VL_WRAPPERS:
        raise ValueError(f"teacher model_type {family!r} is the vision-language wrapper: load its text model "
                         f"({VL_WRAPPERS[family]}) as the teacher")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"teacher model_type {family!r}: structural init maps {SUPPORTED_FAMILIES} decoders "
                         "(q/k/v/o attention + SwiGLU MLP); distill other teachers from a teacher cache instead")
    if getattr(tc, "hidden_act", "silu") != "silu":
        raise ValueError(f"teacher hidden_act={tc.hidden_act!r}: the student's SwiGLU uses SiLU")
    if getattr(tc, "attention_bias", False) and family not in QKV_BIAS_FAMILIES:
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
    if is_qwen35(tc):
        unknown = sorted(set(layer_types) - set(QWEN35_LAYER_TYPES))
        if unknown:
            raise ValueError(f"teacher layer_types has {unknown}: only {QWEN35_LAYER_TYPES} map onto the student")
        if tc.linear_num_value_heads % tc.linear_num_key_heads:
            raise ValueError(f"teacher linear_num_value_heads={tc.linear_num_value_heads} is not a multiple of "
                             f"linear_num_key_heads={tc.linear_num_key_heads}")
    if family == "glm4_moe":
        per_group = tc.n_routed_experts // max(tc.n_group, 1)
        if tc.n_group < 1 or tc.n_routed_experts % tc.n_group or per_group < 2:
            raise ValueError(f"teacher n_group={tc.n_group}: must split n_routed_experts={tc.n_routed_experts} "
                             "into groups of >= 2 experts (a group is scored by its best two)")


def head_dim_of(tc) -> int:
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def default_hybrid_layers(n_layers: int) -> list[int]:
    """The preview's proportion: the first fifth of the layers keep plain attention, the rest are hybrid."""
    return list(range(n_layers // 5, n_layers))


def student_config(tc, *, hybrid_layers: list[int] | None = None, cycle: list[str] | None = None,
                   alpha_init: float = -15.0, replacement_mode: str = "add", num_experts: int = 0,
                   experts_per_tok: int = 2,
                   moe_intermediate_size: int | None = None, first_k_dense_replace: int = 1,
                   overrides: dict | None = None):
    """The QuasarLongConfig of a student with the teacher's trunk shape.

    num_experts=0 keeps a dense SwiGLU on every layer. num_experts=E upcycles layers from
    first_k_dense_replace on to MoE: moe_intermediate_size (default: intermediate_size // 4) must
    divide the teacher's intermediate_size, and the shared expert (intermediate_size wide) is the
    teacher's MLP.
    """
    from quasar_model import QuasarLongConfig

    check_teacher(tc)
    if num_experts > 0 and is_moe_teacher(tc):
        raise ValueError(f"num_experts={num_experts}: the {tc.model_type} teacher is a MoE already, its own "
                         "experts and router are carried over (leave --experts at 0)")
    L = tc.num_hidden_layers
    I = getattr(tc, "intermediate_size", None) or 1  # MoE-only teachers (qwen3_5_moe) set it in moe_fields
    rope = getattr(tc, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(tc, "rope_theta", 1e4)))
    kw = dict(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, num_hidden_layers=L,
        num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
        head_dim=head_dim_of(tc), intermediate_size=I, rms_norm_eps=tc.rms_norm_eps,
        use_qk_norm=tc.model_type == "qwen3" or bool(getattr(tc, "use_qk_norm", False)),
        tie_word_embeddings=bool(tc.tie_word_embeddings),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
        attention_qkv_bias=bool(getattr(tc, "attention_bias", False)) and tc.model_type in QKV_BIAS_FAMILIES,
        sandwich_norm=tc.model_type in SANDWICH_NORM, rope_theta=rope_theta,
        # RoPE inside the teacher's trained window, NoPE past it (the Quasar long-context rule)
        long_context_mode="rope_short_nope_long", use_nope=True,
        nope_after_position=int(tc.max_position_embeddings),
        hybrid_attention_layers=default_hybrid_layers(L) if hybrid_layers is None else list(hybrid_layers),
        hybrid_alpha_init=alpha_init, hybrid_replacement_mode=replacement_mode, num_loops=1, use_looped_injection=False, engram_layers=[],
        pad_token_id=tc.pad_token_id, bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
    )
    if cycle is not None:
        kw["hybrid_layerwise_cycle"] = list(cycle)
    if is_qwen35(tc):
        kw.update(_qwen35_fields(tc, hybrid_layers, cycle, replacement_mode))
    if is_moe_teacher(tc):
        kw.update(moe_fields(tc))
    elif num_experts > 0:
        moe_i = moe_intermediate_size or I // 4
        if moe_i < 1 or I % moe_i:
            raise ValueError(f"moe_intermediate_size={moe_i} must divide the teacher's intermediate_size={I} "
                             "(the shared expert is the teacher's MLP, intermediate_size wide)")
        groups = next(g for g in (4, 2, 1) if num_experts % g == 0)
        kw.update(num_experts=num_experts, num_experts_per_tok=experts_per_tok, moe_intermediate_size=moe_i,
                  num_shared_experts=I // moe_i, n_group=groups, topk_group=max(1, groups // 2),
                  first_k_dense_replace=first_k_dense_replace)
    else:
        kw.update(num_experts=0, first_k_dense_replace=L)
    kw.update(overrides or {})
    return QuasarLongConfig(**kw)


def _qwen35_fields(tc, attention_branches, cycle, replacement_mode) -> dict:
    """Config fields of a Qwen3.5 student.

    Its gated DeltaNet layers become replace-mode quasar layers (the teacher's own recurrence).
    Its attention layers stay attention in "add" mode, unless `attention_branches` (hybrid_layers)
    names some, which then get a branch beside the attention; in "replace" mode every attention
    layer (or those named) becomes a branch alone. Branch kinds on the attention layers cycle
    through `cycle` (default GLA, the Quasar-10B swap).
    """
    types = list(tc.layer_types)
    linear = [i for i, t in enumerate(types) if t == "linear_attention"]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if attention_branches is None:
        attention_branches = full if replacement_mode == "replace" else []
    stray = sorted(set(attention_branches) - set(full))
    if stray:
        raise ValueError(f"hybrid layers {stray} are not full-attention layers of the teacher (its gated "
                         f"DeltaNet layers {linear} are quasar layers already)")
    kinds = list(cycle) if cycle else ["gla"]
    attention_kind = {i: kinds[n % len(kinds)] for n, i in enumerate(sorted(attention_branches))}
    hybrid = sorted(linear + list(attention_branches))
    rope = getattr(tc, "rope_parameters", None) or {}
    return dict(
        hybrid_attention_layers=hybrid,
        hybrid_layerwise_cycle=[attention_kind.get(i, "quasar") for i in hybrid] or ["quasar"],
        hybrid_replace_layers=linear,
        zero_centered_rms_norm=True, attention_output_gate=True, use_qk_norm=True,
        partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
        hybrid_quasar_num_key_heads=tc.linear_num_key_heads, hybrid_quasar_num_value_heads=tc.linear_num_value_heads,
        hybrid_quasar_key_head_dim=tc.linear_key_head_dim, hybrid_quasar_value_head_dim=tc.linear_value_head_dim,
        hybrid_quasar_conv_kernel=tc.linear_conv_kernel_dim, hybrid_quasar_input_norm=False,
        hybrid_quasar_l2norm_eps=1e-6,  # fla's l2norm, as transformers computes it
        hybrid_quasar_step="softplus", hybrid_quasar_use_decay=True, hybrid_quasar_output_gate="silu_z",
        hybrid_gla_nope=True,  # branches on its attention layers: GLA + NoPE, the Quasar-10B step
    )


# -----------------------------------------------------------------------------
# weights

def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{name}: teacher tensor {tuple(src.shape)} does not fit the student's {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))


def _repeat_heads(w: torch.Tensor, n_kv: int, rep: int) -> torch.Tensor:
    """[n_kv*d, hidden] -> [n_kv*rep*d, hidden]: each KV head's rows repeated for its query heads."""
    d = w.shape[0] // n_kv
    return w.view(n_kv, d, -1).repeat_interleave(rep, dim=0).reshape(n_kv * rep * d, -1)


def _attention_into(gqa, w) -> None:
    """w: the teacher attention's AttentionWeights (structural_families)."""
    _copy(gqa.qkv_proj.weight, torch.cat([w.q, w.k, w.v] + ([w.gate] if gqa.gated else [])), "qkv_proj")
    if (gqa.qkv_proj.bias is None) != (w.q_bias is None):
        raise ValueError("qkv_proj: the teacher's q/k/v biases and the student's attention_qkv_bias disagree")
    if w.q_bias is not None:
        gate_bias = [torch.zeros_like(w.q_bias)] if gqa.gated else []  # no teacher has both: the gate's stays 0
        _copy(gqa.qkv_proj.bias, torch.cat([w.qkv_bias] + gate_bias), "qkv_proj.bias")
    _copy(gqa.o_proj.weight, w.o, "o_proj")
    if w.q_norm is not None:
        _copy(gqa.q_norm.weight, w.q_norm, "q_norm")
        _copy(gqa.k_norm.weight, w.k_norm, "k_norm")


def _branch_from_attention(branch, kind: str, w, n_kv: int, rep: int, norm_offset: float = 0.0) -> None:
    """w: AttentionWeights; the gate (Qwen3.5's) becomes GLA's g_proj; q/k biases have no place in
    a branch and are left out (the branch is trained anyway). norm_offset: 1.0 when the teacher's
    q/k norms scale by (1 + w) and the branch's by w."""
    if kind == "quasar":          # one q/k/v per head: the KV heads repeated across their group
        _copy(branch.qkv_proj.weight, torch.cat([w.q, _repeat_heads(w.k, n_kv, rep), _repeat_heads(w.v, n_kv, rep)]),
              "branch.qkv_proj")
    else:                         # gla, raven: GQA-shaped q and kv projections
        _copy(branch.q_proj.weight, w.q, "branch.q_proj")
        _copy(branch.kv_proj.weight, torch.cat([w.k, w.v]), "branch.kv_proj")
        if w.q_norm is not None:
            _copy(branch.q_norm.weight, w.q_norm + norm_offset, "branch.q_norm")
            _copy(branch.k_norm.weight, w.k_norm + norm_offset, "branch.k_norm")
        if w.gate is not None and kind == "gla":  # both gate the read-out by sigmoid(W x) per channel
            _copy(branch.g_proj.weight, w.gate, "branch.g_proj")
    _copy(branch.o_proj.weight, w.o, "branch.o_proj")


def _deltanet_into(branch, la) -> None:
    """Qwen3.5's gated DeltaNet -> the quasar branch in gated-DeltaNet form (same math, same layout)."""
    _copy(branch.qkv_proj.weight, la.in_proj_qkv.weight, "branch.qkv_proj")        # [q; k; v] rows
    _copy(branch.conv_weight, la.conv1d.weight.squeeze(1), "branch.conv_weight")  # [C, 1, K] -> [C, K]
    _copy(branch.beta_proj.weight, la.in_proj_b.weight, "branch.beta_proj")
    _copy(branch.decay_proj.weight, la.in_proj_a.weight, "branch.decay_proj")
    _copy(branch.A_log, la.A_log, "branch.A_log")
    _copy(branch.dt_bias, la.dt_bias, "branch.dt_bias")
    _copy(branch.o_norm.weight, la.norm.weight, "branch.o_norm")                  # plain w: the gated norm
    _copy(branch.z_proj.weight, la.in_proj_z.weight, "branch.z_proj")
    _copy(branch.o_proj.weight, la.out_proj.weight, "branch.o_proj")


def _mlp_into(ffn, mlp, layer: int) -> None:
    from quasar_model.layers.moe import MoE

    if is_moe_block(mlp):  # a MoE teacher's layer: router, experts and shared expert as they are
        if not isinstance(ffn, MoE):
            raise ValueError(f"layer {layer}: the teacher's layer is MoE, the student's is dense "
                             "(first_k_dense_replace differs)")
        targets = dict(ffn.named_parameters()) | dict(ffn.named_buffers())
        for name, t in moe_weights(mlp).items():
            if name not in targets:
                raise ValueError(f"layer {layer}: the teacher's MoE has {name}, the student's has none "
                                 "(moe_shared_expert_gate / num_shared_experts differ)")
            _copy(targets[name], t, f"layers.{layer}.ffn.{name}")
        return
    gate, up, down = mlp_weights(mlp)
    if not isinstance(ffn, MoE):
        for name, t in zip(("gate_proj", "up_proj", "down_proj"), (gate, up, down)):
            _copy(getattr(ffn, name).weight, t, f"ffn.{name}")
        return
    shared = ffn.shared_experts
    for name, t in zip(("gate_proj", "up_proj", "down_proj"), (gate, up, down)):
        _copy(getattr(shared, name).weight, t, f"ffn.shared_experts.{name}")
    # Routed expert e starts as slice e mod (I / I_moe) of the teacher's MLP, writing nothing
    # (down = 0): the layer's output is the teacher's, and the experts grow from known features.
    I_moe = ffn.moe_intermediate_size
    n_slices = gate.shape[0] // I_moe
    for e in range(ffn.num_experts):
        rows = slice((e % n_slices) * I_moe, (e % n_slices + 1) * I_moe)
        gate_up = torch.cat([gate[rows], up[rows]])   # [2I, hidden]
        _copy(ffn.gate_up_proj[e], gate_up.t(), f"ffn.gate_up_proj[{e}]")
    ffn.down_proj.zero_()


@torch.no_grad()
def init_student(teacher: nn.Module, config=None, *, dtype: torch.dtype = torch.float32,
                 branch_from_attention: bool = True, **config_kw):
    """A QuasarLongForCausalLM holding the teacher's weights (see the module docstring for the map).

    branch_from_attention=False leaves the branches at their fresh init (for comparison).
    """
    from quasar_model import QuasarLongForCausalLM

    tc = teacher.config
    config = config if config is not None else student_config(tc, **config_kw)
    check_teacher(tc)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size"):
        if getattr(tc, field, None) is not None and getattr(config, field) != getattr(tc, field):
            raise ValueError(f"student {field}={getattr(config, field)} differs from the teacher's "
                             f"{getattr(tc, field)}: structural init copies the trunk as it is")
    student = QuasarLongForCausalLM(config).to(dtype)
    t_model = teacher.get_decoder() if hasattr(teacher, "get_decoder") else teacher.model
    rep = config.num_attention_heads // config.num_key_value_heads
    _copy(student.model.embed_tokens.weight, t_model.embed_tokens.weight, "embed_tokens")
    _copy(student.model.norm.weight, t_model.norm.weight, "norm")
    if not config.tie_word_embeddings:
        _copy(student.lm_head.weight, teacher.get_output_embeddings().weight, "lm_head")
    gated_teacher, zc = is_qwen35(tc), config.zero_centered_rms_norm
    if config.attention_output_gate != gated_teacher or (gated_teacher and not zc):
        raise ValueError("attention_output_gate and zero_centered_rms_norm are on for Qwen3.5 teachers "
                         "only, whose attention has that gate and whose norms scale by (1 + w) (student_config sets them)")
    if config.sandwich_norm != (tc.model_type in SANDWICH_NORM):
        raise ValueError(f"student sandwich_norm={config.sandwich_norm} but the {tc.model_type} teacher "
                         f"{'has' if tc.model_type in SANDWICH_NORM else 'has no'} post-sublayer norms")
    for i, (s_layer, t_layer) in enumerate(zip(student.model.layers, t_model.layers)):
        _copy(s_layer.input_norm.weight, t_layer.input_layernorm.weight, f"layers.{i}.input_norm")
        _copy(s_layer.post_norm.weight, t_layer.post_attention_layernorm.weight, f"layers.{i}.post_norm")
        if config.sandwich_norm:   # GLM-4's norms of the attention's and the MLP's outputs
            _copy(s_layer.mixer_out_norm.weight, t_layer.post_self_attn_layernorm.weight, f"layers.{i}.mixer_out_norm")
            _copy(s_layer.ffn_out_norm.weight, t_layer.post_mlp_layernorm.weight, f"layers.{i}.ffn_out_norm")
        if hasattr(t_layer, "linear_attn"):  # Qwen3.5's gated DeltaNet: a replace-mode quasar layer
            if not (s_layer.is_hybrid and s_layer.mixer.replace and s_layer.mixer.kind == "quasar"):
                raise ValueError(f"layer {i}: the teacher's gated DeltaNet maps onto a replace-mode quasar "
                                 "layer only (hybrid_replace_layers, cycle 'quasar')")
            _deltanet_into(s_layer.mixer.branch, t_layer.linear_attn)
        elif s_layer.is_hybrid:
            w = attention_weights(t_layer.self_attn, tc, gated=gated_teacher)
            if s_layer.mixer.attn is not None:
                _attention_into(s_layer.mixer.attn, w)
            if branch_from_attention:
                _branch_from_attention(s_layer.mixer.branch, s_layer.mixer.kind, w,
                                       config.num_key_value_heads, rep, norm_offset=1.0 if zc else 0.0)
        else:
            _attention_into(s_layer.mixer, attention_weights(t_layer.self_attn, tc, gated=gated_teacher))
        _mlp_into(s_layer.ffn, t_layer.mlp, i)
    if config.tie_word_embeddings:
        student.tie_weights()
    return student


# -----------------------------------------------------------------------------
# checks and the layer map

@torch.no_grad()
def logit_gap(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor) -> float:
    """max |student logits - teacher logits| on input_ids (fp32): ~0 when the init is exact."""
    s = student(input_ids=input_ids.to(student.device), use_cache=False).logits.float()
    t = teacher(input_ids=input_ids.to(teacher.device), use_cache=False).logits.float()
    return float((s - t.to(s.device)).abs().max())


def layer_map(n_student: int, n_teacher: int, pairs: list | None = None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs whose outputs the hidden-state MSE matches.

    Default: every layer to itself when the depths agree, else student layer i to teacher layer
    round((i + 1) * n_teacher / n_student) - 1 (the last layers always meet).
    """
    if pairs is None:
        return [(i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]
    out = []
    for p in pairs:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p)):
            raise ValueError(f"teacher.layers: each entry must be a [student_layer, teacher_layer] pair, got {p!r}")
        s, t = p
        if not 0 <= s < n_student:
            raise ValueError(f"teacher.layers: student layer {s} out of range [0, {n_student})")
        if not 0 <= t < n_teacher:
            raise ValueError(f"teacher.layers: teacher layer {t} out of range [0, {n_teacher})")
        out.append((s, t))
    if not out:
        raise ValueError("teacher.layers: empty; leave it unset for the default map")
    return out


# -----------------------------------------------------------------------------
# the live teacher of hidden-state MSE

class LiveTeacher:
    """A frozen teacher run beside the student: its outputs of the layers paired with the student's.

    Runs only the decoder (no LM head: the top-k targets come from the teacher cache). Packed rows
    (position ids restarting per document) get Hugging Face's block-diagonal packed-sequence mask.
    Every rank holds a whole replica (FSDP shards the student only): a teacher that does not fit
    beside the student on one GPU cannot be the live teacher; distill from its cache with KD alone.
    """

    def __init__(self, model: nn.Module, pairs: list[tuple[int, int]]):
        self.model, self.pairs = model, pairs
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    @torch.no_grad()
    def hidden_targets(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
        # input_ids, position_ids [B, L] -> one [B, L, D] per pair (hidden_states[i + 1] = layer i's output)
        # use_cache=False matters: Hugging Face builds the packed-sequence mask only without a cache
        hs = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                          output_hidden_states=True).hidden_states
        return [hs[t + 1] for _, t in self.pairs]


def load_live_teacher(tcfg, meta, student_config, device) -> LiveTeacher:
    """The config's teacher section -> a LiveTeacher, checked against the cache and the student.

    tcfg: distill.config.TeacherSection; meta: the training cache's TeacherCacheMeta.
    """
    import warnings

    from quasar_model.teacher_outputs.capture import load_teacher
    from quasar_model.teacher_outputs.tiny_teacher import resolve_teacher
    from quasar_model.tokenization import tokenizer_fingerprint

    name = resolve_teacher(tcfg.model)
    model, tok = load_teacher(name, revision=tcfg.revision, dtype=tcfg.dtype, device=str(device))
    fp = tokenizer_fingerprint(tok)
    if fp != meta.tokenizer_fingerprint:
        raise ValueError(f"teacher.model {tcfg.model!r} has tokenizer fingerprint {fp[:12]}, the training cache "
                         f"{meta.tokenizer_fingerprint[:12]}: hidden states and KD targets must come from the "
                         "same tokenisation")
    if name != meta.teacher_id and tcfg.model != meta.teacher_id:
        warnings.warn(f"teacher.model {tcfg.model!r} is not the cache's teacher {meta.teacher_id!r}: the "
                      "hidden-state targets and the top-k targets come from different models", stacklevel=2)
    if model.config.hidden_size != student_config.hidden_size:
        raise ValueError(f"teacher hidden_size={model.config.hidden_size} but the student's is "
                         f"{student_config.hidden_size}: hidden-state MSE compares the residual streams "
                         "directly (build the student with `quasar init-student`)")
    pairs = layer_map(student_config.num_hidden_layers, model.config.num_hidden_layers, tcfg.layers)
    return LiveTeacher(model, pairs)
