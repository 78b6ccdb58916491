"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).

Used as the dense MLP and as the shared expert of the MoE layer. No biases, as
in LLaMA / DeepSeek: they add parameters and do nothing useful next to RMSNorm.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .loading import load_


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    @torch.no_grad()
    def load_weights(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, name: str = "ffn") -> None:
        """gate, up [intermediate, hidden] and down [hidden, intermediate], nn.Linear's layout."""
        for proj, t in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            load_(getattr(self, proj).weight, t, f"{name}.{proj}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., hidden] -> [..., intermediate] (gated) -> [..., hidden]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
