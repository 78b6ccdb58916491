"""Gated slot attention (the raven branch): fla's chunk_gsa / fused_recurrent_gsa against the
PyTorch path, under Triton's interpreter: outputs, both final states and gradients of every input,
both initial states included."""
import pytest
import torch

from parity import assert_parity, compare
from quasar_model.ops.gated_slot import gated_slot_attention
from test_op_gated_slot import make_inputs, make_state

H, K, V, M = 2, 16, 32, 8     # fla wants dims >= 16; K != V so a transposed state would show
BF16_TOL, BF16_GRAD_TOL = 2e-2, 5e-2   # as the CUDA tests
FP32_TOL = 1e-5               # the interpreter does fp32 dots exactly (a GPU would use tf32)
OUTS = ["o", "final_hk", "final_hv"]


def gsa(q, k, v, s, g, hk0, hv0, backend, cu_seqlens=None):
    h0 = None if hk0 is None else (hk0, hv0)
    return gated_slot_attention(q, k, v, s, g, K**-0.5, h0, True, cu_seqlens=cu_seqlens, backend=backend)


def inputs(B, T, N, dtype, strong=False):
    q, k, v, s, g = make_inputs(B, T, H, K, V, M, topk=4, strong=strong, seed=T)
    hk0, hv0 = make_state(N, H, K, V, M)
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), s=s.to(dtype), g=g.to(dtype), hk0=hk0, hv0=hv0)


# T = 1: fused_recurrent_gsa; T = 100: chunk_gsa over a full and a partial chunk
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 100])
def test_forward_backward(T, dtype):
    bf16 = dtype == torch.bfloat16
    rows = compare(gsa, inputs(2, T, 2, dtype), OUTS, BF16_TOL if bf16 else FP32_TOL,
                   BF16_GRAD_TOL if bf16 else FP32_TOL)
    assert_parity(rows)


def test_strong_decay():
    # log-decays down to -20 in one step: the chunked paths must not overflow or lose them
    rows = compare(gsa, inputs(1, 70, 1, torch.bfloat16, strong=True), OUTS, BF16_TOL, BF16_GRAD_TOL)
    assert_parity(rows)


def test_packed_documents():
    lengths = [1, 63, 36]   # a single-token document, and boundaries inside a chunk
    cu = torch.tensor([0] + lengths).cumsum(0)

    def op(backend, **kw):
        return gsa(backend=backend, cu_seqlens=cu, **kw)

    rows = compare(op, inputs(1, sum(lengths), len(lengths), torch.bfloat16), OUTS, BF16_TOL, BF16_GRAD_TOL)
    assert_parity(rows)
