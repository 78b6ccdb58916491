"""GLA branch: gated linear attention.

Per batch b and head h, with a state S of shape [K, V] (fp32):

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T        (decay, then write)
    o_t = S_t^T (scale * q_t)                   (read after the write)

The log-decay g_t <= 0 comes in two shapes:
  * per head,        g [B, T, H]:    one scalar scales all of S ("simple GLA"; the model uses a
                                     fixed per-head decay, with g = 0 at padded positions);
  * per key channel, g [B, T, H, K]: a vector scales the rows of S, i.e. the K axis
                                     (data-dependent GLA).

Three entry points:
  gla_recurrent           token-by-token loop: the spec's math, the test reference and the
                          T == 1 decode step on CPU.
  gla_chunked             pure PyTorch, parallel inside chunks of C tokens, recurrent across
                          chunks; autograd gives the backward.
  gated_linear_attention  dispatch: flash-linear-attention's Triton kernels on CUDA, the two
                          functions above elsewhere; also handles packed documents (cu_seqlens).

Layout: [B, T, H, D]; KV heads are already repeated by the caller. States: [B, H, K, V] fp32.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .backend import resolve_backend
from .varlen import check_cu_seqlens, per_document

__all__ = ["gla_recurrent", "gla_chunked", "gated_linear_attention"]


# ----------------------------------------------------------------------------------------------
# input checks (shared by all entry points so a bad call fails the same way on every path)

def _check_inputs(q, k, v, g, scale, initial_state, n_states=None):
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, T, H, K], got {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    V = v.shape[-1]
    if tuple(g.shape) not in ((B, T, H), (B, T, H, K)):
        raise ValueError(
            f"g must have shape [B, T, H] = {(B, T, H)} (per-head gate) or [B, T, H, K] = "
            f"{(B, T, H, K)} (per-key gate), got {tuple(g.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    if initial_state is not None:
        N = B if n_states is None else n_states
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (N, H, K, V):
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state)
            raise ValueError(f"initial_state must have shape [N, H, K, V] = {(N, H, K, V)}, got {got}")


# ----------------------------------------------------------------------------------------------
# reference: one token at a time

def gla_recurrent(q, k, v, g, scale, initial_state=None, output_final_state=False):
    """Token loop in fp32. Returns (o [B,T,H,V] in q.dtype, final state [B,H,K,V] fp32 or None)."""
    _check_inputs(q, k, v, g, scale, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    # broadcastable gate: [B,T,H,1,1] scales all of S, [B,T,H,K,1] scales its rows (K axis)
    decay = g.float().exp()
    decay = decay[..., None, None] if g.dim() == 3 else decay[..., None]
    qf, kf, vf = q.float() * scale, k.float(), v.float()

    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for t in range(T):
        S = decay[:, t] * S + kf[:, t, :, :, None] * vf[:, t, :, None, :]  # [B,H,K,V]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], S))           # read after the write
    o = torch.stack(outs, dim=1) if T > 0 else v.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o.to(q.dtype), (S if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# chunked: parallel inside a chunk, recurrent across chunks
#
# Write a_t = exp(g_t) <= 1 for the per-token decay and number the tokens of a chunk 0 .. C-1.
# With S0 the state entering the chunk, unrolling the recurrence gives
#
#     o_i / scale = (q_i * P_i)^T S0                           inter-chunk read
#                 + sum_{j <= i} (q_i . (k_j * D_ji)) v_j      intra-chunk attention
#     S_out = P_{C-1} * S0 + sum_j (k_j * Q_j) v_j^T           state leaving the chunk
#
#     P_i  = a_0 ... a_i            decay from the chunk start through i
#     Q_j  = a_{j+1} ... a_{C-1}    decay from after j to the chunk end (1 for the last token)
#     D_ji = a_{j+1} ... a_i        decay from key j to query i, j <= i (1 when j = i)
#
# Every factor is a product of a's over exactly its own range, so it is <= 1 (no overflow
# however strong the decay) and accurate to ~C ulps. The tempting D_ji = P_i / P_j, which turns
# the intra term into one matmul (q P) @ (k / P)^T, blows up: 1 / P_j overflows fp32 once the
# decay since the chunk start passes e^-88 (g = -20 over five tokens), and well before that
# P_i / P_j loses the digits of D_ji ~ 1 when both are tiny. Strong decays do make products
# underflow (to denormals, then zeros): that is right, since those contributions are far below
# fp32 resolution of the terms beside them, and nothing ever divides by them.
#
# Per-head gates: D is a [C, C] matrix and A = (q k^T) * D^T.
# Per-key gates: D is [C, C, K], too big to build for a whole chunk (C*K floats per token), so
# the chunk is split into ns = C / c sub-chunks of c tokens:
#   * key and query in the same sub-chunk: one offset d = i - j at a time, carrying the decay on
#     the query side, Y_d[i] = q_i a_i ... a_{i-d+1} = Y_{d-1}[i] a_{i-d+1} (one multiply per
#     offset), then A_i,i-d = Y_d[i] . k_{i-d}. About c*K floats per token in all.
#   * key in sub-chunk b, query in a later sub-chunk a: the decay splits in three,
#         D_ji = Q'_j * X_ba * P'_i                              (each factor <= 1)
#     Q'_j: after j to the end of b; X_ba: the whole sub-chunks strictly between; P'_i: from the
#     start of a through i. That block is a small matmul of rescaled queries and keys, done for
#     all pairs at the same sub-chunk distance a - b at once. About (C/c)*K floats per token.


def _tril_index(n, device):
    """[n, n] positions of the entries of an n x n lower-triangular grid stored diagonal by
    diagonal: diagonal d (entries (s + d, s), s = 0 .. n-d-1) starts at d*n - d(d-1)/2. Entries
    above the diagonal point at one extra slot after them all, which callers fill with zeros."""
    r = torch.arange(n, device=device)[:, None]
    s = torch.arange(n, device=device)[None, :]
    d = r - s
    return torch.where(d >= 0, d * n - d * (d - 1) // 2 + s, n * (n + 1) // 2)


def _running_products(a, reverse=False):
    """a [..., n, Kg] -> P_i = a_0 ... a_i along dim -2; with reverse, Q_j = a_{j+1} ... a_{n-1}.
    (A loop of n small multiplies: faster than cumprod along a short middle dim.)"""
    n = a.shape[-2]
    if not reverse:
        out = [a[..., :1, :]]
        for i in range(1, n):
            out.append(out[-1] * a[..., i:i + 1, :])
        return torch.cat(out, dim=-2)
    out = [torch.ones_like(a[..., :1, :])]
    for j in range(n - 2, -1, -1):
        out.append(out[-1] * a[..., j + 1:j + 2, :])
    return torch.cat(out[::-1], dim=-2)


def _intra_scalar(q, k, a):
    """Per-head decays. q, k [..., C, K], a [..., C, 1]. Returns the causal
    scores A [..., C, C], q_i P_i and k_j Q_j [..., C, K], and the chunk's decay P_C [..., 1]."""
    C = q.shape[-2]
    after = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)       # [j, i]: i > j
    # row j: cumprod over i of the decays strictly after j -> D_ji (1 for i <= j, masked below)
    D = torch.where(after, a[..., None, :, 0], 1.0).cumprod(-1)                # [..., C(j), C(i)]
    A = ((q @ k.transpose(-1, -2)) * D.transpose(-1, -2)).tril()
    P = a.cumprod(-2)                                                          # [..., C, 1]
    Q = D[..., :, -1:]                                                         # D_{j, C-1} = Q_j
    return A, q * P, k * Q, P[..., -1, :]


def _intra_vector(q, k, a, c):
    """Per-key decays. q, k, a [..., C, K], c: sub-chunk length dividing C.
    Returns the causal scores A [..., C, C], q_i P_i and k_j Q_j [..., C, K], and P_C [..., K]."""
    *lead, C, K = q.shape
    ns = C // c
    qs, ks, a = (x.reshape(-1, ns, c, K) for x in (q, k, a))          # [L, ns, c, K]
    L = qs.shape[0]

    # same sub-chunk, offset d = i - j: query i sees key j through a_{j+1} ... a_i. Carry the
    # decay on the query side, one factor more per offset:
    #     Y_d[i] = q_i * a_i a_{i-1} ... a_{i-d+1} = Y_{d-1}[i] * a_{i-d+1}
    band = [(qs * ks).sum(-1)]                                        # d = 0   [L, ns, c]
    Y = qs
    for d in range(1, c):
        Y = Y[..., 1:, :] * a[..., 1:c - d + 1, :]                    # i = d .. c-1  [L, ns, c-d, K]
        band.append((Y * ks[..., :c - d, :]).sum(-1))                 # entry j = i - d
    band = torch.cat(band + [torch.zeros_like(band[0][..., :1])], dim=-1)
    A_diag = band[..., _tril_index(c, q.device).flatten()].reshape(L, ns, c, c)   # [L, ns, c(i), c(j)]

    # key sub-chunk b, query sub-chunk a = b + dist
    P_sub = _running_products(a)                        # P'_i = a_0 ... a_i       [L, ns, c, K]
    Q_sub = _running_products(a, reverse=True)          # Q'_j = a_{j+1} ... a_{c-1}
    qP_sub, kQ_sub = qs * P_sub, ks * Q_sub
    # sub-chunk axis first, so that the slices below stay contiguous and the matmuls copy nothing
    q_r = qP_sub.transpose(0, 1).contiguous()           # [ns, L, c, K]
    k_r = kQ_sub.transpose(0, 1).contiguous()
    tot = P_sub[..., -1, :].transpose(0, 1)             # decay of each whole sub-chunk [ns, L, K]
    blocks = [A_diag.transpose(0, 1)]                   # dist = 0
    X = None                                            # X[b] = tot_{b+1} ... tot_{b+dist-1}
    for dist in range(1, ns):
        k_b = k_r[:ns - dist]
        if dist >= 2:
            t = tot[dist - 1:ns - 1]
            X = t if X is None else X[:ns - dist] * t
            k_b = k_b * X[..., None, :]
        blocks.append(q_r[dist:] @ k_b.transpose(-1, -2))              # [ns-dist, L, c(i), c(j)]
    blocks.append(torch.zeros_like(blocks[-1][:1]))
    # one gather puts every block in place: A[(a, i), (b, j)] = block(a, b)[i, j]
    flat = torch.cat(blocks, dim=0).permute(1, 0, 2, 3).reshape(L, -1)    # [L, n_blocks * c * c]
    ij = torch.arange(c * c, device=q.device).reshape(c, c)
    pos = _tril_index(ns, q.device)[:, None, :, None] * (c * c) + ij[None, :, None, :]  # [a, i, b, j]
    A = flat[:, pos.flatten()].reshape(*lead, C, C)

    # over the whole chunk: multiply in the sub-chunks before a / after b
    tot = tot.transpose(0, 1)                                         # [L, ns, K]
    before = torch.cat([torch.ones_like(tot[..., :1, :]), tot[..., :-1, :]], dim=-2)
    before = _running_products(before)                                # prod_{m < a}
    after = _running_products(tot, reverse=True)                      # prod_{m > b}
    qP = (qP_sub * before[..., None, :]).reshape(*lead, C, K)
    kQ = (kQ_sub * after[..., None, :]).reshape(*lead, C, K)
    return A, qP, kQ, (before[..., -1, :] * tot[..., -1, :]).reshape(*lead, K)


def gla_chunked(q, k, v, g, scale, initial_state=None, output_final_state=False, chunk_size=64,
                sub_chunk=8):
    """Chunk-parallel GLA in fp32. Same inputs and outputs as gla_recurrent.

    chunk_size: tokens per chunk (any positive int; T is padded up to a multiple).
    sub_chunk (per-key gates only; c = gcd(chunk_size, sub_chunk) is used): pairs inside a
    sub-chunk go offset by offset (elementwise, ~c*K floats per token), pairs across sub-chunks
    through small matmuls (~(C/c)*K floats per token); c ~ sqrt(C) balances the two."""
    _check_inputs(q, k, v, g, scale, initial_state)
    for name, val in (("chunk_size", chunk_size), ("sub_chunk", sub_chunk)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    out_dtype = q.dtype
    scalar_gate = g.dim() == 3
    if T == 0:
        return gla_recurrent(q, k, v, g, scale, initial_state, output_final_state)

    N = -(-T // C)          # number of chunks
    pad = N * C - T         # padded tokens have k = v = 0 and g = 0: they change nothing

    def chunks(x):          # [B, T, H, D] -> [B, H, N, C, D] fp32, contiguous for the matmuls
        x = x.transpose(1, 2)
        # one copy: F.pad returns a contiguous tensor, but keeps the strides when it pads nothing
        x = F.pad(x.float(), (0, 0, 0, pad)) if pad else x.contiguous().float()
        return x.reshape(B, H, N, C, x.shape[-1])

    gk = g[..., None] if scalar_gate else g          # [B, T, H, Kg], Kg = 1 or K
    q, k, v, gk = map(chunks, (q, k, v, gk))         # [B, H, N, C, *]
    a = gk.exp()                                     # [B, H, N, C, Kg] per-token decay <= 1

    # 1) intra-chunk attention, and queries / keys rescaled by the decay profiles, all chunks at once
    if scalar_gate:
        A, qP, kQ, decay_C = _intra_scalar(q, k, a)  # [B,H,N,C,C], [B,H,N,C,K] x2, [B,H,N,1]
    else:
        A, qP, kQ, decay_C = _intra_vector(q, k, a, math.gcd(C, sub_chunk))   # ..., [B,H,N,K]
    o = A @ v                                        # [B, H, N, C, V]

    # 2) what each chunk writes into the state: keys decayed to the chunk end
    U = kQ.transpose(-1, -2) @ v                     # [B, H, N, K, V]
    chunk_decay = decay_C[..., None]                 # [B, H, N, Kg, 1]  P_C

    # 3) the only sequential part: carry the state across chunks (N cheap steps)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    S_in = []
    for n in range(N):
        S_in.append(S)                               # state entering chunk n
        S = torch.addcmul(U[:, :, n], chunk_decay[:, :, n], S)   # P_C * S + U
    S_in = torch.stack(S_in, dim=2)                  # [B, H, N, K, V]

    # 4) inter-chunk read: each query sees the entering state decayed to its position; the
    #    query scale is applied here once, to both terms (one fused op: scale*o + scale*qP@S_in)
    o = torch.baddbmm(o.reshape(-1, C, V), qP.reshape(-1, C, K), S_in.reshape(-1, K, V),
                      beta=scale, alpha=scale)       # [B*H*N, C, V]

    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)   # [B, T, H, V]
    return o.to(out_dtype), (S if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# dispatch

def _torch_gla(q, k, v, g, scale, initial_state, output_final_state):
    # a single step (decode) is cheapest as one recurrence step; longer inputs go chunked
    if q.shape[1] <= 1:
        return gla_recurrent(q, k, v, g, scale, initial_state, output_final_state)
    return gla_chunked(q, k, v, g, scale, initial_state, output_final_state)


def _triton_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    # imported lazily: fla pulls in Triton, which CPU-only installs need not load
    T = q.shape[1]
    # fla keeps states in fp32 (chunk_gla asserts it); gates are cumulated in fp32 anyway
    h0 = None if initial_state is None else initial_state.float()
    g = g.float()
    kw = dict(scale=scale, initial_state=h0, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if g.dim() == 3:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
        fn = fused_recurrent_simple_gla if T == 1 else chunk_simple_gla
        o, ht = fn(q, k, v, g=g, **kw)
    else:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        if T == 1:
            o, ht = fused_recurrent_gla(q, k, v, gk=g, **kw)
        else:
            o, ht = chunk_gla(q, k, v, g=g, **kw)
    return o, (ht.float() if ht is not None else None)


def gated_linear_attention(q, k, v, g, scale, initial_state=None, output_final_state=False,
                           cu_seqlens=None, backend=None):
    """Gated linear attention, dispatched to Triton (CUDA) or PyTorch.

    q, k [B,T,H,K]; v [B,T,H,V]; g log-decay [B,T,H] (per head) or [B,T,H,K] (per key channel).
    initial_state [N,H,K,V] with N = B, or N = number of documents when cu_seqlens [N+1] packs
    N documents into a batch of one (each starts from its own state and ends in its own).
    Returns (o [B,T,H,V] in q.dtype, final state [N,H,K,V] fp32 or None).
    """
    n_states = None
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q.shape[0])
        n_states = cu_seqlens.numel() - 1
    _check_inputs(q, k, v, g, scale, initial_state, n_states)
    backend = resolve_backend(q, backend)

    if backend == "triton":
        return _triton_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)

    if cu_seqlens is None:
        return _torch_gla(q, k, v, g, scale, initial_state, output_final_state)

    return per_document(lambda q, k, v, g, h0, final: _torch_gla(q, k, v, g, scale, h0, final),
                        (q, k, v, g), cu_seqlens, initial_state, output_final_state)
