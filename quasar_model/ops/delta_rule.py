"""Quasar branch: the delta rule with a per-token, per-head step size beta.

Per batch element and head, with a state S in R^{K x V} (starting at `initial_state` or 0):

    S_t = S_{t-1} + beta_t * k_t (v_t - S_{t-1}^T k_t)^T       # one step of online least squares
    o_t = S_t^T (scale * q_t)                                  # read out AFTER the update at t

Three entry points:
  delta_rule_recurrent  the token loop above, fp32. Reference for tests; fast path for T == 1 decoding.
  delta_rule_chunked    pure PyTorch, parallel inside chunks (WY / UT transform), recurrent across them.
  delta_rule            dispatch: flash-linear-attention's Triton kernels on CUDA, else the two above.

Layout: q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; states [B, H, K, V] (fp32).

The chunked form. Inside a chunk of C tokens, write u_i = beta_i (v_i - S_{i-1}^T k_i) for the
"new value" that token i writes. Unrolling S_{i-1} = S_0 + sum_{j<i} k_j u_j^T gives

    u_i + sum_{j<i} beta_i (k_i . k_j) u_j = beta_i v_i - beta_i S_0^T k_i

i.e. A u = diag(beta) V - diag(beta) K S_0 with A = I + strict_tril(diag(beta) K K^T), unit lower
triangular. So with W = A^-1 diag(beta) K and U = A^-1 diag(beta) V (both independent of S_0, hence
computable for every chunk at once):

    u   = U - W S_0                                  # [C, V]  the values actually written
    o   = scale Q S_0 + tril(scale Q K^T) u          # tril includes the diagonal: read after write
    S_C = S_0 + K^T u

Only `u` and `S_C` need the previous chunk's state, so they are all that is left inside the Python
loop over chunks; the read-out `o` is done for all chunks at once afterwards.

Optional state decay (the gated delta rule): with a log-decay g_t <= 0 per token and head
([B, T, H]), the state is decayed before each write, S <- exp(g_t) S, then updated as above.
Inside a chunk let G_i = g_1 + ... + g_i (cumulative, non-increasing) and D_ij = exp(G_i - G_j)
for j <= i (0 above the diagonal; the difference is <= 0, so the exp never overflows). Then

    A = I + strict_tril(diag(beta) (K K^T * D)),  W = A^-1 diag(beta exp(G)) K,  U = A^-1 diag(beta) V
    u   = U - W S_0
    o   = scale (Q * exp(G)) S_0 + (tril(scale Q K^T) * D) u
    S_C = exp(G_C) S_0 + (K * exp(G_C - G))^T u

g = 0 everywhere gives back the ungated formulas.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import resolve_backend
from .varlen import check_cu_seqlens, per_document

__all__ = ["delta_rule", "delta_rule_chunked", "delta_rule_recurrent"]


# ----------------------------------------------------------------------------------------------
# input checks


def _check_inputs(q, k, v, beta, initial_state, cu_seqlens=None, g=None):
    """Shape checks shared by all entry points; raises ValueError naming the offending argument."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"k must have the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] with [B, T, H] = {(B, T, H)}, got {tuple(v.shape)}")
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"beta must be [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")
    if g is not None and tuple(g.shape) != (B, T, H):
        raise ValueError(f"g must be [B, T, H] = {(B, T, H)}, got {tuple(g.shape)}")
    V = v.shape[-1]
    N = B
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B)
        N = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        what = "N = len(cu_seqlens) - 1" if cu_seqlens is not None else "N = B"
        raise ValueError(
            f"initial_state must be [N, H, K, V] = {(N, H, K, V)} ({what}), got {tuple(initial_state.shape)}"
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # at least fp32: a bf16 state accumulated over thousands of tokens drifts.
    # fp64 inputs stay fp64 so torch.autograd.gradcheck can be used on the ops.
    return torch.promote_types(x.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------
# reference: token-by-token recurrence


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    *,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The spec's recurrence, one token at a time, in fp32.

    g: optional log-decay [B, T, H] (<= 0); the state is multiplied by exp(g_t) before write t.
    Returns o [B, T, H, V] in q.dtype and the final state [B, H, K, V] in fp32 (or None).
    """
    _check_inputs(q, k, v, beta, initial_state, g=g)
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dt = q.dtype, _compute_dtype(q)
    q, k, v, beta = (x.to(dt) for x in (q, k, v, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)  # [B, H, K, V]

    # unbind rather than q[:, t]: its backward stacks the T grads once instead of scattering each
    # into a fresh full-size zero tensor (which makes the backward O(T^2))
    qs = (q * scale).unsqueeze(-2).unbind(1)  # T x [B, H, 1, K]
    ks = k.unsqueeze(-2).unbind(1)  # T x [B, H, 1, K]
    vs = v.unsqueeze(-2).unbind(1)  # T x [B, H, 1, V]
    bs = beta[..., None, None].unbind(1)  # T x [B, H, 1, 1]
    decays = (None,) * T if g is None else g.to(dt).exp()[..., None, None].unbind(1)  # T x [B, H, 1, 1]
    outs = []
    for q_t, k_t, v_t, b_t, a_t in zip(qs, ks, vs, bs, decays):
        if a_t is not None:
            S = S * a_t  # decay the memory before the write
        # the memory's current prediction for k_t, and a step of size beta towards the target v_t
        u_t = b_t * (v_t - k_t @ S)  # [B, H, 1, V]
        S = S + k_t.transpose(-1, -2) @ u_t  # rank-1 write, [B, H, K, V]
        outs.append((q_t @ S).squeeze(-2))  # read after the write, [B, H, V]

    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V)  # [B, T, H, V]
    return o.to(out_dtype), (S if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# chunked: parallel inside a chunk, recurrent across chunks


def _to_chunks(x: torch.Tensor, C: int, dt: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [N, B*H, C, D] (zero-padded at the end of time); chunk-major so that the
    per-chunk slices used in the loop are contiguous [B*H, C, D] batches for bmm."""
    B, T, H, D = x.shape
    N = -(-T // C)
    x = F.pad(x.to(dt), (0, 0, 0, 0, 0, N * C - T))  # [B, N*C, H, D]
    return x.reshape(B, N, C, H, D).permute(1, 0, 3, 2, 4).reshape(N, B * H, C, D)


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    *,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same result as `delta_rule_recurrent`, computed chunk by chunk (see the module docstring).

    Pure PyTorch, fp32 inside, differentiable by autograd w.r.t. q, k, v, beta and initial_state.
    T need not be a multiple of chunk_size: the tail is padded with k = v = 0, beta = 0, which
    leaves the state untouched, and the padded outputs are cut off.
    g: optional log-decay [B, T, H] (<= 0), the gated delta rule (padded with g = 0: no decay).
    """
    _check_inputs(q, k, v, beta, initial_state, g=g)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dt = q.dtype, _compute_dtype(q)
    C = chunk_size
    N = -(-T // C)
    if N == 0:  # empty sequence: nothing to read, the state passes through
        S = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
        return q.new_zeros(B, 0, H, V, dtype=out_dtype), (S if output_final_state else None)

    q = _to_chunks(q, C, dt) * scale  # [N, BH, C, K]
    k = _to_chunks(k, C, dt)  # [N, BH, C, K]
    v = _to_chunks(v, C, dt)  # [N, BH, C, V]
    beta = _to_chunks(beta.unsqueeze(-1), C, dt)  # [N, BH, C, 1]

    # --- intra-chunk work, all chunks at once -------------------------------------------------
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    strict_lower, lower = ones.tril(-1), ones.tril(0)

    if g is not None:
        # cumulative log-decay inside each chunk, [N, BH, C, 1]; D_ij = exp(G_i - G_j) for j <= i,
        # masked to -inf above the diagonal BEFORE the exp so only non-positive exponents are taken
        G = _to_chunks(g.unsqueeze(-1), C, dt).cumsum(-2)
        D = (G - G.transpose(-1, -2)).masked_fill(~lower, float("-inf")).exp()  # [N, BH, C, C]
        G_last = G[..., -1:, :]  # [N, BH, 1, 1], total decay of the chunk (padding has g = 0)

    k_beta = k * beta  # diag(beta) K, [N, BH, C, K]
    # A = I + strict_tril(diag(beta) K K^T): how earlier writes in the chunk change later targets.
    # The I is not materialised: unitriangular=True below makes the solver assume the unit diagonal
    # (and never read what is stored there).
    A = k_beta @ k.transpose(-1, -2)
    if g is not None:
        A = A * D
    A = A.masked_fill(~strict_lower, 0)  # [N, BH, C, C]
    # one triangular solve for both right-hand sides: [W | U] = A^-1 [diag(beta) K | diag(beta) V]
    # (gated: the S_0 term of target i is decayed by exp(G_i), so W's right-hand side is too)
    k_rhs = k_beta if g is None else k_beta * G.exp()
    WU = torch.linalg.solve_triangular(A, torch.cat([k_rhs, v * beta], dim=-1), upper=False, unitriangular=True)
    W, U = WU.split([K, V], dim=-1)  # [N, BH, C, K], [N, BH, C, V]
    # causal scores inside the chunk; the diagonal is kept because o_t reads the state after write t
    attn = q @ k.transpose(-1, -2)
    attn = attn.masked_fill(~lower, 0) if g is None else attn * D  # D is already 0 above the diagonal

    # --- inter-chunk recurrence: the only Python loop ------------------------------------------
    S = q.new_zeros(B * H, K, V) if initial_state is None else initial_state.to(dt).reshape(B * H, K, V)
    if g is None:
        k_t = k.transpose(-1, -2)  # [N, BH, K, C]
    else:  # each write decays from its own position to the end of the chunk: exp(G_C - G_j) <= 1
        k_t = (k * (G_last - G).exp()).transpose(-1, -2)
        chunk_decay = G_last.exp()  # [N, BH, 1, 1]
    states, news = [], []
    for n in range(N):
        states.append(S)  # state entering chunk n, [BH, K, V]
        u = torch.baddbmm(U[n], W[n], S, alpha=-1)  # u = U - W S, [BH, C, V]
        if g is not None:
            S = S * chunk_decay[n]
        S = torch.baddbmm(S, k_t[n], u)  # S + K^T u, [BH, K, V]
        news.append(u)
    S0 = torch.stack(states)  # [N, BH, K, V]
    u = torch.stack(news)  # [N, BH, C, V]

    # --- read-out, all chunks at once: contribution of the past chunks + causal intra-chunk part
    q_in = q if g is None else q * G.exp()  # the entering state has decayed by exp(G_i) at token i
    o = q_in @ S0 + attn @ u  # [N, BH, C, V]
    o = o.reshape(N, B, H, C, V).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T]  # [B, T, H, V]
    final_state = S.reshape(B, H, K, V) if output_final_state else None
    return o.to(out_dtype), final_state


# ----------------------------------------------------------------------------------------------
# dispatch


def _delta_rule_torch(q, k, v, beta, scale, initial_state, output_final_state, g=None):
    # T == 1 (decoding): the token loop is one step, cheaper than building chunk matrices
    if q.shape[1] <= 1:
        return delta_rule_recurrent(q, k, v, beta, scale, initial_state, output_final_state, g=g)
    return delta_rule_chunked(q, k, v, beta, scale, initial_state, output_final_state, g=g)


def _delta_rule_triton(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, g=None):
    # imported here: fla pulls in Triton, which is only usable (and maybe only installed) with CUDA
    if g is None:
        from fla.ops.delta_rule import chunk_delta_rule as chunk_fn
        from fla.ops.delta_rule import fused_recurrent_delta_rule as recurrent_fn
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as chunk_fn
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as recurrent_fn

    out_dtype = q.dtype
    if q.shape[1] == 1:
        fn, dtype = recurrent_fn, q.dtype
    else:
        # fla's chunk kernel refuses fp32 inputs (its tiles are bf16/fp16 tensor-core matmuls),
        # so fp32 callers run it in bf16; the state it carries is fp32 either way.
        fn = chunk_fn
        dtype = torch.bfloat16 if q.dtype == torch.float32 else q.dtype
    # keyword arguments throughout: the gated kernels take (q, k, v, g, beta) / (q, k, v, g, gk, gv, beta)
    extra = {} if g is None else {"g": g.float()}  # the log-decay (and its cumsum) stays fp32
    o, final_state = fn(
        q=q.to(dtype),
        k=k.to(dtype),
        v=v.to(dtype),
        beta=beta.to(dtype),
        **extra,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,  # the caller already normalised q and k
        cu_seqlens=cu_seqlens,
    )
    return o.to(out_dtype), final_state


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    *,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quasar delta rule, [B, T, H, D] layout. Returns (o [B, T, H, V] in q.dtype, final state fp32).

    backend: 'triton' (fla's `chunk_delta_rule`, or `fused_recurrent_delta_rule` when T == 1),
    'torch' (chunked, or the token loop when T == 1), or None/'auto' to choose from the device.
    cu_seqlens: LongTensor [N+1] of document boundaries in a packed batch (B must be 1); each
    document starts from its own initial state (initial_state [N, H, K, V]) and the final state
    is [N, H, K, V].
    g: optional log-decay [B, T, H] (<= 0): the gated delta rule, S <- exp(g_t) S before write t
    (fla's `chunk_gated_delta_rule` / `fused_recurrent_gated_delta_rule` on the Triton backend).
    """
    _check_inputs(q, k, v, beta, initial_state, cu_seqlens, g=g)
    backend = resolve_backend(q, backend)
    if backend == "triton":
        return _delta_rule_triton(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, g=g)

    if cu_seqlens is None:
        return _delta_rule_torch(q, k, v, beta, scale, initial_state, output_final_state, g=g)

    return per_document(lambda q, k, v, beta, g, h0, final: _delta_rule_torch(q, k, v, beta, scale, h0, final, g=g),
                        (q, k, v, beta, g), cu_seqlens, initial_state, output_final_state)
