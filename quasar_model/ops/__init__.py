"""Sequence ops of the three recurrent branches.

Each op is one function with two implementations: flash-linear-attention's Triton kernels on CUDA,
and a pure-PyTorch chunked path (parallel inside a chunk, recurrent across chunks) that runs
anywhere. Every op also has a plain token-by-token recurrence: the spec's math, used as the
reference in tests and as the single-step path when decoding on CPU. Packed documents (cu_seqlens)
are checked and looped over in one place, varlen.py.

Layout everywhere: [batch, time, heads, dim]; states are fp32.
"""
