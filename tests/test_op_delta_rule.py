"""Tests for the Quasar delta-rule op (quasar_model/ops/delta_rule.py).

CPU tests compare the chunked PyTorch path against the token-loop recurrence (the spec's math) and
against flash-linear-attention's own naive recurrence; the CUDA class compares fla's Triton kernels
against the PyTorch path and is skipped without a GPU.
"""

import pytest
import torch
import torch.nn.functional as F


from quasar_model.ops.delta_rule import delta_rule, delta_rule_chunked, delta_rule_recurrent

B, H, K, V = 2, 2, 16, 24  # K != V so a transposed state would not go unnoticed


def make_inputs(T, b=B, h=H, dk=K, dv=V, device="cpu", dtype=torch.float32, with_h0=True, seed=0):
    """Realistic inputs: the caller L2-normalises q and k and squashes beta into (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, T, h, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(b, T, h, dk, generator=g), dim=-1)
    v = torch.randn(b, T, h, dv, generator=g)
    beta = torch.rand(b, T, h, generator=g).clamp(0.01, 0.99)
    h0 = torch.randn(b, h, dk, dv, generator=g) * 0.5 if with_h0 else None
    q, k, v, beta = (x.to(device=device, dtype=dtype) for x in (q, k, v, beta))
    h0 = None if h0 is None else h0.to(device)  # states are fp32
    return q, k, v, beta, h0


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 17, 64, 100, 200])
def test_chunked_matches_recurrent(T, chunk_size, with_h0):
    q, k, v, beta, h0 = make_inputs(T, with_h0=with_h0)
    scale = K**-0.5
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, scale, h0, output_final_state=True)
    o, s = delta_rule_chunked(q, k, v, beta, scale, h0, output_final_state=True, chunk_size=chunk_size)
    assert o.shape == (B, T, H, V) and s.shape == (B, H, K, V)
    assert max_diff(o, o_ref) < 1e-5
    assert max_diff(s, s_ref) < 1e-5


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("T", [17, 100])
def test_matches_fla_naive(T, with_h0):
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    q, k, v, beta, h0 = make_inputs(T, with_h0=with_h0)
    # fla's naive reference is head-first [B, H, T, D] and scales q by d_k ** -0.5 itself
    o_fla, s_fla = delta_rule_recurrence(
        *(x.transpose(1, 2) for x in (q, k, v, beta)), initial_state=h0, output_final_state=True
    )
    o_fla = o_fla.transpose(1, 2)
    for fn in (delta_rule_recurrent, delta_rule_chunked):
        o, s = fn(q, k, v, beta, K**-0.5, h0, output_final_state=True)
        assert max_diff(o, o_fla) < 1e-5, fn.__name__
        assert max_diff(s, s_fla) < 1e-5, fn.__name__


def test_final_state_only_when_asked_and_dtypes():
    q, k, v, beta, h0 = make_inputs(20, dtype=torch.bfloat16)
    for fn in (delta_rule_recurrent, delta_rule_chunked, delta_rule):
        o, s = fn(q, k, v, beta, K**-0.5, h0)
        assert s is None
        o, s = fn(q, k, v, beta, K**-0.5, h0, output_final_state=True)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32, fn.__name__


def test_dispatch_torch_backend():
    # T == 1 goes through the token loop, T > 1 through the chunked path; both agree with the loop
    for T in (1, 70):
        q, k, v, beta, h0 = make_inputs(T)
        o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, 0.3, h0, True)
        o, s = delta_rule(q, k, v, beta, 0.3, h0, True, backend="torch")
        assert max_diff(o, o_ref) < 1e-5 and max_diff(s, s_ref) < 1e-5
    # decoding step by step from the carried state equals one pass over the whole sequence
    q, k, v, beta, h0 = make_inputs(9)
    o_full, s_full = delta_rule(q, k, v, beta, 0.3, h0, True)
    s, outs = h0, []
    for t in range(9):
        o_t, s = delta_rule(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], beta[:, t : t + 1], 0.3, s, True)
        outs.append(o_t)
    assert max_diff(torch.cat(outs, 1), o_full) < 1e-5 and max_diff(s, s_full) < 1e-5


# ----------------------------------------------------------------------------------------------
# backward


def _grads(fn, inputs, scale, **kw):
    q, k, v, beta, h0 = (x.detach().clone().requires_grad_(True) for x in inputs)
    o, s = fn(q, k, v, beta, scale, h0, output_final_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    # random cotangents so that every output element and every state entry matters
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
    return torch.autograd.grad(loss, (q, k, v, beta, h0))


@pytest.mark.parametrize("T,chunk_size", [(17, 16), (100, 32), (130, 64)])
def test_chunked_grads_match_recurrent(T, chunk_size):
    inputs = make_inputs(T)
    ref = _grads(delta_rule_recurrent, inputs, K**-0.5)
    out = _grads(delta_rule_chunked, inputs, K**-0.5, chunk_size=chunk_size)
    for name, a, b in zip(("q", "k", "v", "beta", "initial_state"), out, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_chunked_gradcheck_fp64():
    # 6 tokens in chunks of 4: one full chunk, one padded one, state carried between them
    q, k, v, beta, h0 = (x.double().requires_grad_(True) for x in make_inputs(6, b=1, h=1, dk=3, dv=2))

    def fn(q, k, v, beta, h0):
        return delta_rule_chunked(q, k, v, beta, 0.7, h0, output_final_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (q, k, v, beta, h0), fast_mode=True)


# ----------------------------------------------------------------------------------------------
# packed documents


@pytest.mark.parametrize("with_h0", [False, True])
def test_cu_seqlens_equals_separate_runs(with_h0):
    bounds = [0, 5, 5, 42, 43, 120]  # includes an empty and a single-token document
    N, T = len(bounds) - 1, bounds[-1]
    q, k, v, beta, _ = make_inputs(T, b=1)
    h0 = torch.randn(N, H, K, V) if with_h0 else None
    cu = torch.tensor(bounds, dtype=torch.long)
    o, s = delta_rule(q, k, v, beta, K**-0.5, h0, output_final_state=True, cu_seqlens=cu, backend="torch")
    assert o.shape == (1, T, H, V) and s.shape == (N, H, K, V)
    for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0_i = None if h0 is None else h0[i : i + 1]
        o_i, s_i = delta_rule_recurrent(
            q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], beta[:, bos:eos], K**-0.5, h0_i, True
        )
        if eos > bos:
            assert max_diff(o[:, bos:eos], o_i) < 1e-5
        assert max_diff(s[i : i + 1], s_i) < 1e-5


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_naming_the_argument():
    q, k, v, beta, h0 = make_inputs(10)
    s = K**-0.5
    cases = [
        ("k", lambda f: f(q, k[..., :-1], v, beta, s)),
        ("v", lambda f: f(q, k, v[:, :-1], beta, s)),
        ("beta", lambda f: f(q, k, v, beta[..., None], s)),
        ("initial_state", lambda f: f(q, k, v, beta, s, h0[..., :-1])),
        ("q", lambda f: f(q[0], k, v, beta, s)),
    ]
    for fn in (delta_rule_recurrent, delta_rule_chunked, delta_rule):
        for name, call in cases:
            with pytest.raises(ValueError, match=rf"^{name} "):
                call(fn)
    cu = torch.tensor([0, 4, 10])
    with pytest.raises(ValueError, match="cu_seqlens"):  # B = 2 with packed documents
        delta_rule(q, k, v, beta, s, cu_seqlens=cu)
    q1, k1, v1, b1, _ = make_inputs(10, b=1)
    with pytest.raises(ValueError, match="cu_seqlens"):  # does not end at T
        delta_rule(q1, k1, v1, b1, s, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="initial_state"):  # one state per document, not per batch row
        delta_rule(q1, k1, v1, b1, s, initial_state=torch.zeros(1, H, K, V), cu_seqlens=cu)
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule_chunked(q, k, v, beta, s, chunk_size=0)
    with pytest.raises(ValueError, match="triton"):  # Triton kernels need CUDA tensors
        delta_rule(q, k, v, beta, s, backend="triton")


# ----------------------------------------------------------------------------------------------
# CUDA: fla's Triton kernels vs the PyTorch path


def rel_err(a, b):
    """RMS error relative to the reference's RMS: bf16 kernels are compared at the scale of the data."""
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-8)).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels need a CUDA GPU")
class TestTritonVsTorch:
    TOL = 2e-2

    def _run(self, backend, inputs, scale, cu_seqlens=None):
        q, k, v, beta, h0 = (x.detach().clone().requires_grad_(True) for x in inputs)
        o, s = delta_rule(q, k, v, beta, scale, h0, True, cu_seqlens=cu_seqlens, backend=backend)
        g = torch.Generator(device=o.device).manual_seed(1)
        do = torch.randn(o.shape, generator=g, device=o.device).to(o.dtype)
        ds = torch.randn(s.shape, generator=g, device=s.device)
        ((o.float() * do.float()).sum() + (s * ds).sum()).backward()
        return (o, s), (q.grad, k.grad, v.grad, beta.grad, h0.grad)

    @pytest.mark.parametrize("T", [1, 63, 256, 1000])
    def test_forward_backward(self, T):
        inputs = make_inputs(T, h=4, dk=64, dv=64, device="cuda", dtype=torch.bfloat16)
        (o_tr, s_tr), g_tr = self._run("triton", inputs, 64**-0.5)
        (o_pt, s_pt), g_pt = self._run("torch", inputs, 64**-0.5)
        assert o_tr.dtype == torch.bfloat16 and s_tr.dtype == torch.float32
        assert rel_err(o_tr, o_pt) < self.TOL
        assert rel_err(s_tr, s_pt) < self.TOL
        for name, a, b in zip(("q", "k", "v", "beta", "initial_state"), g_tr, g_pt):
            assert rel_err(a, b) < self.TOL, f"grad {name}: {rel_err(a, b):.3g}"

    def test_cu_seqlens(self):
        bounds = [0, 100, 333, 512]
        inputs = list(make_inputs(bounds[-1], b=1, h=4, dk=64, dv=64, device="cuda", dtype=torch.bfloat16))
        inputs[-1] = torch.randn(len(bounds) - 1, 4, 64, 64, device="cuda") * 0.5
        cu = torch.tensor(bounds, dtype=torch.long, device="cuda")
        (o_tr, s_tr), g_tr = self._run("triton", inputs, 64**-0.5, cu)
        (o_pt, s_pt), g_pt = self._run("torch", inputs, 64**-0.5, cu)
        assert rel_err(o_tr, o_pt) < self.TOL and rel_err(s_tr, s_pt) < self.TOL
        for name, a, b in zip(("q", "k", "v", "beta", "initial_state"), g_tr, g_pt):
            assert rel_err(a, b) < self.TOL, f"grad {name}: {rel_err(a, b):.3g}"


# ----------------------------------------------------------------------------------------------
# gated delta rule: optional state decay exp(g), g = psi <= 0 per token and head


def make_g(T, b=B, h=H, lo=-10.0, device="cpu", seed=2):
    """Log-decays psi in [lo, 0]: a mix of mild and very strong (exp(-10)) decays per token."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(b, T, h, generator=gen)
    g = torch.where(u < 0.2, lo * torch.rand(b, T, h, generator=gen), -0.1 * torch.rand(b, T, h, generator=gen))
    g[..., 0, 0] = lo  # include the extreme value itself (if T > 0)
    return g.to(device)


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 17, 64, 100, 200])
def test_gated_chunked_matches_recurrent(T, chunk_size, with_h0):
    q, k, v, beta, h0 = make_inputs(T, with_h0=with_h0)
    g = make_g(T)
    scale = K**-0.5
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, scale, h0, output_final_state=True, g=g)
    o, s = delta_rule_chunked(q, k, v, beta, scale, h0, output_final_state=True, chunk_size=chunk_size, g=g)
    assert o.shape == (B, T, H, V) and s.shape == (B, H, K, V)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert max_diff(o, o_ref) < 1e-5
    assert max_diff(s, s_ref) < 1e-5


def test_gated_all_strong_decay_is_finite_and_matches():
    # psi = -10 on every token: cumulative log-decays reach -2000 inside a 200-token chunk
    q, k, v, beta, h0 = make_inputs(200)
    g = torch.full((B, 200, H), -10.0)
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, K**-0.5, h0, True, g=g)
    o, s = delta_rule_chunked(q, k, v, beta, K**-0.5, h0, True, chunk_size=200, g=g)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert max_diff(o, o_ref) < 1e-5 and max_diff(s, s_ref) < 1e-5


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("T", [17, 100])
def test_gated_matches_fla_naive(T, with_h0):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    q, k, v, beta, h0 = make_inputs(T, with_h0=with_h0)
    g = make_g(T)
    # fla's gated naive reference takes [B, T, H, D] (it transposes internally), decays before the write
    o_fla, s_fla = naive_recurrent_gated_delta_rule(
        q, k, v, beta, g, scale=K**-0.5, initial_state=h0, output_final_state=True
    )
    for fn in (delta_rule_recurrent, delta_rule_chunked):
        o, s = fn(q, k, v, beta, K**-0.5, h0, output_final_state=True, g=g)
        assert max_diff(o, o_fla) < 1e-5, fn.__name__
        assert max_diff(s, s_fla) < 1e-5, fn.__name__


@pytest.mark.parametrize("T", [1, 37])
def test_zero_decay_equals_ungated(T):
    q, k, v, beta, h0 = make_inputs(T)
    g0 = torch.zeros(B, T, H)
    for fn in (delta_rule_recurrent, delta_rule_chunked, delta_rule):
        o_a, s_a = fn(q, k, v, beta, K**-0.5, h0, True)
        o_b, s_b = fn(q, k, v, beta, K**-0.5, h0, True, g=g0)
        assert max_diff(o_a, o_b) < 1e-6 and max_diff(s_a, s_b) < 1e-6, fn.__name__


def test_gated_dispatch_and_decoding():
    q, k, v, beta, h0 = make_inputs(9)
    g = make_g(9)
    o_full, s_full = delta_rule(q, k, v, beta, 0.3, h0, True, backend="torch", g=g)
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, 0.3, h0, True, g=g)
    assert max_diff(o_full, o_ref) < 1e-5 and max_diff(s_full, s_ref) < 1e-5
    s, outs = h0, []
    for t in range(9):
        sl = slice(t, t + 1)
        o_t, s = delta_rule(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], 0.3, s, True, g=g[:, sl])
        outs.append(o_t)
    assert max_diff(torch.cat(outs, 1), o_full) < 1e-5 and max_diff(s, s_full) < 1e-5


def _gated_grads(fn, inputs, g, scale, **kw):
    q, k, v, beta, h0, g = (x.detach().clone().requires_grad_(True) for x in (*inputs, g))
    o, s = fn(q, k, v, beta, scale, h0, output_final_state=True, g=g, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return torch.autograd.grad(loss, (q, k, v, beta, h0, g))


@pytest.mark.parametrize("T,chunk_size", [(17, 16), (100, 32), (130, 64)])
def test_gated_chunked_grads_match_recurrent(T, chunk_size):
    inputs = make_inputs(T)
    g = make_g(T)
    ref = _gated_grads(delta_rule_recurrent, inputs, g, K**-0.5)
    out = _gated_grads(delta_rule_chunked, inputs, g, K**-0.5, chunk_size=chunk_size)
    for name, a, b in zip(("q", "k", "v", "beta", "initial_state", "g"), out, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_gated_chunked_gradcheck_fp64():
    q, k, v, beta, h0 = (x.double().requires_grad_(True) for x in make_inputs(6, b=1, h=1, dk=3, dv=2))
    g = make_g(6, b=1, h=1, lo=-3.0).double().requires_grad_(True)

    def fn(q, k, v, beta, h0, g):
        return delta_rule_chunked(q, k, v, beta, 0.7, h0, output_final_state=True, chunk_size=4, g=g)

    assert torch.autograd.gradcheck(fn, (q, k, v, beta, h0, g), fast_mode=True)


def test_gated_cu_seqlens_and_bad_g():
    bounds = [0, 5, 5, 42, 43, 120]
    N, T = len(bounds) - 1, bounds[-1]
    q, k, v, beta, _ = make_inputs(T, b=1)
    g = make_g(T, b=1)
    h0 = torch.randn(N, H, K, V)
    cu = torch.tensor(bounds, dtype=torch.long)
    o, s = delta_rule(q, k, v, beta, K**-0.5, h0, True, cu_seqlens=cu, backend="torch", g=g)
    for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        sl = slice(bos, eos)
        o_i, s_i = delta_rule_recurrent(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], K**-0.5, h0[i : i + 1], True, g=g[:, sl])
        if eos > bos:
            assert max_diff(o[:, sl], o_i) < 1e-5
        assert max_diff(s[i : i + 1], s_i) < 1e-5
    for fn in (delta_rule_recurrent, delta_rule_chunked, delta_rule):
        with pytest.raises(ValueError, match=r"^g "):
            fn(q, k, v, beta, K**-0.5, g=g[..., None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels need a CUDA GPU")
class TestGatedTritonVsTorch:
    TOL = 2e-2

    def _run(self, backend, inputs, g, scale, cu_seqlens=None):
        q, k, v, beta, h0, g = (x.detach().clone().requires_grad_(True) for x in (*inputs, g))
        o, s = delta_rule(q, k, v, beta, scale, h0, True, cu_seqlens=cu_seqlens, backend=backend, g=g)
        gen = torch.Generator(device=o.device).manual_seed(1)
        do = torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype)
        ds = torch.randn(s.shape, generator=gen, device=s.device)
        ((o.float() * do.float()).sum() + (s * ds).sum()).backward()
        return (o, s), (q.grad, k.grad, v.grad, beta.grad, h0.grad, g.grad)

    @pytest.mark.parametrize("T", [1, 63, 256, 1000])
    def test_forward_backward(self, T):
        inputs = make_inputs(T, h=4, dk=64, dv=64, device="cuda", dtype=torch.bfloat16)
        g = make_g(T, h=4, lo=-3.0, device="cuda")  # fp32 log-decays
        (o_tr, s_tr), g_tr = self._run("triton", inputs, g, 64**-0.5)
        (o_pt, s_pt), g_pt = self._run("torch", inputs, g, 64**-0.5)
        assert o_tr.dtype == torch.bfloat16 and s_tr.dtype == torch.float32
        assert rel_err(o_tr, o_pt) < self.TOL
        assert rel_err(s_tr, s_pt) < self.TOL
        for name, a, b in zip(("q", "k", "v", "beta", "initial_state", "g"), g_tr, g_pt):
            assert rel_err(a, b) < self.TOL, f"grad {name}: {rel_err(a, b):.3g}"

    def test_cu_seqlens(self):
        bounds = [0, 100, 333, 512]
        inputs = list(make_inputs(bounds[-1], b=1, h=4, dk=64, dv=64, device="cuda", dtype=torch.bfloat16))
        inputs[-1] = torch.randn(len(bounds) - 1, 4, 64, 64, device="cuda") * 0.5
        g = make_g(bounds[-1], b=1, h=4, lo=-3.0, device="cuda")
        cu = torch.tensor(bounds, dtype=torch.long, device="cuda")
        (o_tr, s_tr), g_tr = self._run("triton", inputs, g, 64**-0.5, cu)
        (o_pt, s_pt), g_pt = self._run("torch", inputs, g, 64**-0.5, cu)
        assert rel_err(o_tr, o_pt) < self.TOL and rel_err(s_tr, s_pt) < self.TOL
        for name, a, b in zip(("q", "k", "v", "beta", "initial_state", "g"), g_tr, g_pt):
            assert rel_err(a, b) < self.TOL, f"grad {name}: {rel_err(a, b):.3g}"
