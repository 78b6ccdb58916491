"""Gated slot attention (GSA): the Raven branch's sequence op.

Each head keeps M memory slots. A slot is a key column of Hk [K, M] and a value row of Hv [M, V];
every token writes into the slots with strengths s_t >= 0 and decays them by exp(g_t), g_t <= 0
(one log-decay per slot). Per batch and head, with both states starting at `initial_state` or 0:

    Hk <- Hk diag(exp(g_t)) + k_t s_t^T          [K, M]  decay acts on the slot (column) axis
    p_t = softmax_M(scale * q_t^T Hk)             [M]     read after the update at t
    Hv <- diag(exp(g_t)) Hv + s_t v_t^T           [M, V]  decay acts on the slot (row) axis
    o_t = Hv^T p_t                                [V]     read after the update at t

This is flash-linear-attention's `naive_recurrent_gsa` with explicit g. The second recurrence sees
the first only through p, so the op is two gated-linear-attention passes with a softmax between:
pass 1 maps (q, k, s) -> slot logits, gated on its output (slot) axis; pass 2 maps (p, s, v) -> o,
gated on its input (slot) axis. Both passes share the same gates and the same write strengths s,
so the chunked path computes the decay tensors once and uses them twice.

Layout: [B, T, H, D]; heads are already expanded (no GQA here); states are fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .backend import resolve_backend
from .varlen import check_cu_seqlens, check_cu_seqlens_bounds, per_document

__all__ = ["gated_slot_attention", "gated_slot_chunked", "gated_slot_recurrent"]

State = tuple[torch.Tensor, torch.Tensor]
_LOG2_E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))
_SEGMENT_TOKENS = 2048  # (token, head) pairs per segment of the chunked path; see there


# ----------------------------------------------------------------------------------------------
# input checks


def _check_inputs(q, k, v, s, g, scale) -> None:
    """Raise ValueError naming the offending argument."""
    for name, x in (("q", q), ("k", k), ("v", v), ("s", s), ("g", g)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    B, T, H, _ = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if s.shape[:3] != (B, T, H):
        raise ValueError(f"s must be [B, T, H, M] = [{B}, {T}, {H}, M], got {tuple(s.shape)}")
    if g.shape != s.shape:
        raise ValueError(f"g must have the shape of s {tuple(s.shape)}, got {tuple(g.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")


def _check_state(initial_state, N: int, q, v, s) -> None:
    """initial_state must be None or (hk [N,H,K,M], hv [N,H,M,V])."""
    if initial_state is None:
        return
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise ValueError("initial_state must be a pair (hk [N, H, K, M], hv [N, H, M, V]) or None")
    H, K, V, M = q.shape[2], q.shape[3], v.shape[3], s.shape[3]
    for i, (name, x, shape) in enumerate((("hk", initial_state[0], (N, H, K, M)),
                                          ("hv", initial_state[1], (N, H, M, V)))):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"initial_state[{i}] ({name}) must have shape {shape}, got {got}")


def _zero_states(B, H, K, M, V, device) -> State:
    return (torch.zeros(B, H, K, M, dtype=torch.float32, device=device),
            torch.zeros(B, H, M, V, dtype=torch.float32, device=device))


# ----------------------------------------------------------------------------------------------
# reference: one token at a time


def gated_slot_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: State | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """Token-by-token GSA in fp32: the spec's math. Reference for tests and the T == 1 decode step.

    q, k [B,T,H,K]; v [B,T,H,V]; s, g [B,T,H,M]; initial_state (hk [B,H,K,M], hv [B,H,M,V]).
    Returns o [B,T,H,V] in q.dtype and the final (hk, hv) in fp32 if output_final_state.
    """
    _check_inputs(q, k, v, s, g, scale)
    _check_state(initial_state, q.shape[0], q, v, s)
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    # fp32 work copies; the scale is folded into q once instead of into every logit
    qf, kf, vf, sf = q.float() * scale, k.float(), v.float(), s.float()
    a = g.float().exp()  # [B,T,H,M] per-slot decay factor in (0, 1]
    if initial_state is None:
        hk, hv = _zero_states(B, H, K, M, V, q.device)
    else:
        hk, hv = (x.float() for x in initial_state)

    outs = []
    # unbind once: indexing x[:, t] inside the loop would make autograd build a full-size zero
    # gradient for every step, O(T^2) in the backward
    steps = zip(*(x.unbind(1) for x in (qf, kf, vf, sf, a)))
    for q_t, k_t, v_t, s_t, a_t in steps:  # [B,H,K], [B,H,K], [B,H,V], [B,H,M], [B,H,M]
        # pass 1: decay slot columns, write k_t s_t^T, read slot logits with q_t
        hk = torch.addcmul(hk * a_t[..., None, :], k_t[..., :, None], s_t[..., None, :])  # B,H,K,M
        p = (q_t[..., None, :] @ hk).squeeze(-2).softmax(-1)  # [B,H,M]
        # pass 2: decay slot rows, write s_t v_t^T, read the slot mixture p
        hv = torch.addcmul(hv * a_t[..., :, None], s_t[..., :, None], v_t[..., None, :])  # B,H,M,V
        outs.append((p[..., None, :] @ hv).squeeze(-2))  # [B,H,V]

    o = torch.stack(outs, 1) if outs else vf.new_zeros(B, 0, H, V)
    return o.to(q.dtype), ((hk, hv) if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# chunked: parallel inside a chunk, recurrent across chunks


def _scan(h0: torch.Tensor, decay: torch.Tensor, delta: torch.Tensor):
    """State passing across chunks: h_{c+1} = decay_c * h_c + delta_c.

    h0 [R,X,Y] (R = B*H); decay [R,N,.,.] broadcastable to a state; delta [R,N,X,Y].
    Returns the state entering every chunk [R,N,X,Y] and the state after the last chunk [R,X,Y].
    The sequential part (with the loop over segments); one fused multiply-add per chunk.
    """
    entering, h = [], h0
    # unbind, not delta[:, c]: autograd would build a full-size zero gradient for every c
    for delta_c, decay_c in zip(delta.unbind(1), decay.unbind(1)):
        entering.append(h)
        h = torch.addcmul(delta_c, h, decay_c)
    return torch.stack(entering, 1), h


def _halves(x: torch.Tensor, h: int):
    """[Z, C, D] -> (first, second) half of every block of 2h tokens, as [Z * C/2h, h, D] views.
    unbind: one autograd node for both halves (its backward is one stack, not two zero-fills)."""
    first, second = x.unflatten(1, (-1, 2, h)).unbind(2)  # [Z, C/2h, h, D] each
    return first.flatten(0, 1), second.flatten(0, 1)


def _second_halves(x: torch.Tensor, h: int) -> torch.Tensor:
    """The second halves as a view that may be updated in place (unbind's views may not)."""
    return x.unflatten(1, (-1, 2, h))[:, :, 1].flatten(0, 1)


def _cross_blocks(x: torch.Tensor, h: int) -> torch.Tensor:
    """x [Z, C, C] (rows i, cols j) -> its (i in S, j in F) block of every diagonal 2h x 2h block,
    as a view [Z, C/2h, h, h]."""
    Z, C = x.shape[0], x.shape[1]
    blocks = x.view(Z, C // (2 * h), 2 * h, C // (2 * h), 2 * h).diagonal(dim1=1, dim2=3)
    return blocks[:, h:, :h].permute(0, 3, 1, 2)  # [Z, 2h, 2h, C/2h] -> [Z, C/2h, h, h]


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for [Z, n, h] @ [Z, h, m]. For h <= 2 (the lowest levels below) it is summed as h
    outer products: bmm's per-matrix overhead dominates such tiny matrices on CPU (~5x slower)."""
    h = a.shape[-1]
    if h > 2:
        return torch.bmm(a, b)
    out = a[..., :1] * b[:, :1]
    for j in range(1, h):
        out = torch.addcmul(out, a[..., j:j + 1], b[:, j:j + 1])
    return out


def _bmm_scaled(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * (a @ b) in one call (saves a pass over the output)."""
    return torch.baddbmm(a.new_zeros(()), a, b, beta=0, alpha=alpha)


def gated_slot_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: State | None = None,
    output_final_state: bool = False,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, State | None]:
    """Chunked GSA in pure PyTorch (fp32, autograd-differentiable); same contract as the recurrent.

    Tokens are grouped in chunks of C = chunk_size (a power of two). Everything inside a chunk is
    computed in parallel over all chunks at once; only the two states are carried from chunk to
    chunk (see _chunked_segment). Long sequences are cut into segments of whole chunks, run one
    after the other with the states handed on: the op is memory-bound on CPU, and a segment's
    ~30 intermediate tensors then stay in cache (the forward at T=4096, B*H=4 runs 2x faster
    than in one piece).
    """
    _check_inputs(q, k, v, s, g, scale)
    _check_state(initial_state, q.shape[0], q, v, s)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size!r}")
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    if initial_state is None:
        state = _zero_states(B, H, K, M, V, q.device)
    else:
        state = tuple(x.float() for x in initial_state)

    if T == 0:
        return q.new_zeros(B, 0, H, V), (state if output_final_state else None)

    # segment length: whole chunks, ~_SEGMENT_TOKENS (token, head) pairs; on GPU one segment
    seg = max(chunk_size, _SEGMENT_TOKENS // max(B * H, 1) // chunk_size * chunk_size)
    seg = T if q.is_cuda else seg
    outs = []
    # split, not x[:, t0:t1]: one autograd node for all segments, not a zero-fill per segment
    for xs in zip(*(x.split(seg, dim=1) for x in (q, k, v, s, g))):
        o, state = _chunked_segment(*xs, scale, state, chunk_size)
        outs.append(o)
    o = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    return o, (state if output_final_state else None)


def _chunked_segment(q, k, v, s, g, scale: float, state: State, C: int):
    """One segment of gated_slot_chunked, from the fp32 state (hk [B,H,K,M], hv [B,H,M,V]).
    Returns o [B,T,H,V] in q.dtype and the final state.

    Stability. With per-slot (vector) gates the usual trick, folding exp(G_i) into q_i and
    exp(-G_j) into k_j, overflows once decays are strong (g = -10 per step gives exp(320) within
    a chunk of 32). Here every decay factor is the exp of a difference that is <= 0:
      state entering the chunk -> token i:  exp(G_i)            (G: in-chunk cumulative log-decay)
      token j -> end of the chunk:          exp(G_end - G_j)
      token j -> token i, j < i:            exp(G_i - G_r) * exp(G_r - G_j) with j <= r < i
    The last one comes from a divide and conquer over the chunk: split every block of 2h tokens
    into halves F | S; the pairs (i in S, j in F) factor through r = the last token of F, so they
    are matmuls with both factors <= 1; the pairs inside a half are the same problem at h/2; and
    the pairs i == j carry no decay. This does the job of the [C, C, M] relative-decay tensor
    exp(G_i - G_j) with log2(C) exps of [T, M] tensors instead of one exp of a [T, C, M] tensor,
    which on CPU is several times faster.
    """
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    out_dtype = q.dtype
    hk0, hv0 = state
    N = -(-T // C)  # number of chunks
    pad = N * C - T
    Z = B * H * N  # every (batch, head, chunk) is one independent problem inside the chunk

    def chunks(*xs: torch.Tensor) -> torch.Tensor:
        # [B,T,H,D1], [B,T,H,D2].. -> [Z,C,D1+D2..] fp32, contiguous (bmm wants it), in one copy.
        # Zero padding is inert: s=0 writes nothing, g=0 keeps the state, so the state after the
        # padded tail is the state after token T.
        xs = [x.float().transpose(1, 2) for x in xs]  # [B,H,T,D]
        x = torch.cat(xs, -1) if len(xs) > 1 else xs[0]
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(Z, C, x.shape[-1])

    q, s, g = chunks(q), chunks(s), chunks(g)
    kv = chunks(k, v)  # [Z,C,K+V]: k and v side by side, the two things written into the states
    k, v = kv.split([K, V], -1)  # views (split: one autograd node for both)

    # --- decay factors, shared by both passes ----------------------------------------------------
    # G in fp64: each factor below is exp of a difference of two G's; in fp32 the difference of
    # two large G's (strong decay early in the chunk) loses the small decay between them.
    # G is in log2 units: torch.exp2 is ~4x faster than torch.exp on CPU, and as accurate here.
    G = torch.cumsum(g * _LOG2_E, 1, dtype=torch.float64)  # [Z,C,M] chunk start -> token i, <= 0
    G_end = G[:, -1:]  # [Z,1,M]
    from_state = torch.exp2(G.float())  # [Z,C,M] entering state -> token i
    s_end = s * torch.exp2((G_end - G).float())  # [Z,C,M] write j decayed to the chunk end
    chunk_decay = torch.exp2(G_end.float()).view(B * H, N, 1, M)  # a state across a chunk
    levels = []  # (h, decay r -> i in S, write j in F decayed to r), each [Z*C/2h, h, M]
    h = C // 2
    while h >= 1:
        GF, GS = _halves(G, h)  # blocks of 2h tokens = halves F | S
        G_r = GF[:, -1:]  # r = the last token of F
        to_S = torch.exp2((GS - G_r).float())
        s_F = _halves(s, h)[0] * torch.exp2((G_r - GF).float())
        levels.append((h, to_S, s_F))
        h //= 2

    # --- pass 1: slot logits, Hk [K, M] gated on its slot columns --------------------------------
    # (the scale rides on the q.k products and the state read, as bmm's alpha: no pass over q)
    qk = _bmm_scaled(q, k.transpose(1, 2), scale)  # [Z,C,C] scale * q_i.k_j, all pairs
    logits = qk.diagonal(dim1=1, dim2=2).unsqueeze(-1) * s  # [Z,C,M] pairs i == j
    for h, to_S, s_F in levels:
        # i in S, j in F: logits_i += exp(G_i - G_r) * sum_j (q_i.k_j) s_j exp(G_r - G_j)
        qk_SF = _cross_blocks(qk, h).reshape(-1, h, h)  # [Z*C/2h, h, h]
        _second_halves(logits, h).addcmul_(to_S, _mm(qk_SF, s_F))
    # Both states decay along the slot axis M, and what pass 2 writes (s_j v_j^T) does not depend
    # on pass 1, so the two are carried across chunks together, as one [K+V, M] state: Hk
    # stacked on Hv^T. Its per-chunk update is [k | v]^T (s * exp(G_end - G)).
    dH = torch.bmm(kv.transpose(1, 2), s_end)  # [Z,K+V,M] what each chunk adds
    h0 = torch.cat([hk0, hv0.transpose(-1, -2)], -2).reshape(B * H, K + V, M)
    H_in, h_last = _scan(h0, chunk_decay, dH.view(B * H, N, K + V, M))  # [B*H,N,K+V,M]
    Hk_in, HvT_in = H_in.view(Z, K + V, M).split([K, V], 1)  # the states entering each chunk
    q_Hk = _bmm_scaled(q, Hk_in, scale)  # [Z,C,M] read of the entering Hk
    logits = torch.addcmul(logits, q_Hk, from_state)  # pairs (entering state, i)
    p = logits.softmax(-1)  # [Z,C,M]

    # --- pass 2: output, Hv [M, V] gated on its slot rows ----------------------------------------
    # token-to-token weights A[i, j] = sum_m p_i[m] exp(G_i - G_j)[m] s_j[m], j <= i, assembled
    # block by block, then applied to v in one matmul
    A = p.new_zeros(Z, C, C)
    A.diagonal(dim1=1, dim2=2).copy_((p * s).sum(-1))  # pairs i == j
    for h, to_S, s_F in levels:
        # i in S, j in F: A[i, j] = sum_m (p_i exp(G_i - G_r))[m] (s_j exp(G_r - G_j))[m]
        attn = torch.bmm(_halves(p, h)[1] * to_S, s_F.transpose(1, 2))  # [Z*C/2h, h, h]
        _cross_blocks(A, h).copy_(attn.view(Z, -1, h, h))
    o = torch.baddbmm(torch.bmm(A, v), p * from_state, HvT_in.transpose(1, 2))  # [Z,C,V]

    o = o.view(B, H, N * C, V)[:, :, :T].transpose(1, 2).contiguous()  # [B,T,H,V]
    hk, hvT = h_last.view(B, H, K + V, M).split([K, V], 2)
    return o.to(out_dtype), (hk.contiguous(), hvT.transpose(-1, -2).contiguous())


# ----------------------------------------------------------------------------------------------
# dispatch


def gated_slot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, State | None]:
    """GSA on [B, T, H, D] inputs; see the module docstring for the math.

    q, k [B,T,H,K]; v [B,T,H,V]; s [B,T,H,M] write strengths >= 0; g [B,T,H,M] log-decays <= 0.
    initial_state: (hk [N,H,K,M], hv [N,H,M,V]) with N = B, or N = number of documents when
    cu_seqlens [N+1] packs N documents into a batch of one (each starts from its own state).
    Returns o [B,T,H,V] in q.dtype and, if output_final_state, the final (hk, hv) [N,...] fp32.
    backend: 'triton' (flash-linear-attention, CUDA) or 'torch'; default from the device.
    """
    _check_inputs(q, k, v, s, g, scale)
    B, T = q.shape[:2]
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B)
        check_cu_seqlens_bounds(cu_seqlens.tolist(), T)
    _check_state(initial_state, B if cu_seqlens is None else cu_seqlens.numel() - 1, q, v, s)
    backend = resolve_backend(q, backend)

    if backend == "triton":
        # lazy: fla pulls in triton, which is absent or useless on CPU-only installs
        if T == 1:
            from fla.ops.gsa import fused_recurrent_gsa as kernel
        else:
            from fla.ops.gsa import chunk_gsa as kernel
        if initial_state is not None:
            initial_state = tuple(x.float() for x in initial_state)
        o, final = kernel(q, k, v, s, g, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        return o.to(q.dtype), (tuple(final) if output_final_state else None)

    def run(q, k, v, s, g, h0, final):
        # a single token (a decode step, or a one-token document) takes the token loop
        op = gated_slot_recurrent if q.shape[1] == 1 else gated_slot_chunked
        return op(q, k, v, s, g, scale, h0, final)

    if cu_seqlens is None:
        return run(q, k, v, s, g, initial_state, output_final_state)
    return per_document(run, (q, k, v, s, g), cu_seqlens, initial_state, output_final_state)
