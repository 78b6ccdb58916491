"""Gated slot attention (the Raven branch op): chunked vs token loop vs fla's naive reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import quasar_model.ops.gated_slot as gated_slot_module
from quasar_model.ops.gated_slot import (
    gated_slot_attention,
    gated_slot_chunked,
    gated_slot_recurrent,
)


def make_inputs(B, T, H, K, V, M, *, topk=4, strong=False, seed=0, device="cpu"):
    """Inputs as the model makes them: RMS-normalised q, k; a top-k-of-M router renormalised per
    head; per head/token log-rate A = -exp(A_log) * softplus(.) <= 0; g = A * r; s = 1 - exp(g).
    strong=True pushes A far down, so some slots see g of -20 in a single step."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k = randn(B, T, H, K), randn(B, T, H, K)
    q, k = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) for x in (q, k))
    v = randn(B, T, H, V)
    logits = randn(B, T, H, M)
    top = logits.topk(topk, dim=-1)
    r = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
    A_log = randn(H) * 0.5 + (3.5 if strong else 0.0)
    A = -A_log.exp()[:, None] * F.softplus(randn(B, T, H, 1) + (2.0 if strong else 0.0))
    g = (A * r).clamp(min=-20.0) if strong else A * r
    s = 1 - g.exp()
    return [x.to(device) for x in (q, k, v, s, g)]


def make_state(N, H, K, V, M, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hk = torch.randn(N, H, K, M, generator=gen) * 0.5
    hv = torch.randn(N, H, M, V, generator=gen) * 0.5
    return hk.to(device), hv.to(device)


def max_diff(a, b):
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


B, H, K, V, M = 2, 2, 16, 12, 8
SCALE = K ** -0.5


def test_strong_inputs_really_are_strong():
    *_, g = make_inputs(B, 64, H, K, V, M, strong=True)
    assert g.min().item() <= -19.0  # the stability case below is exercised


@pytest.mark.parametrize("strong", [False, True], ids=["mild", "strong"])
@pytest.mark.parametrize("with_state", [False, True], ids=["h0=0", "h0"])
@pytest.mark.parametrize("T", [1, 17, 32, 100, 200])
def test_chunked_matches_recurrent(T, with_state, strong):
    q, k, v, s, g = make_inputs(B, T, H, K, V, M, strong=strong, seed=T)
    h0 = make_state(B, H, K, V, M) if with_state else None
    o_ref, (hk_ref, hv_ref) = gated_slot_recurrent(q, k, v, s, g, SCALE, h0, True)
    for chunk_size in (16, 32, 64):
        o, (hk, hv) = gated_slot_chunked(q, k, v, s, g, SCALE, h0, True, chunk_size=chunk_size)
        assert o.shape == (B, T, H, V) and o.dtype == q.dtype
        assert hk.shape == (B, H, K, M) and hv.shape == (B, H, M, V)
        assert hk.dtype == hv.dtype == torch.float32
        assert max_diff(o, o_ref) < 1e-5, chunk_size
        assert max_diff(hk, hk_ref) < 1e-5, chunk_size
        assert max_diff(hv, hv_ref) < 1e-5, chunk_size


@pytest.mark.parametrize("strong", [False, True], ids=["mild", "strong"])
@pytest.mark.parametrize("with_state", [False, True], ids=["h0=0", "h0"])
def test_matches_fla_naive(with_state, strong):
    naive = pytest.importorskip("fla.ops.gsa.naive").naive_recurrent_gsa
    T = 70
    q, k, v, s, g = make_inputs(B, T, H, K, V, M, strong=strong, seed=3)
    h0 = make_state(B, H, K, V, M) if with_state else None
    o_ref, (hk_ref, hv_ref) = naive(q, k, v, s, g, SCALE, h0, True)
    for o, (hk, hv) in (gated_slot_recurrent(q, k, v, s, g, SCALE, h0, True),
                        gated_slot_chunked(q, k, v, s, g, SCALE, h0, True, chunk_size=16)):
        assert max_diff(o, o_ref) < 1e-5
        assert max_diff(hk, hk_ref) < 1e-5
        assert max_diff(hv, hv_ref) < 1e-5


def _grads(fn, inputs, weights):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    o, (hk, hv) = fn(*xs[:5], SCALE, (xs[5], xs[6]), True)
    w_o, w_hk, w_hv = weights
    ((o * w_o).sum() + (hk * w_hk).sum() + (hv * w_hv).sum()).backward()
    return [x.grad for x in xs]


@pytest.mark.parametrize("strong", [False, True], ids=["mild", "strong"])
@pytest.mark.parametrize("T,chunk_size", [(45, 16), (64, 32)])
def test_gradients_match_recurrent(T, chunk_size, strong):
    inputs = [*make_inputs(B, T, H, K, V, M, strong=strong, seed=7), *make_state(B, H, K, V, M)]
    gen = torch.Generator().manual_seed(11)
    weights = [torch.randn(*shape, generator=gen)
               for shape in ((B, T, H, V), (B, H, K, M), (B, H, M, V))]
    ref = _grads(gated_slot_recurrent, inputs, weights)
    got = _grads(lambda *a: gated_slot_chunked(*a, chunk_size=chunk_size), inputs, weights)
    for name, a, b in zip(["q", "k", "v", "s", "g", "hk0", "hv0"], got, ref):
        assert torch.isfinite(a).all(), name
        assert max_diff(a, b) < 1e-4, name


@pytest.mark.parametrize("segment_tokens", [1, 4 * 48])
def test_segments_hand_on_the_state(monkeypatch, segment_tokens):
    # long sequences run in cache-sized segments with the state handed on; force several: with
    # B*H = 4 and chunks of 16, segments of 1 chunk, or of 3 chunks (48 tokens, the last one short)
    monkeypatch.setattr(gated_slot_module, "_SEGMENT_TOKENS", segment_tokens)
    T = 150
    inputs = [*make_inputs(B, T, H, K, V, M, strong=True, seed=8), *make_state(B, H, K, V, M)]
    gen = torch.Generator().manual_seed(12)
    weights = [torch.randn(*shape, generator=gen)
               for shape in ((B, T, H, V), (B, H, K, M), (B, H, M, V))]
    ref = _grads(gated_slot_recurrent, inputs, weights)
    got = _grads(lambda *a: gated_slot_chunked(*a, chunk_size=16), inputs, weights)
    for name, a, b in zip(["q", "k", "v", "s", "g", "hk0", "hv0"], got, ref):
        assert max_diff(a, b) < 1e-4, name
    o_ref, (hk_ref, hv_ref) = gated_slot_recurrent(*inputs[:5], SCALE, tuple(inputs[5:]), True)
    o, (hk, hv) = gated_slot_chunked(*inputs[:5], SCALE, tuple(inputs[5:]), True, chunk_size=16)
    assert max_diff(o, o_ref) < 1e-5 and max_diff(hk, hk_ref) < 1e-5
    assert max_diff(hv, hv_ref) < 1e-5


def test_very_strong_decay_stays_finite():
    # g of -200 per step would be exp(6400) under the naive factorisation inside a chunk
    q, k, v, s, g = make_inputs(1, 64, H, K, V, M, strong=True, seed=5)
    g = g * 10
    s = 1 - g.exp()
    inputs = [x.clone().requires_grad_() for x in (q, k, v, s, g)]
    o, (hk, hv) = gated_slot_chunked(*inputs, SCALE, None, True)
    o_ref, (hk_ref, hv_ref) = gated_slot_recurrent(q, k, v, s, g, SCALE, None, True)
    assert max_diff(o, o_ref) < 1e-5 and max_diff(hk, hk_ref) < 1e-5
    o.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs)


def test_low_precision_inputs():
    q, k, v, s, g = (x.bfloat16() for x in make_inputs(B, 40, H, K, V, M, seed=2))
    o_ref, (hk_ref, hv_ref) = gated_slot_recurrent(q, k, v, s, g, SCALE, None, True)
    o, (hk, hv) = gated_slot_chunked(q, k, v, s, g, SCALE, None, True)
    assert o.dtype == torch.bfloat16 and hk.dtype == hv.dtype == torch.float32
    assert max_diff(o, o_ref) < 1e-2  # both compute in fp32; only the output cast differs
    assert max_diff(hk, hk_ref) < 1e-5 and max_diff(hv, hv_ref) < 1e-5


def test_dispatch_torch_backend():
    q, k, v, s, g = make_inputs(B, 33, H, K, V, M, seed=4)
    h0 = make_state(B, H, K, V, M)
    o, (hk, hv) = gated_slot_attention(q, k, v, s, g, SCALE, h0, True, backend="torch")
    o_ref, (hk_ref, hv_ref) = gated_slot_chunked(q, k, v, s, g, SCALE, h0, True)
    assert max_diff(o, o_ref) == 0 and max_diff(hk, hk_ref) == 0 and max_diff(hv, hv_ref) == 0
    # one token: the decode step takes the token loop
    o1, st1 = gated_slot_attention(*(x[:, :1] for x in (q, k, v, s, g)), SCALE, h0, True)
    o1_ref, st1_ref = gated_slot_recurrent(*(x[:, :1] for x in (q, k, v, s, g)), SCALE, h0, True)
    assert max_diff(o1, o1_ref) == 0 and max_diff(st1[0], st1_ref[0]) == 0
    out, final = gated_slot_attention(q, k, v, s, g, SCALE)
    assert final is None and out.shape == (B, 33, H, V)


def test_triton_backend_needs_cuda():
    q, k, v, s, g = make_inputs(1, 4, H, K, V, M)
    with pytest.raises(ValueError, match="triton"):
        gated_slot_attention(q, k, v, s, g, SCALE, backend="triton")


def test_cu_seqlens_equals_separate_runs():
    lengths = [5, 40, 1, 0, 23, 64]
    N, T = len(lengths), sum(lengths)
    q, k, v, s, g = make_inputs(1, T, H, K, V, M, strong=True, seed=9)
    hk0, hv0 = make_state(N, H, K, V, M)
    cu = torch.tensor([0] + lengths).cumsum(0)
    o, (hk, hv) = gated_slot_attention(q, k, v, s, g, SCALE, (hk0, hv0), True, cu_seqlens=cu)
    assert o.shape == (1, T, H, V) and hk.shape == (N, H, K, M) and hv.shape == (N, H, M, V)
    for n, (t0, t1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        seg = [x[:, t0:t1] for x in (q, k, v, s, g)]
        h0 = (hk0[n:n + 1], hv0[n:n + 1])
        o_ref, (hk_ref, hv_ref) = gated_slot_recurrent(*seg, SCALE, h0, True)
        assert max_diff(o[:, t0:t1], o_ref) < 1e-5
        assert max_diff(hk[n:n + 1], hk_ref) < 1e-5 and max_diff(hv[n:n + 1], hv_ref) < 1e-5
    # without initial states every document starts from zeros (document 4 spans tokens 46..68)
    o0, final = gated_slot_attention(q, k, v, s, g, SCALE, cu_seqlens=cu)
    seg = [x[:, 46:69] for x in (q, k, v, s, g)]
    assert final is None
    assert max_diff(o0[:, 46:69], gated_slot_recurrent(*seg, SCALE)[0]) < 1e-5


def _bad_cases():
    q, k, v, s, g = make_inputs(2, 6, H, K, V, M)
    hk0, hv0 = make_state(2, H, K, V, M)
    ok = dict(q=q, k=k, v=v, s=s, g=g, scale=SCALE)
    return [
        ("q", dict(ok, q=q[0])),
        ("k", dict(ok, k=k[..., :-1])),
        ("v", dict(ok, v=v[:, :-1])),
        ("s", dict(ok, s=s[:, :, :1])),
        ("g", dict(ok, g=g[..., :-1])),
        ("g", dict(ok, g=g.long())),
        ("scale", dict(ok, scale=None)),
        ("scale", dict(ok, scale=float("nan"))),
        ("initial_state", dict(ok, initial_state=hk0)),
        ("initial_state[0]", dict(ok, initial_state=(hk0[:1], hv0))),
        ("initial_state[1]", dict(ok, initial_state=(hk0, hv0.transpose(-1, -2)))),
        ("cu_seqlens", dict(ok, cu_seqlens=torch.tensor([0, 3, 6]))),  # B == 2
        ("cu_seqlens", dict(ok, **{x: y[:1] for x, y in ok.items() if x != "scale"},
                            cu_seqlens=torch.tensor([0, 3, 5]))),  # does not end at T
        ("cu_seqlens", dict(ok, **{x: y[:1] for x, y in ok.items() if x != "scale"},
                            cu_seqlens=torch.tensor([0.0, 6.0]))),
        ("initial_state[0]", dict(ok, **{x: y[:1] for x, y in ok.items() if x != "scale"},
                                  cu_seqlens=torch.tensor([0, 2, 4, 6]), initial_state=(hk0, hv0))),
    ]


@pytest.mark.parametrize("name,kwargs", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises(name, kwargs):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        gated_slot_attention(**kwargs, backend="torch")


def test_bad_chunk_size_raises():
    q, k, v, s, g = make_inputs(1, 6, H, K, V, M)
    for bad in (0, 24, 2.0):
        with pytest.raises(ValueError, match="chunk_size"):
            gated_slot_chunked(q, k, v, s, g, SCALE, chunk_size=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for fla's Triton kernels")
class TestTritonBackend:
    """fla's chunk_gsa / fused_recurrent_gsa vs the PyTorch path, bf16 inputs."""

    def _check(self, T, with_state=True, cu_lengths=None, strong=False):
        Bq, Hq, Kq, Vq, Mq = (1 if cu_lengths else 2), 4, 64, 64, 32
        N = len(cu_lengths) if cu_lengths else Bq
        xs = make_inputs(Bq, T, Hq, Kq, Vq, Mq, topk=8, strong=strong, seed=T, device="cuda")
        xs = [x.bfloat16() for x in xs]
        h0 = make_state(N, Hq, Kq, Vq, Mq, device="cuda") if with_state else None
        cu = (torch.tensor([0] + cu_lengths).cumsum(0).cuda() if cu_lengths else None)
        scale = Kq ** -0.5
        gen = torch.Generator().manual_seed(0)
        w_o = torch.randn(Bq, T, Hq, Vq, generator=gen).cuda()
        w_hk = torch.randn(N, Hq, Kq, Mq, generator=gen).cuda()
        w_hv = torch.randn(N, Hq, Mq, Vq, generator=gen).cuda()
        results = {}
        for backend in ("triton", "torch"):
            ins = [x.detach().clone().requires_grad_() for x in xs]
            st = None if h0 is None else tuple(x.clone().requires_grad_() for x in h0)
            o, (hk, hv) = gated_slot_attention(*ins, scale, st, True, cu_seqlens=cu,
                                               backend=backend)
            loss = (o.float() * w_o).sum() + (hk * w_hk).sum() + (hv * w_hv).sum()
            loss.backward()
            grads = [x.grad for x in ins] + ([] if st is None else [x.grad for x in st])
            results[backend] = (o, hk, hv, grads)
        o_t, hk_t, hv_t, g_t = results["triton"]
        o_r, hk_r, hv_r, g_r = results["torch"]
        assert o_t.dtype == torch.bfloat16 and o_t.shape == o_r.shape

        def err_ratio(a, b):  # RMS error relative to the RMS of the reference (bf16 tolerance)
            a, b = a.float(), b.float()
            return ((a - b).pow(2).mean().sqrt() / (b.pow(2).mean().sqrt() + 1e-8)).item()

        for name, a, b in (("o", o_t, o_r), ("hk", hk_t, hk_r), ("hv", hv_t, hv_r)):
            assert err_ratio(a, b) < 2e-2, name
        for name, a, b in zip(["dq", "dk", "dv", "ds", "dg", "dhk0", "dhv0"], g_t, g_r):
            assert err_ratio(a, b) < 5e-2, name

    def test_chunk_with_state(self):
        self._check(T=200)

    def test_chunk_strong_decay(self):
        self._check(T=130, strong=True)

    def test_decode_step(self):
        self._check(T=1)

    def test_packed_documents(self):
        self._check(T=150, cu_lengths=[50, 1, 99])
