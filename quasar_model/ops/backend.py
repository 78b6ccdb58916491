"""Which implementation a branch op runs: 'triton' (flash-linear-attention, CUDA only) or 'torch'.

Chosen per call from the tensor's device; `QUASAR_KERNEL_BACKEND=torch|triton` or an explicit
`backend=` argument overrides it (the benchmarks force 'torch' on GPU to measure the ratio).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> str:
    backend = backend or os.environ.get("QUASAR_KERNEL_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda:
        raise ValueError("kernel backend 'triton' needs CUDA tensors; use 'torch' on CPU")
    return backend
