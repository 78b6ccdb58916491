"""A Quasar-Long student built from a teacher: its config from the teacher's, its weights from the
teacher's layers, read by the teacher's family (families.py) and laid in by the student's own load
methods. The map is in the package docstring."""
from __future__ import annotations

import torch
from torch import nn

from ..configuration_quasar_long import QuasarLongConfig
from ..modeling_quasar_long import QuasarLongForCausalLM
from .common import head_dim_of, is_moe_block
from .families import check_teacher


def default_hybrid_layers(n_layers: int) -> list[int]:
    """The preview's proportion: the first fifth of the layers keep plain attention, the rest are hybrid."""
    return list(range(n_layers // 5, n_layers))


def student_config(tc, *, hybrid_layers: list[int] | None = None, cycle: list[str] | None = None,
                   alpha_init: float = -15.0, replacement_mode: str = "add", num_experts: int = 0,
                   experts_per_tok: int = 2,
                   moe_intermediate_size: int | None = None, first_k_dense_replace: int = 1,
                   overrides: dict | None = None) -> QuasarLongConfig:
    """The QuasarLongConfig of a student with the teacher's trunk shape.

    num_experts=0 keeps a dense SwiGLU on every layer. num_experts=E upcycles layers from
    first_k_dense_replace on to MoE: moe_intermediate_size (default: intermediate_size // 4) must
    divide the teacher's intermediate_size, and the shared expert (intermediate_size wide) is the
    teacher's MLP.
    """
    family = check_teacher(tc)
    if num_experts > 0 and family.moe:
        raise ValueError(f"num_experts={num_experts}: the {tc.model_type} teacher is a MoE already, its own "
                         "experts and router are carried over (leave --experts at 0)")
    L = tc.num_hidden_layers
    I = getattr(tc, "intermediate_size", None) or 1  # MoE-only teachers (qwen3_5_moe) set it in config_fields
    rope = getattr(tc, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(tc, "rope_theta", 1e4)))
    kw = dict(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, num_hidden_layers=L,
        num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
        head_dim=head_dim_of(tc), intermediate_size=I, rms_norm_eps=tc.rms_norm_eps,
        tie_word_embeddings=bool(tc.tie_word_embeddings),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)), rope_theta=rope_theta,
        # RoPE inside the teacher's trained window, NoPE past it (the Quasar long-context rule)
        long_context_mode="rope_short_nope_long", use_nope=True,
        nope_after_position=int(tc.max_position_embeddings),
        hybrid_attention_layers=default_hybrid_layers(L) if hybrid_layers is None else list(hybrid_layers),
        hybrid_alpha_init=alpha_init, hybrid_replacement_mode=replacement_mode, num_loops=1, use_looped_injection=False, engram_layers=[],
        pad_token_id=tc.pad_token_id, bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
    )
    if cycle is not None:
        kw["hybrid_layerwise_cycle"] = list(cycle)
    kw.update(family.config_fields(tc, hybrid_layers=hybrid_layers, cycle=cycle, replacement_mode=replacement_mode))
    if num_experts > 0:
        moe_i = moe_intermediate_size or I // 4
        if moe_i < 1 or I % moe_i:
            raise ValueError(f"moe_intermediate_size={moe_i} must divide the teacher's intermediate_size={I} "
                             "(the shared expert is the teacher's MLP, intermediate_size wide)")
        groups = next(g for g in (4, 2, 1) if num_experts % g == 0)
        kw.update(num_experts=num_experts, num_experts_per_tok=experts_per_tok, moe_intermediate_size=moe_i,
                  num_shared_experts=I // moe_i, n_group=groups, topk_group=max(1, groups // 2),
                  first_k_dense_replace=first_k_dense_replace)
    elif not family.moe:     # a MoE teacher's experts and router: config_fields set them
        kw.update(num_experts=0, first_k_dense_replace=L)
    kw.update(overrides or {})
    return QuasarLongConfig(**kw)


def _check_fit(config, tc, family) -> None:
    """Refuse a given student config whose trunk or layer options differ from the teacher's."""
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size"):
        if getattr(tc, field, None) is not None and getattr(config, field) != getattr(tc, field):
            raise ValueError(f"student {field}={getattr(config, field)} differs from the teacher's "
                             f"{getattr(tc, field)}: structural init copies the trunk as it is")
    if config.attention_output_gate != family.gated or (family.gated and not config.zero_centered_rms_norm):
        raise ValueError("attention_output_gate and zero_centered_rms_norm are on for Qwen3.5 teachers "
                         "only, whose attention has that gate and whose norms scale by (1 + w) (student_config sets them)")
    if config.sandwich_norm != family.sandwich_norm:
        raise ValueError(f"student sandwich_norm={config.sandwich_norm} but the {tc.model_type} teacher "
                         f"{'has' if family.sandwich_norm else 'has no'} post-sublayer norms")


@torch.no_grad()
def init_student(teacher: nn.Module, config=None, *, dtype: torch.dtype = torch.float32,
                 branch_from_attention: bool = True, **config_kw) -> QuasarLongForCausalLM:
    """A QuasarLongForCausalLM holding the teacher's weights (see the package docstring for the map).

    branch_from_attention=False leaves the branches at their fresh init (for comparison).
    """
    tc = teacher.config
    config = config if config is not None else student_config(tc, **config_kw)
    family = check_teacher(tc)
    _check_fit(config, tc, family)
    student = QuasarLongForCausalLM(config).to(dtype)
    t_model = teacher.get_decoder() if hasattr(teacher, "get_decoder") else teacher.model
    for s_layer, t_layer in zip(student.model.layers, t_model.layers):
        s_layer.load_norms(**family.norms(t_layer))
        recurrent = family.recurrent(t_layer)
        if recurrent is not None:   # Qwen3.5's gated DeltaNet: a replace-mode quasar layer
            s_layer.load_gated_deltanet(recurrent)
        else:
            s_layer.load_attention(vars(family.attention(t_layer.self_attn, tc)), into_branch=branch_from_attention)
        if is_moe_block(t_layer.mlp):   # router, experts and shared expert as they are
            s_layer.load_moe_ffn(family.moe_weights(t_layer.mlp))
        else:
            s_layer.load_dense_ffn(*family.mlp(t_layer.mlp))
    student.load_outer_weights(t_model.embed_tokens.weight, t_model.norm.weight,
                               None if config.tie_word_embeddings else teacher.get_output_embeddings().weight,
                               norm_zero_centered=family.gated)
    return student


@torch.no_grad()
def logit_gap(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor) -> float:
    """max |student logits - teacher logits| on input_ids (fp32): ~0 when the init is exact."""
    s = student(input_ids=input_ids.to(student.device), use_cache=False).logits.float()
    t = teacher(input_ids=input_ids.to(teacher.device), use_cache=False).logits.float()
    return float((s - t.to(s.device)).abs().max())
