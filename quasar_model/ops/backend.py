"""Which implementation a branch op runs: 'triton' (flash-linear-attention, CUDA only) or 'torch'.

Chosen per call from the tensor's device; `QUASAR_KERNEL_BACKEND=torch|triton` or an explicit
`backend=` argument overrides it (the benchmarks force 'torch' on GPU to measure the ratio).
'triton' on CPU tensors is refused, except under Triton's interpreter (`TRITON_INTERPRET=1`, set
before fla is imported), which runs the kernels on CPU: tests/interpret checks the Triton path
against the PyTorch one that way on machines without a GPU.
"""
from __future__ import annotations

import os

import torch

KERNEL_BACKENDS = ("auto", "torch", "triton")


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> str:
    backend = backend or os.environ.get("QUASAR_KERNEL_BACKEND", "auto")
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernel backend 'triton' needs CUDA tensors (or Triton's interpreter, "
                         "TRITON_INTERPRET=1); use 'torch' on CPU")
    return backend

