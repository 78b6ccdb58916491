"""Tests for the GLA branch op (quasar_model/ops/gla.py).

CPU tests compare the chunked PyTorch path against the token-loop recurrence (the spec's math) and
against flash-linear-attention's naive recurrences, for both gate shapes: a fixed per-head decay
[B, T, H] (the model's rule) and a data-dependent per-key decay [B, T, H, K]. The CUDA class
compares fla's Triton kernels against the PyTorch path and is skipped without a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

from quasar_model.ops.gla import gated_linear_attention, gla_chunked, gla_recurrent

B, H, K, V = 2, 4, 32, 16  # K != V so a transposed state would not go unnoticed
N_LAYERS = 12
GATES = ["head_l1", "head_l6", "key", "key_strong"]


def head_gate(layer, n_layers=N_LAYERS, b=B, T=1, h=H, pad=0):
    """The model's fixed per-head log-decay, broadcast over time; 0 at the last `pad` positions of
    the last batch row (padding)."""
    frac = 1.0 - max(layer - 1, 0) / (n_layers - 1) + 1e-5
    rate = -(2.0 ** (-0.5 * (torch.arange(h) + 1.0))) * frac            # [H]
    g = rate.expand(b, T, h).clone()
    if pad:
        g[-1, T - pad:] = 0.0
    return g


def make_inputs(T, gate="key", b=B, h=H, dk=K, dv=V, device="cpu", dtype=torch.float32,
                with_h0=True, seed=0):
    """Realistic inputs: q and k RMS-normalised per head (the caller does it), scale K**-0.5."""
    gen = torch.Generator().manual_seed(seed)
    q = F.rms_norm(torch.randn(b, T, h, dk, generator=gen), (dk,))
    k = F.rms_norm(torch.randn(b, T, h, dk, generator=gen), (dk,))
    v = torch.randn(b, T, h, dv, generator=gen)
    if gate.startswith("head"):
        g = head_gate(int(gate.split("_l")[1]), b=b, T=T, h=h, pad=min(3, T // 4))
    elif gate == "key":      # data-dependent GLA: logsigmoid(x) / 16
        g = F.logsigmoid(torch.randn(b, T, h, dk, generator=gen)) / 16
    elif gate == "key_strong":  # strong decays, down to -20 per token
        g = -20.0 * torch.rand(b, T, h, dk, generator=gen) ** 2
    else:
        raise AssertionError(gate)
    h0 = torch.randn(b, h, dk, dv, generator=gen) * 0.5 if with_h0 else None
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    g = g.to(device)                      # gates stay fp32, as the model computes them
    h0 = None if h0 is None else h0.to(device)  # states are fp32
    return q, k, v, g, h0


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", [1, 17, 64, 100, 200])
def test_chunked_matches_recurrent(T, gate, with_h0):
    q, k, v, g, h0 = make_inputs(T, gate, with_h0=with_h0)
    o_ref, s_ref = gla_recurrent(q, k, v, g, K**-0.5, h0, output_final_state=True)
    assert o_ref.shape == (B, T, H, V) and s_ref.shape == (B, H, K, V)
    for chunk_size in (16, 32, 64):
        o, s = gla_chunked(q, k, v, g, K**-0.5, h0, output_final_state=True, chunk_size=chunk_size)
        assert o.shape == (B, T, H, V) and s.shape == (B, H, K, V)
        assert max_diff(o, o_ref) < 1e-5, chunk_size
        assert max_diff(s, s_ref) < 1e-5, chunk_size


@pytest.mark.parametrize("sub_chunk", [1, 3, 4, 16])
def test_chunked_sub_chunks_and_odd_chunk(sub_chunk):
    # per-key gates: any sub-chunk split (gcd with the chunk) and a chunk that is no power of two
    q, k, v, g, h0 = make_inputs(90, "key_strong")
    o_ref, s_ref = gla_recurrent(q, k, v, g, K**-0.5, h0, output_final_state=True)
    for chunk_size in (8, 24, 64):   # 8: a single sub-chunk per chunk
        o, s = gla_chunked(q, k, v, g, K**-0.5, h0, True, chunk_size=chunk_size, sub_chunk=sub_chunk)
        assert max_diff(o, o_ref) < 1e-5 and max_diff(s, s_ref) < 1e-5


def test_last_layer_gate_is_nearly_a_running_sum():
    # last layer: g ~ -1e-5, so the state is almost a plain running sum and outputs grow ~ sqrt(T).
    # Any fp32 summation order then differs by ~ |o| * eps * sqrt(T): compare relative to size.
    q, k, v, _, h0 = make_inputs(200, "key")
    g = head_gate(N_LAYERS, T=200)
    o_ref, s_ref = gla_recurrent(q, k, v, g, K**-0.5, h0, output_final_state=True)
    o, s = gla_chunked(q, k, v, g, K**-0.5, h0, output_final_state=True)
    assert max_diff(o, o_ref) < 1e-6 * o_ref.abs().max().item() * 10
    assert max_diff(s, s_ref) < 1e-6 * s_ref.abs().max().item() * 10


def test_extreme_decay_stays_finite():
    # gates far below anything a model produces: nothing may overflow, results still match
    q, k, v, _, h0 = make_inputs(130, "key")
    g = -200.0 * torch.rand(B, 130, H, K)
    g[:, ::7] = 0.0                          # and some no-decay tokens in between
    o_ref, s_ref = gla_recurrent(q, k, v, g, K**-0.5, h0, output_final_state=True)
    o, s = gla_chunked(q, k, v, g, K**-0.5, h0, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert max_diff(o, o_ref) < 1e-5 and max_diff(s, s_ref) < 1e-5


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("T", [17, 100])
def test_matches_fla_naive_simple_gla(T, with_h0):
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    q, k, v, g, h0 = make_inputs(T, "head_l1", with_h0=with_h0)
    # same [B, T, H, D] layout; it multiplies q by the scale it is given
    o_fla, s_fla = naive_recurrent_simple_gla(q, k, v, g, scale=K**-0.5, initial_state=h0,
                                              output_final_state=True)
    for fn in (gla_recurrent, gla_chunked):
        o, s = fn(q, k, v, g, K**-0.5, h0, output_final_state=True)
        assert max_diff(o, o_fla) < 1e-5, fn.__name__
        assert max_diff(s, s_fla) < 1e-5, fn.__name__


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("gate", ["key", "key_strong"])
@pytest.mark.parametrize("T", [17, 100])
def test_matches_fla_naive_gla(T, gate, with_h0):
    from fla.ops.gla.naive import naive_recurrent_gla

    q, k, v, g, h0 = make_inputs(T, gate, with_h0=with_h0)
    # same [B, T, H, D] layout; it takes no scale argument and always uses K ** -0.5
    o_fla, s_fla = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    for fn in (gla_recurrent, gla_chunked):
        o, s = fn(q, k, v, g, K**-0.5, h0, output_final_state=True)
        assert max_diff(o, o_fla) < 1e-5, fn.__name__
        assert max_diff(s, s_fla) < 1e-5, fn.__name__


def test_final_state_only_when_asked_and_dtypes():
    for gate in ("head_l1", "key"):
        q, k, v, g, h0 = make_inputs(20, gate, dtype=torch.bfloat16)
        for fn in (gla_recurrent, gla_chunked, gated_linear_attention):
            o, s = fn(q, k, v, g, K**-0.5, h0)
            assert s is None
            o, s = fn(q, k, v, g, K**-0.5, h0, output_final_state=True)
            assert o.dtype == torch.bfloat16 and s.dtype == torch.float32, fn.__name__


def test_dispatch_torch_backend():
    # T == 1 goes through the token loop, T > 1 through the chunked path; both agree with the loop
    for gate in ("head_l6", "key"):
        for T in (1, 70):
            q, k, v, g, h0 = make_inputs(T, gate)
            o_ref, s_ref = gla_recurrent(q, k, v, g, K**-0.5, h0, output_final_state=True)
            o, s = gated_linear_attention(q, k, v, g, K**-0.5, h0, True, backend="torch")
            assert max_diff(o, o_ref) < 1e-5 and max_diff(s, s_ref) < 1e-5


def test_decode_steps_continue_the_prefill():
    # prefill chunked, then decode token by token from its final state == one long recurrence
    q, k, v, g, h0 = make_inputs(40, "key")
    o_ref, s_ref = gla_recurrent(q, k, v, g, K**-0.5, h0, output_final_state=True)
    o, s = gated_linear_attention(q[:, :33], k[:, :33], v[:, :33], g[:, :33], K**-0.5, h0, True)
    outs = [o]
    for t in range(33, 40):
        o_t, s = gated_linear_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                        g[:, t:t + 1], K**-0.5, s, True)
        outs.append(o_t)
    assert max_diff(torch.cat(outs, 1), o_ref) < 1e-5 and max_diff(s, s_ref) < 1e-5


# ----------------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", [1, 45, 100])
def test_gradients_chunked_match_recurrent(T, gate):
    q, k, v, g, h0 = make_inputs(T, gate)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen)
    dh = torch.randn(B, H, K, V, generator=gen)

    def grads(fn, **kw):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
        o, s = fn(*leaves[:4], K**-0.5, leaves[4], output_final_state=True, **kw)
        ((o * do).sum() + (s * dh).sum()).backward()
        return [x.grad for x in leaves]

    ref = grads(gla_recurrent)
    got = grads(gla_chunked, chunk_size=32)
    for name, a, b in zip(("q", "k", "v", "g", "initial_state"), got, ref):
        assert torch.isfinite(a).all(), name
        assert max_diff(a, b) < 1e-4, name


# ----------------------------------------------------------------------------------------------
# packed documents


@pytest.mark.parametrize("gate", ["head_l1", "key"])
def test_cu_seqlens_equals_separate_runs(gate):
    lengths = [5, 1, 0, 70, 33]
    T = sum(lengths)
    q, k, v, g, _ = make_inputs(T, gate, b=1)
    h0 = torch.randn(len(lengths), H, K, V) * 0.5
    cu = torch.tensor([0] + lengths).cumsum(0)
    o, s = gated_linear_attention(q, k, v, g, K**-0.5, h0, True, cu_seqlens=cu, backend="torch")
    assert o.shape == (1, T, H, V) and s.shape == (len(lengths), H, K, V)
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, s_i = gla_recurrent(q[:, start:end], k[:, start:end], v[:, start:end],
                                 g[:, start:end], K**-0.5, h0[i:i + 1], output_final_state=True)
        assert max_diff(o[:, start:end], o_i) < 1e-5 if end > start else True
        assert max_diff(s[i:i + 1], s_i) < 1e-5
    # without initial states every document starts from zero
    o0, s0 = gated_linear_attention(q, k, v, g, K**-0.5, None, True, cu_seqlens=cu, backend="torch")
    o_1, _ = gla_recurrent(q[:, 6:76], k[:, 6:76], v[:, 6:76], g[:, 6:76], K**-0.5)
    assert max_diff(o0[:, 6:76], o_1) < 1e-5


# ----------------------------------------------------------------------------------------------
# input checks


def _bad_calls():
    q, k, v, g, h0 = make_inputs(8, "key")
    s = K**-0.5
    cu = torch.tensor([0, 3, 8])
    return [
        ("q", lambda: gated_linear_attention(q[0], k, v, g, s)),
        ("k", lambda: gated_linear_attention(q, k[..., :-1], v, g, s)),
        ("v", lambda: gated_linear_attention(q, k, v[:, :-1], g, s)),
        ("g", lambda: gated_linear_attention(q, k, v, g[..., :-1], s)),
        ("g", lambda: gated_linear_attention(q, k, v, g[..., 0, :], s)),
        ("scale", lambda: gated_linear_attention(q, k, v, g, "0.1")),
        ("initial_state", lambda: gated_linear_attention(q, k, v, g, s, h0[:, :, :, :-1])),
        ("initial_state", lambda: gla_recurrent(q, k, v, g, s, h0[:1])),
        ("cu_seqlens", lambda: gated_linear_attention(q, k, v, g, s, cu_seqlens=cu)),  # B == 2
        ("cu_seqlens", lambda: gated_linear_attention(q[:1], k[:1], v[:1], g[:1], s,
                                                      cu_seqlens=cu.float())),
        ("cu_seqlens", lambda: gated_linear_attention(q[:1], k[:1], v[:1], g[:1], s,
                                                      cu_seqlens=torch.tensor([0, 3, 7]))),
        ("initial_state", lambda: gated_linear_attention(q[:1], k[:1], v[:1], g[:1], s, h0[:1],
                                                         cu_seqlens=cu)),  # needs 2 states
        ("chunk_size", lambda: gla_chunked(q, k, v, g, s, chunk_size=0)),
        ("backend", lambda: gated_linear_attention(q, k, v, g, s, backend="cuda")),
        ("triton", lambda: gated_linear_attention(q, k, v, g, s, backend="triton")),  # CPU tensors
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_value_error_naming_it(i):
    name, call = _bad_calls()[i]
    with pytest.raises(ValueError, match=name):
        call()


# ----------------------------------------------------------------------------------------------
# CUDA: fla's Triton kernels vs the PyTorch path


def err_ratio(a, b):
    """RMS error relative to the RMS of the reference (as fla's own tests measure bf16 kernels)."""
    a, b = a.float(), b.float()
    return ((a - b).square().mean().sqrt() / b.square().mean().sqrt().clamp_min(1e-8)).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestTritonMatchesTorch:
    @pytest.mark.parametrize("gate", ["head_l1", "key"])
    @pytest.mark.parametrize("T", [1, 100, 300])
    def test_forward_backward_bf16(self, T, gate):
        dk = dv = 64
        q, k, v, g, h0 = make_inputs(T, gate, dk=dk, dv=dv, device="cuda", dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(1)
        do = torch.randn(B, T, H, dv, generator=gen).cuda()
        dh = torch.randn(B, H, dk, dv, generator=gen).cuda()

        def run(backend):
            leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
            o, s = gated_linear_attention(*leaves[:4], dk**-0.5, leaves[4], True, backend=backend)
            ((o.float() * do).sum() + (s * dh).sum()).backward()
            return [o, s] + [x.grad for x in leaves]

        ref = run("torch")   # fp32 math on the same bf16 inputs
        got = run("triton")
        names = ("o", "final_state", "dq", "dk", "dv", "dg", "dh0")
        for name, a, b in zip(names, got, ref):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert torch.isfinite(a.float()).all(), name
            assert err_ratio(a, b) < 2e-2, name   # bf16 storage, fp32 accumulation

    @pytest.mark.parametrize("gate", ["head_l1", "key"])
    def test_cu_seqlens(self, gate):
        lengths = [7, 64, 129]
        q, k, v, g, _ = make_inputs(sum(lengths), gate, b=1, dk=64, dv=64, device="cuda",
                                    dtype=torch.bfloat16)
        h0 = torch.randn(len(lengths), H, 64, 64, device="cuda") * 0.5
        cu = torch.tensor([0] + lengths, device="cuda").cumsum(0)
        o_t, s_t = gated_linear_attention(q, k, v, g, 0.125, h0, True, cu_seqlens=cu, backend="torch")
        o_x, s_x = gated_linear_attention(q, k, v, g, 0.125, h0, True, cu_seqlens=cu, backend="triton")
        assert s_x.shape == (len(lengths), H, 64, 64)
        assert err_ratio(o_x, o_t) < 2e-2 and err_ratio(s_x, s_t) < 2e-2
