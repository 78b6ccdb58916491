"""GLA (per-head 'simple' gates and per-key gates): fla's kernels against the PyTorch path, under
Triton's interpreter: outputs, final states and gradients of every input, initial state included."""
import pytest
import torch

from parity import assert_parity, compare
from quasar_model.ops.gla import gated_linear_attention
from test_op_gla import make_inputs

B, H, K, V = 2, 2, 16, 32     # fla wants dims >= 16; K != V so a transposed state would show
BF16_TOL = 2e-2               # as the CUDA tests: bf16 storage, fp32 accumulation
FP32_TOL = 1e-5               # the interpreter does fp32 dots exactly (a GPU would use tf32)


def gla(q, k, v, g, h0, backend, cu_seqlens=None):
    return gated_linear_attention(q, k, v, g, K**-0.5, h0, True, cu_seqlens=cu_seqlens, backend=backend)


# T = 1: fused_recurrent_(simple_)gla; T = 100: chunk_(simple_)gla over a full and a partial chunk
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gate", ["head_l1", "key"])
@pytest.mark.parametrize("T", [1, 100])
def test_forward_backward(T, gate, dtype):
    q, k, v, g, h0 = make_inputs(T, gate, b=B, h=H, dk=K, dv=V, dtype=dtype)
    tol = BF16_TOL if dtype == torch.bfloat16 else FP32_TOL
    rows = compare(gla, dict(q=q, k=k, v=v, g=g, h0=h0), ["o", "final_state"], tol)
    assert_parity(rows)


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("gate", ["head_l1", "key"])
def test_packed_documents(gate, with_h0):
    lengths = [1, 63, 36]   # a single-token document, and boundaries inside a chunk
    q, k, v, g, _ = make_inputs(sum(lengths), gate, b=1, h=H, dk=K, dv=V, dtype=torch.bfloat16)
    h0 = torch.randn(len(lengths), H, K, V, generator=torch.Generator().manual_seed(3)) * 0.5
    cu = torch.tensor([0] + lengths).cumsum(0)

    def op(q, k, v, g, h0, backend):
        return gla(q, k, v, g, h0, backend, cu_seqlens=cu)

    rows = compare(op, dict(q=q, k=k, v=v, g=g, h0=h0 if with_h0 else None), ["o", "final_state"], BF16_TOL)
    assert_parity(rows)
