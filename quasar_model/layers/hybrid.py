"""The hybrid mixer: out = GQA(x) + sigmoid(a) * Adapter(c * g * Branch(x))   (replacement mode "add").

a starts at hybrid_alpha_init (sigmoid(-15) ~ 3e-7), so a fresh branch is switched off and the
layer behaves as the attention it was distilled from; Adapter(y) = y + U(D(y)) with U zero, so it
starts as the identity.

Replacement mode "replace" (an extension past the spec, which names only "add"): the layer has no
attention and no a, out = Adapter(c * g * Branch(x)); the Quasar-10B recipe's attention layers
swapped for recurrent ones, whose state does not grow with the context. The layers in
`hybrid_replace_layers` are replace-mode layers inside an "add" model: a teacher's own recurrent
layers (Qwen3.5's gated DeltaNet) carried over as branches, with no attention beside them.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from .attention import GQAttention
from .gla import GLABranch
from .quasar import QuasarBranch
from .raven import RavenBranch

BRANCHES = {"quasar": QuasarBranch, "raven": RavenBranch, "gla": GLABranch}


class HybridMixer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.alpha_init = config.hybrid_alpha_init
        self.kind = config.branch_kind(layer_idx)
        self.replace = config.is_replace_layer(layer_idx)
        self.attn = None if self.replace else GQAttention(config)
        self.branch = BRANCHES[self.kind](config, layer_idx)
        self.alpha = None if self.replace else nn.Parameter(torch.empty(()))
        self.branch_gain = nn.Parameter(torch.empty(()))
        self.channel_scale = nn.Parameter(torch.empty(config.hidden_size))
        r = config.hybrid_output_adapter_rank
        self.adapter_down = nn.Linear(config.hidden_size, r, bias=False) if r else None
        self.adapter_up = nn.Linear(r, config.hidden_size, bias=False) if r else None
        self.reset_parameters()

    def branch_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Everything but the attention: the branch and the gates a, g, c and the adapter on its
        output. The spec's wrapper is GQA(x) + sigmoid(a) * Adapter(c * g * Branch(x)): a, g, c and the
        adapter shape only the branch's contribution, are new rather than copied from a teacher, and
        train with the branch."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("attn.")]

    @torch.no_grad()
    def load_from_attention(self, weights: dict, *, into_branch: bool = True) -> None:
        """An attention (GQAttention.load_weights' arguments) into the attention beside the branch, if
        any, and, with into_branch, into the branch as its start (its load_from_attention); what is
        not an attention projection (gates, decays, slot routers, a, g, c) keeps its fresh init."""
        if self.attn is not None:
            self.attn.load_weights(**weights)
        if into_branch:
            self.branch.load_from_attention(**weights)

    def reset_parameters(self):
        if self.alpha is not None:
            init.constant_(self.alpha, self.alpha_init)
        init.ones_(self.branch_gain)
        init.ones_(self.channel_scale)
        if self.adapter_up is not None:
            init.zeros_(self.adapter_up.weight)

    def forward(self, x, rope, attn_mask, state: dict | None, token_mask, cu_seqlens):
        a = None if self.replace else self.attn(x, rope, attn_mask, state)
        y, branch_state = self.branch(
            x, state=None if state is None else state.get("branch"), token_mask=token_mask,
            cu_seqlens=cu_seqlens, rope=rope,
        )
        if state is not None:
            state["branch"] = branch_state
        y = self.channel_scale * self.branch_gain * y
        if self.adapter_up is not None:
            y = y + self.adapter_up(self.adapter_down(y))
        if self.replace:
            return y
        return a + torch.sigmoid(self.alpha) * y
