"""Negative control: the comparison the other tests use fails on a Triton path that is deliberately
wrong in the ways a real dispatch bug would be, even at the loosest (bf16) tolerance. Without this,
a comparison that always passes (say, both sides running the same path) would look the same."""
import pytest
import torch
import torch.nn.functional as F

from parity import assert_parity, compare
from quasar_model.ops.gla import gated_linear_attention
from test_op_gla import make_inputs

K, V, T = 16, 32, 100
BF16_TOL = 2e-2


def broken(bug):
    """gated_linear_attention whose 'triton' side has `bug`; the 'torch' side is the real one."""
    def op(q, k, v, g, h0, backend):
        scale = K**-0.5
        if backend == "triton":
            if bug == "scale off by 5%":
                scale *= 1.05
            elif bug == "initial state dropped":
                h0 = h0 * 0            # keeps the gradient path, loses the values
            elif bug == "last token lost":
                o, s = gated_linear_attention(q[:, :-1], k[:, :-1], v[:, :-1], g[:, :-1], scale, h0, True,
                                              backend=backend)
                return F.pad(o, (0, 0, 0, 0, 0, 1)), s
        return gated_linear_attention(q, k, v, g, scale, h0, True, backend=backend)
    return op


@pytest.mark.parametrize("bug, caught", [
    ("scale off by 5%", "o"),
    ("initial state dropped", "dh0"),
    ("last token lost", "o"),        # 1 token in 100: an RMS error ratio of about 0.1
])
def test_a_wrong_triton_result_fails_the_comparison(bug, caught):
    q, k, v, g, h0 = make_inputs(T, "key", b=1, h=2, dk=K, dv=V, dtype=torch.bfloat16)
    rows = compare(broken(bug), dict(q=q, k=k, v=v, g=g, h0=h0), ["o", "final_state"], BF16_TOL)
    with pytest.raises(AssertionError, match=rf"(; | ){caught}: "):
        assert_parity(rows)


def test_the_correct_path_passes_the_same_comparison():
    q, k, v, g, h0 = make_inputs(T, "key", b=1, h=2, dk=K, dv=V, dtype=torch.bfloat16)
    assert_parity(compare(broken(None), dict(q=q, k=k, v=v, g=g, h0=h0), ["o", "final_state"], BF16_TOL))
