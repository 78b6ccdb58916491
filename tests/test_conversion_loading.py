"""The student modules' load methods (quasar_model/layers/loading.py and the load_* methods beside
each module), which conversion from teacher families goes through."""
import pytest
import torch

from quasar_model.layers.moe import MoE
from quasar_model.layers.norm import RMSNorm


def test_norm_scales_cross_conventions_and_keep_the_function():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    teacher = RMSNorm(8, zero_centered=True)
    with torch.no_grad():
        teacher.weight.copy_(torch.linspace(-0.3, 0.4, 8))
    for zero_centered in (True, False):
        student = RMSNorm(8, zero_centered=zero_centered)
        student.load_scale(teacher.weight, zero_centered=True)
        torch.testing.assert_close(student(x), teacher(x), atol=1e-6, rtol=0)
    same = RMSNorm(8, zero_centered=True)
    same.load_scale(teacher.weight, zero_centered=True)
    assert torch.equal(same.weight, teacher.weight)            # same convention: a bit-exact copy
    with pytest.raises(ValueError, match=r"q_norm: teacher tensor \(4,\) does not fit the student's \(8,\)"):
        same.load_scale(torch.zeros(4), zero_centered=True, name="q_norm")


def test_moe_refuses_parts_it_has_no_place_for_and_upcycles_exactly():
    moe = MoE(16, 8, num_experts=4, num_experts_per_tok=2, num_shared_experts=0, n_group=1, topk_group=1,
              routed_scaling_factor=1.0)
    router, gate_up, down = torch.randn(4, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    with pytest.raises(ValueError, match="layers.2.ffn: the teacher's MoE has shared_experts"):
        moe.load_weights(router, gate_up, down, shared=(torch.zeros(8, 16),) * 2 + (torch.zeros(16, 8),),
                         name="layers.2.ffn")
    moe.load_weights(router, gate_up, down)
    assert torch.equal(moe.gate_up_proj[1], gate_up[1].t()) and torch.equal(moe.down_proj[3], down[3].t())
    up = MoE(16, 8, num_experts=4, num_experts_per_tok=2, num_shared_experts=2, n_group=1, topk_group=1,
              routed_scaling_factor=1.0)
    g, u, d = torch.randn(16, 16), torch.randn(16, 16), torch.randn(16, 16)
    up.upcycle(g, u, d)
    assert torch.equal(up.shared_experts.gate_proj.weight, g) and torch.equal(up.gate_up_proj[3][:, 8:], u[8:].t())
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(up(x), up.shared_experts(x))   # the routed experts write nothing yet
