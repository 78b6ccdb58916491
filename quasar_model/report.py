"""Parameter counts of a config, built on the `meta` device so even `preview` costs no memory."""
from __future__ import annotations

import torch

from .configuration_quasar_long import QuasarLongConfig


def build_on_meta(config: QuasarLongConfig):
    from .modeling_quasar_long import QuasarLongForCausalLM

    with torch.device("meta"):
        return QuasarLongForCausalLM(config)


def parameter_counts(config: QuasarLongConfig) -> dict[str, int]:
    """total, active per token (routed experts counted k of E, engram tables one row per table), by part."""
    model = build_on_meta(config)
    parts = {"embeddings": 0, "attention": 0, "branches": 0, "ffn_dense": 0, "experts_routed": 0,
             "experts_shared": 0, "engram": 0, "latent_memory": 0, "other": 0}
    inactive = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if "embed_tokens" in name or "lm_head" in name:
            parts["embeddings"] += n
        elif ".engram." in name:
            parts["engram"] += n
            if name.endswith("table.weight"):
                inactive += n - p.shape[1] * len(config.engram_ngram_orders) * config.engram_num_heads
        elif ".memory." in name:
            parts["latent_memory"] += n
        elif ".branch." in name or ".adapter_" in name:
            parts["branches"] += n
        elif ".attn." in name or ".mixer." in name:
            parts["attention"] += n
        elif ".ffn.shared" in name:
            parts["experts_shared"] += n
        elif ".ffn." in name and ("gate_up_proj" in name or "down_proj" in name) and p.dim() == 3:
            parts["experts_routed"] += n
            inactive += n * (config.num_experts - config.num_experts_per_tok) // config.num_experts
        elif ".ffn." in name and ".gate." not in name:
            parts["ffn_dense"] += n
        else:
            parts["other"] += n
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(parts.values())
    return {"total": total, "active": total - inactive, **parts}


def branch_layout(config: QuasarLongConfig) -> dict[int, str]:
    return {i: config.branch_kind(i) for i in config.hybrid_attention_layers}
