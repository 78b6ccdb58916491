"""MoE layer: dispatch == loop reference, routing rule, bias buffer, balancing, padding, args."""

import copy

import pytest
import torch
import torch.nn.functional as F


from quasar_model.layers.mlp import SwiGLU
from quasar_model.layers.moe import MoE, _experts_loop, _experts_sorted, _grouped_mm_ok, route

# the device-dependent dispatches; grouped_mm only where the probe says it runs
DISPATCHES = ["padded"] + (["grouped_mm"] if _grouped_mm_ok(torch.device("cpu"), torch.float32, 32, 16) else [])


def make_moe(**kw):
    args = dict(
        hidden_size=32,
        moe_intermediate_size=16,
        num_experts=16,
        num_experts_per_tok=4,
        num_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
    )
    args.update(kw)
    return MoE(**args)


def test_swiglu():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 12)
    assert sorted(n for n, _ in mlp.named_parameters()) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = torch.randn(3, 5, 8)
    ref = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), ref)


# ---- grouped dispatch == per-expert loop -------------------------------------


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("n_tokens", [3, 200])  # 3 tokens: most experts get no rows
def test_dispatch_functions_match_loop(dispatch, n_tokens):
    torch.manual_seed(0)
    E, H, I, k = 16, 32, 16, 2
    x = torch.randn(n_tokens, H, requires_grad=True)
    w1 = (torch.randn(E, H, 2 * I) * 0.1).requires_grad_()
    w2 = (torch.randn(E, I, H) * 0.1).requires_grad_()
    idx = torch.rand(n_tokens, E).topk(k, dim=-1).indices
    wt = torch.rand(n_tokens, k, requires_grad=True)
    g = torch.randn(n_tokens, H)

    ref = _experts_loop(x, idx, wt, w1, w2)
    ref_grads = torch.autograd.grad(ref, (x, w1, w2, wt), g)
    out = _experts_sorted(x, idx, wt, w1, w2, dispatch)
    grads = torch.autograd.grad(out, (x, w1, w2, wt), g)

    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_layer_dispatch_matches_loop_forward_and_grads(dispatch):
    torch.manual_seed(0)
    fast = make_moe(dispatch=dispatch)
    with torch.no_grad():
        fast.expert_bias.copy_(torch.randn(16) * 0.1)  # exercise biased selection too
    slow = copy.deepcopy(fast)
    slow.dispatch = "loop"

    x = torch.randn(2, 24, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(xa), slow(xb)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    for (name, pa), (_, pb) in zip(fast.named_parameters(), slow.named_parameters()):
        assert pa.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_grouped_mm_backward_of_sum():
    # y.sum() hands grouped_mm a stride-0 grad; the layer must still train
    if "grouped_mm" not in DISPATCHES:
        pytest.skip("torch._grouped_mm not usable here")
    torch.manual_seed(0)
    m = make_moe(dispatch="grouped_mm", num_shared_experts=0)
    m(torch.randn(1, 10, 32)).sum().backward()
    assert m.gate_up_proj.grad is not None and m.down_proj.grad is not None


# ---- routing ---------------------------------------------------------------


def test_route_hand_example():
    # 8 experts in 4 groups of 2, keep 2 groups, pick 2 experts
    s = torch.tensor([[0.9, 0.05, 0.6, 0.5, 0.8, 0.7, 0.2, 0.3]])
    # group scores (sum of both): 0.95, 1.1, 1.5, 0.5 -> keep groups 2, 1.
    # expert 0 has the best score but sits in a dropped group.
    idx, w = route(s, torch.zeros(8), top_k=2, n_group=4, topk_group=2)
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [4, 5]
    torch.testing.assert_close(w[0][order], torch.tensor([0.8, 0.7]))

    # bias +0.5 on expert 3: group 1 now 1.6, selection becomes {3, 4},
    # but the weights stay the *unbiased* scores 0.5 and 0.8
    b = torch.zeros(8)
    b[3] = 0.5
    idx, w = route(s, b, top_k=2, n_group=4, topk_group=2)
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [3, 4]
    torch.testing.assert_close(w[0][order], torch.tensor([0.5, 0.8]))


def test_route_group_limit():
    torch.manual_seed(0)
    N, E, G, TG, k = 512, 16, 4, 2, 4
    s = torch.rand(N, E)
    b = torch.randn(E) * 0.3
    idx, w = route(s, b, k, G, TG)
    torch.testing.assert_close(w, s.gather(1, idx))
    biased = (s + b).view(N, G, E // G)
    best_groups = biased.sort(dim=-1, descending=True).values[..., :2].sum(-1).topk(TG, dim=-1).indices
    groups = idx // (E // G)  # [N, k]
    for t in range(N):
        assert set(groups[t].tolist()) <= set(best_groups[t].tolist())
    assert all(len(set(r.tolist())) == k for r in idx)  # k distinct experts


def test_bias_changes_selection_not_weights():
    torch.manual_seed(0)
    m = make_moe(num_shared_experts=0, dispatch="loop").eval()
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        m.expert_bias.copy_(torch.randn(16))  # big bias: selection clearly changes
        y = m(x)
        s = torch.sigmoid(x[0] @ m.gate.weight.T)  # [64, 16] unbiased scores
        idx, _ = route(s, m.expert_bias, 4, 4, 2)
        idx0, _ = route(s, torch.zeros(16), 4, 4, 2)
        assert not torch.equal(idx.sort(-1).values, idx0.sort(-1).values)
        sel = s.gather(1, idx)
        w = sel / sel.sum(-1, keepdim=True) * 2.5  # unbiased, renormalised, scaled
        ref = _experts_loop(x[0], idx, w, m.gate_up_proj, m.down_proj)
    torch.testing.assert_close(y[0], ref, atol=1e-6, rtol=1e-5)


# ---- bias buffer -----------------------------------------------------------


def test_bias_is_persistent_buffer_without_grad():
    m = make_moe()
    assert "expert_bias" in dict(m.named_buffers())
    assert "expert_bias" not in dict(m.named_parameters())
    sd = m.state_dict()
    assert "expert_bias" in sd and "bias_momentum" in sd
    assert "tokens_per_expert" not in sd and "last_counts" not in sd  # non-persistent
    m.train()
    m(torch.randn(2, 8, 32)).sum().backward()
    assert not m.expert_bias.requires_grad and m.expert_bias.grad is None
    # a bf16 cast keeps the balancing state in fp32
    m.to(torch.bfloat16)
    assert m.expert_bias.dtype == torch.float32 and m.gate_up_proj.dtype == torch.bfloat16
    assert m(torch.randn(1, 4, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- balancing rules -------------------------------------------------------


def test_update_bias_formulas():
    counts = torch.tensor([40, 10, 30, 20])  # mean 25
    n = counts.float()
    v = (25 - n) / 25

    m = make_moe(num_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    m.tokens_per_expert.copy_(counts)
    m.update_bias()
    d = 2e-3 * torch.tanh(2.0 * v)
    d = d - d.mean()
    mom = 0.5 * d
    torch.testing.assert_close(m.bias_momentum, mom)
    torch.testing.assert_close(m.expert_bias, mom - mom.mean())
    assert m.tokens_per_expert.sum() == 0 and torch.equal(m.last_window_counts, counts)

    m = make_moe(num_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, balancing="sign")
    m.tokens_per_expert.copy_(counts)
    m.update_bias()
    torch.testing.assert_close(m.expert_bias, torch.tensor([-1e-3, 1e-3, -1e-3, 1e-3]))

    m = make_moe(num_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, balancing="none")
    m.tokens_per_expert.copy_(counts)
    m.update_bias()
    assert m.expert_bias.abs().sum() == 0
    assert m.load_imbalance() == pytest.approx(40 / 25)


def skewed_run(balancing, steps=100):
    """Router pushed towards experts 0-2; returns max/mean load before, after."""
    torch.manual_seed(0)
    H = 32
    m = MoE(H, 8, 16, 2, 0, 1, 1, 1.0, balancing=balancing)
    with torch.no_grad():
        m.gate.weight.normal_(0, 0.05)
        m.gate.weight[:3] += 0.4 / H  # inputs have mean 1 -> +0.4 logit for experts 0-2
    g = torch.Generator().manual_seed(1)
    x_eval = torch.randn(1, 4096, H, generator=g) + 1.0
    with torch.no_grad():
        m.eval()
        m(x_eval)
        before = m.load_imbalance(m.last_counts)
        m.train()  # no optimizer: only the bias can change the routing
        for _ in range(steps):
            m(torch.randn(1, 512, H, generator=g) + 1.0)
            m.update_bias()
        m.eval()
        m(x_eval)
        after = m.load_imbalance(m.last_counts)
    return before, after


@pytest.mark.parametrize("balancing", ["smebu", "sign"])
def test_balancing_reduces_imbalance(balancing):
    before, after = skewed_run(balancing)
    assert before > 4.0  # the toy router really is skewed
    assert after < before / 3, (before, after)


def test_no_balancing_keeps_imbalance():
    before, after = skewed_run("none", steps=5)
    assert after == pytest.approx(before)


# ---- padding ---------------------------------------------------------------


def test_padding_not_counted_and_not_mixed():
    torch.manual_seed(0)
    m = make_moe().train()
    x = torch.randn(2, 10, 32)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :7] = True
    mask[1, :3] = True
    y = m(x, token_mask=mask)
    assert m.tokens_per_expert.sum().item() == 10 * 4  # 10 real tokens x top-4
    assert m.last_counts.sum().item() == 10 * 4
    # real tokens get the same output as without any padding around them
    torch.testing.assert_close(y[0, :7], m(x[:1, :7])[0], atol=1e-6, rtol=1e-5)
    # eval forwards do not count
    m.eval()
    before = m.tokens_per_expert.clone()
    m(x, token_mask=mask)
    assert torch.equal(m.tokens_per_expert, before)


# ---- arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(num_experts=15), "n_group"),
        (dict(topk_group=5), "topk_group"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),  # 2 groups x 4 experts = 8 reachable
        (dict(balancing="aux_loss"), "balancing"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(smebu_beta=1.0), "smebu_beta"),
        (dict(dispatch="magic"), "dispatch"),
        (dict(score="tanh"), "score"),
        (dict(num_shared_experts=0, shared_gate=True), "shared_gate"),
        (dict(num_shared_experts=0, shared_intermediate_size=8), "shared_intermediate_size"),
    ],
)
def test_invalid_args(kw, name):
    with pytest.raises(ValueError, match=name):
        make_moe(**kw)


def test_softmax_router_without_renormalisation_hand_example():
    # Qwen-MoE style: softmax over all experts, the picked probabilities used as they are
    moe = make_moe(n_group=1, topk_group=1, num_experts_per_tok=2, score="softmax", norm_topk_prob=False,
                   routed_scaling_factor=1.0, num_shared_experts=0)
    torch.manual_seed(0)
    x = torch.randn(1, 5, moe.hidden_size)
    probs = torch.softmax(x.reshape(5, -1) @ moe.gate.weight.t(), dim=-1)
    top = probs.topk(2, dim=-1)
    ref = torch.zeros(5, moe.hidden_size)
    for n in range(5):
        for w, e in zip(top.values[n], top.indices[n]):
            g, u = (x.reshape(5, -1)[n] @ moe.gate_up_proj[e]).chunk(2)
            ref[n] += w * ((F.silu(g) * u) @ moe.down_proj[e])
    torch.testing.assert_close(moe(x).reshape(5, -1), ref, atol=1e-7, rtol=1e-5)
    assert float(top.values.sum(-1).max()) < 0.99         # unnormalised indeed: the test can tell
