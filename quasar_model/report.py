"""Parameter counts of a config, built on the `meta` device so even `preview` costs no memory."""
from __future__ import annotations

import torch

from .configuration_quasar_long import QuasarLongConfig
from .modeling_quasar_long import QuasarLongForCausalLM


def build_on_meta(config: QuasarLongConfig):
    with torch.device("meta"):
        return QuasarLongForCausalLM(config)


def parameter_counts(config: QuasarLongConfig) -> dict[str, int]:
    """total, active per token (routed experts counted k of E, engram tables one row per table), by part
    (the model's own parameter_groups)."""
    groups = build_on_meta(config).parameter_groups()
    parts = {g: sum(p.numel() for _, p in named) for g, named in groups.items()}
    inactive = sum(p.numel() * (config.num_experts - config.num_experts_per_tok) // config.num_experts
                   for _, p in groups["experts_routed"])
    inactive += sum(p.numel() - p.shape[1] * len(config.engram_ngram_orders) * config.engram_num_heads
                    for name, p in groups["engram"] if name.endswith("table.weight"))
    total = sum(parts.values())
    return {"total": total, "active": total - inactive, **parts}


def branch_layout(config: QuasarLongConfig) -> dict[int, str]:
    return {i: config.branch_kind(i) for i in config.hybrid_attention_layers}
