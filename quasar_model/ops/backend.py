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


def check_cu_seqlens(cu_seqlens, batch: int) -> None:
    """Structure of packed-document boundaries: a 1-D int32/int64 [N+1] tensor over one row."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N+1] of document boundaries")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32/int64 (LongTensor), got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got B={batch}")


def check_cu_seqlens_bounds(bounds: list[int], T: int) -> None:
    """Values of the boundaries (host-side: only where the caller needs them on the host anyway)."""
    if bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T} without decreasing, got {bounds}")
