"""Weights given from outside (a teacher's, read by quasar_model/conversion) laid into a module.

Each module's `load_*` method takes tensors in plain nn.Linear terms ([out, in] rows, q/k/v apart)
and owns how its own parameters fuse, repeat or transpose them; `load_` is their shape-checked copy.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def load_(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{name}: teacher tensor {tuple(src.shape)} does not fit the student's {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))


@torch.no_grad()
def load_gqa_shaped_branch(branch, q, k, v, o, *, q_norm=None, k_norm=None, norms_zero_centered=False) -> None:
    """The GLA and Raven branches' attention-shaped part: q_proj, kv_proj = [k; v], q/k norms, o_proj."""
    load_(branch.q_proj.weight, q, "branch.q_proj")
    load_(branch.kv_proj.weight, torch.cat([k, v]), "branch.kv_proj")
    if q_norm is not None:
        branch.q_norm.load_scale(q_norm, zero_centered=norms_zero_centered, name="branch.q_norm")
        branch.k_norm.load_scale(k_norm, zero_centered=norms_zero_centered, name="branch.k_norm")
    load_(branch.o_proj.weight, o, "branch.o_proj")
