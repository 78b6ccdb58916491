"""Sparse KD losses between a student LM and a top-k + tail teacher, chunked over tokens.

The teacher is stored sparsely: per token position its k most likely ids `topk_ids` [N, k] and their
log-probs `topk_logprobs` [N, k] at the capture temperature tau (taken from its full softmax), plus
the implied tail mass 1 - sum(exp(topk_logprobs)) of every other id (stored or recomputed). That is
all we know of the teacher, so both distributions are compared on k+1 buckets, the teacher's k ids
and "everything else":

    p_b    = exp(topk_logprobs[b])                  q_b    = softmax(z / tau)[topk_ids[b]]   b = 1..k
    p_tail = 1 - sum_b p_b  (or the stored tail)    q_tail = 1 - sum_b q_b

where z = hidden @ lm_head_weight.T are the student's logits, evaluated at the same tau (standard KD).
Per position (kind=):

    fkl  KL(p || q) = sum_b p_b (log p_b - log q_b)          mode covering
    rkl  KL(q || p) = sum_b q_b (log q_b - log p_b)          mode seeking
    jsd  JSD(beta)  = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q

JSD convention: the generalised JSD of GKD (Agarwal et al., "On-Policy Distillation of Language
Models", eq. 1) D(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, with
P = teacher and Q = student, as in TRL's GKDTrainer. beta = 0.5 is the symmetric JSD.
beta must lie in the open interval (0, 1): at both ends the loss is identically 0 (M equals one of
the two). Near the ends, JSD(beta) / beta -> KL(p || q) (forward) as beta -> 0 and
JSD(beta) / (1 - beta) -> KL(q || p) (reverse) as beta -> 1; use kind="fkl" / "rkl" for those.

Total loss:  (1 - ce_weight) * s * KD + ce_weight * CE,  s = tau**2 if kd_t2_scale else 1, where KD is
the mean over unmasked positions and CE the mean cross-entropy of the student's full softmax at
temperature 1 against `labels`, over unmasked positions whose label is not ignore_index. The mask
defaults to labels != ignore_index when labels are given, else to all positions. With no valid
position a term is 0 (not NaN).

Numerics: everything after the LM head's matmul is done in fp32 (fp64 if the inputs are fp64); with
bf16/fp16 hidden/weights the matmul runs in that dtype (fp32 accumulation inside the GEMM, logits
rounded once to bf16/fp16, as in a plain `model(...).logits.float()`), and gradients are accumulated
in fp32. Either tail is floored at TAIL_EPS: 1 - sum(probs) in fp32 is only good to ~1e-7..1e-6, so
a smaller tail is noise (it can even come out negative). Teacher log-probs below
TEACHER_LOGPROB_FLOOR (e.g. -inf for ids outside the teacher's support) are raised to it, so that
0 * log 0 never makes a NaN.

`chunked_kd_loss` never builds the [N, V] logits: it runs the LM head over `chunk_size` tokens at a
time inside an autograd.Function that keeps only its inputs plus O(N * k) per-row statistics (the
log-sum-exps and the closed-form gradient coefficients of each row), and recomputes each chunk's
logits in backward to write d_hidden and d_weight chunk by chunk; peak extra memory is
O(chunk_size * V). `naive_kd_loss` is the plain full-logits reference (tests,
benchmarks). `hidden_mse` is the layer-wise hidden-state loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from quasar_model.teacher_outputs.buckets import (
    KINDS, TAIL_EPS, bucket_kd, bucket_kd_grad, log1mexp, student_buckets, teacher_buckets,
)

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "naive_kd_loss", "chunked_kd_loss", "hidden_mse"]


# -----------------------------------------------------------------------------
# input checks and the per-position weights shared by both paths

@dataclass
class _Prepared:
    ids: torch.Tensor             # [N, k] int64, masked rows replaced by 0..k-1 (distinct, in range)
    lt: torch.Tensor              # [N, k+1] teacher bucket log-probs, masked rows benign (uniform)
    kd_w: torch.Tensor            # [N] weight of each position's KD term (0 on masked rows)
    ce_w: torch.Tensor | None     # [N] weight of each position's CE term, None without CE
    labels: torch.Tensor | None   # [N] int64, ignored rows replaced by 0


def _shape(t):
    return list(t.shape)


def _prepare(N, V, device, dtype, topk_ids, topk_logprobs, mask, labels, kind, beta, temperature,
             ce_weight, tail, kd_t2_scale, ignore_index) -> _Prepared:
    if kind not in KINDS:
        raise ValueError(f"kind: unknown loss kind {kind!r}; expected one of {KINDS}")
    if kind == "jsd" and not (0.0 < beta < 1.0):
        raise ValueError(f"beta: must be in the open interval (0, 1) for kind='jsd', got {beta} "
                         "(the generalised JSD is identically 0 at 0 and 1; use kind='fkl' or 'rkl')")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature}")
    if not (0.0 <= ce_weight <= 1.0):
        raise ValueError(f"ce_weight: must be in [0, 1], got {ce_weight}")
    if ce_weight > 0 and labels is None:
        raise ValueError("labels: ce_weight > 0 needs labels for the cross-entropy term")
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids: must be an integer tensor, got {topk_ids.dtype}")
    if not topk_logprobs.is_floating_point():
        raise ValueError(f"topk_logprobs: must be a floating tensor, got {topk_logprobs.dtype}")
    if topk_ids.dim() == 0:
        raise ValueError("topk_ids: must have a last (k) dimension")
    if topk_ids.shape != topk_logprobs.shape:
        what = (f"k mismatch: {topk_logprobs.shape[-1]} log-probs vs {topk_ids.shape[-1]} ids per position"
                if topk_ids.shape[:-1] == topk_logprobs.shape[:-1] else "different positions")
        raise ValueError(f"topk_logprobs: shape {_shape(topk_logprobs)} does not match topk_ids "
                         f"{_shape(topk_ids)} ({what})")
    k = topk_ids.shape[-1]
    if topk_ids.numel() // max(k, 1) != N or k == 0:
        raise ValueError(f"topk_ids: shape {_shape(topk_ids)} does not give one row of k >= 1 ids per "
                         f"position ({N} positions in the student's input)")
    if k > V:
        raise ValueError(f"topk_ids: k={k} ids per position but the student vocab has only {V}")
    ids = topk_ids.reshape(N, k).to(device=device, dtype=torch.long)
    lp = topk_logprobs.reshape(N, k).to(device)

    def per_position(t, name):
        if t is None:
            return None
        if t.shape != topk_ids.shape[:-1] and t.shape != (N,):
            raise ValueError(f"{name}: shape {_shape(t)} does not match the {N} positions "
                             f"(topk_ids is {_shape(topk_ids)})")
        return t.reshape(N).to(device)

    mask = per_position(mask, "mask")
    labels = per_position(labels, "labels")
    tail = per_position(tail, "tail")
    if labels is not None and (labels.is_floating_point() or labels.dtype == torch.bool):
        raise ValueError(f"labels: must be an integer tensor, got {labels.dtype}")
    if mask is not None:
        valid = mask.bool()
    elif labels is not None:
        valid = labels != ignore_index
    else:
        valid = torch.ones(N, dtype=torch.bool, device=device)

    # data checks on the rows that count (padding rows may hold anything)
    vid = ids[valid]
    if vid.numel():
        hi, lo = int(vid.max()), int(vid.min())
        if hi >= V:
            raise ValueError(f"topk_ids: contains id {hi} >= student vocab size {V}: the teacher vocab is "
                             "larger than the student's; map teacher ids to student ids with the "
                             "tokenizer mapping first")
        if lo < 0:
            raise ValueError(f"topk_ids: contains negative id {lo} on an unmasked position")
        srt = vid.sort(dim=-1).values
        if k > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("topk_ids: a position lists the same id twice; the k ids must be distinct")
    ce_valid = None
    if labels is not None:
        labels = labels.long()
        ce_valid = valid & (labels != ignore_index)
        vl = labels[ce_valid] if ce_weight > 0 else labels[:0]   # labels only mask when CE is off
        if vl.numel() and (int(vl.max()) >= V or int(vl.min()) < 0):
            raise ValueError(f"labels: ids must be in [0, {V}) or ignore_index={ignore_index}")

    # masked rows get a benign teacher (distinct in-range ids, uniform buckets), so nothing there can
    # make a NaN that a zero weight would not cancel (0 * NaN = NaN)
    ids = torch.where(valid[:, None], ids, torch.arange(k, device=device))
    lt = teacher_buckets(lp, tail, dtype)                                   # [N, k+1]
    lt = torch.where(valid[:, None], lt, torch.full_like(lt, -math.log(k + 1)))

    # mean over valid positions as per-position weights: the loss is then a plain weighted sum
    s = temperature ** 2 if kd_t2_scale else 1.0
    n_kd = valid.sum().clamp(min=1).to(dtype)
    kd_w = valid.to(dtype) * ((1.0 - ce_weight) * s / n_kd)                # [N]
    ce_w = None
    if ce_weight > 0:
        n_ce = ce_valid.sum().clamp(min=1).to(dtype)
        ce_w = ce_valid.to(dtype) * (ce_weight / n_ce)                       # [N]
        labels = torch.where(ce_valid, labels, 0)
    else:
        labels = None
    return _Prepared(ids, lt, kd_w, ce_w, labels)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# -----------------------------------------------------------------------------
# reference: materialise everything, let autograd do the rest

def naive_kd_loss(logits, topk_ids, topk_logprobs, mask=None, labels=None, kind="fkl", beta=0.5,
                  temperature=1.0, ce_weight=0.0, tail=None, kd_t2_scale=False,
                  ignore_index=IGNORE_INDEX):
    """Same loss as chunked_kd_loss from full student logits [..., V] (builds [N, V] fp32 tensors)."""
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected [..., V], got shape {_shape(logits)}")
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    N = z.shape[0]
    cdt = _compute_dtype(logits.dtype)
    p = _prepare(N, V, z.device, cdt, topk_ids, topk_logprobs, mask, labels, kind, beta, temperature,
                 ce_weight, tail, kd_t2_scale, ignore_index)
    z = z.to(cdt)                                              # [N, V]
    zt = z / temperature if temperature != 1.0 else z          # [N, V]
    s = F.log_softmax(zt, dim=-1)                              # [N, V] student log-probs at tau
    ls = student_buckets(s.gather(1, p.ids))                   # [N, k+1]
    loss = (p.kd_w * bucket_kd(ls, p.lt, kind, beta)).sum()
    if p.ce_w is not None:                                     # CE at temperature 1, full softmax
        loss = loss + (p.ce_w * F.cross_entropy(z, p.labels, reduction="none")).sum()
    return loss


# -----------------------------------------------------------------------------
# chunked: the LM head and the loss, chunk_size tokens at a time, in both passes
#
# Gradient w.r.t. the (tau-scaled) logits z of one row, with q = softmax(z), K the teacher ids and
# g_b = d loss / d log q_b from bucket_kd_grad. Since log q_j = z_Kj - lse(z) and
# log q_tail = lse(z over ids not in K) - lse(z):
#     d loss / d z_v = [v in K] g_j(v) + [v not in K] g_tail q_v / q_tail - G q_v,   G = sum_b g_b
# i.e.  dz = (g_tail / q_tail - G) * q   everywhere, then   dz[K] = g_K - G q_K   (overwrite, exact).
# CE adds ce_w * (softmax(z_raw) - onehot(label)); the raw logits get d/dz_raw = dz / tau.

def _chunk_logits(h, weight, out, out_lo):
    # [c, D] @ [D, V] -> out[:c], the raw logits in the compute dtype. The same buffer serves every
    # chunk: on CPU a fresh [c, V] tensor per chunk costs as much in page faults as the exp pass.
    c = h.shape[0]
    if out_lo is None:                                       # weights already in the compute dtype
        return torch.mm(h, weight.T, out=out[:c])
    return out[:c].copy_(torch.mm(h, weight.T, out=out_lo[:c]))   # bf16/fp16 matmul, fp32 result


class _ChunkedKDLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, ids, lt, kd_w, ce_w, labels, kind, beta, temperature, chunk_size):
        # hidden [N, D], weight [V, D], ids [N, k], lt [N, k+1], kd_w/ce_w/labels [N]
        N, k = ids.shape
        V = weight.shape[0]
        cdt = lt.dtype
        inv_t = 1.0 / temperature
        use_ce = ce_w is not None
        two_softmax = use_ce and temperature != 1.0      # CE's softmax at 1 differs from KD's at tau
        lse = lt.new_empty(N)                            # [N] lse of z / tau
        lse1 = lt.new_empty(N) if two_softmax else None  # [N] lse of z (CE)
        coef_q = lt.new_empty(N)                         # [N] d loss/d z_raw = coef_q * q + ...
        coef_q1 = ce_w if two_softmax else None          #     ... + coef_q1 * softmax(z_raw)
        val_k = lt.new_empty(N, k)                       # [N, k] exact d loss/d z_raw on the teacher ids
        loss = lt.new_zeros(())
        C = min(chunk_size, N)
        buf = lt.new_empty(C, V)                         # [C, V] the only O(chunk V) tensors
        buf_lo = weight.new_empty(C, V) if weight.dtype != cdt else None
        buf_e = lt.new_empty(C, V) if two_softmax else None
        for i0 in range(0, N, chunk_size):
            sl = slice(i0, min(N, i0 + chunk_size))
            z = _chunk_logits(hidden[sl], weight, buf, buf_lo)     # [c, V] raw logits
            zk = z.gather(1, ids[sl])                    # [c, k]
            if use_ce:
                z_lab = z.gather(1, labels[sl, None]).squeeze(1)   # [c]
            # log-sum-exp in place: lse = m + log sum exp(z - m); z is not needed afterwards
            m = z.amax(dim=-1)                           # [c]
            z.sub_(m[:, None])
            if two_softmax:
                lse1_c = m + torch.exp(z, out=buf_e[: z.shape[0]]).sum(-1).log()
            if temperature != 1.0:
                z.mul_(inv_t)
            lse_c = m * inv_t + z.exp_().sum(-1).log()   # [c]
            if use_ce and not two_softmax:
                lse1_c = lse_c

            # the k+1 buckets, small tensors from here on
            lsk = zk * inv_t - lse_c[:, None]            # [c, k] student log-probs on the teacher ids
            x = torch.logsumexp(lsk, dim=-1)             # [c] log of the student's mass on K
            ls = torch.cat([lsk, log1mexp(x.clamp(max=-TAIL_EPS))[:, None]], dim=-1)   # [c, k+1]
            row = bucket_kd(ls, lt[sl], kind, beta)      # [c]
            g = bucket_kd_grad(ls, lt[sl], kind, beta)   # [c, k+1]
            # a clamped student tail is a constant (as autograd sees it through the clamp)
            g_tail = torch.where(x <= -TAIL_EPS, g[:, -1], 0.0)   # [c]
            G = g[:, :k].sum(-1) + g_tail                # [c]
            w = kd_w[sl] * inv_t                         # [c] d z / d z_raw = 1 / tau
            coef_q[sl] = w * (g_tail / ls[:, -1].exp() - G)
            val_k[sl] = w[:, None] * (g[:, :k] - G[:, None] * lsk.exp())
            loss += (kd_w[sl] * row).sum()

            if use_ce:
                loss += (ce_w[sl] * (lse1_c - z_lab)).sum()
                val_k[sl] += ce_w[sl, None] * (zk - lse1_c[:, None]).exp()   # + ce_w * q1 on K
                if not two_softmax:                      # same softmax: fold into coef_q
                    coef_q[sl] += ce_w[sl]
            lse[sl] = lse_c
            if two_softmax:
                lse1[sl] = lse1_c

        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.save_for_backward(hidden, weight, ids, labels, ce_w, lse, lse1, coef_q, coef_q1, val_k)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, ids, labels, ce_w, lse, lse1, coef_q, coef_q1, val_k = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, k = ids.shape
        V = weight.shape[0]
        cdt, inv_t = lse.dtype, 1.0 / ctx.temperature
        go = grad_out.to(cdt)
        # the loss is linear in these coefficients: fold grad_out in once, on [N] / [N, k] tensors
        coef_q, val_k = coef_q * go, val_k * go
        coef_q1 = coef_q1 * go if coef_q1 is not None else None
        lab_coef = -ce_w * go if ce_w is not None else None
        dh = hidden.new_empty(hidden.shape) if need_h else None     # contiguous: rows written by mm
        dw = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None  # fp32 accumulator
        low = weight.dtype != cdt                                   # bf16/fp16 weights
        dw_lo = torch.empty_like(weight) if (need_w and low) else None
        C = min(ctx.chunk_size, N)
        buf = lse.new_empty(C, V)
        buf_lo = weight.new_empty(C, V) if low else None
        buf_e = lse.new_empty(C, V) if coef_q1 is not None else None
        for i0 in range(0, N, ctx.chunk_size):
            sl = slice(i0, min(N, i0 + ctx.chunk_size))
            h = hidden[sl]                                          # [c, D]
            z = _chunk_logits(h, weight, buf, buf_lo)               # [c, V] recomputed raw logits
            if coef_q1 is not None:                                 # CE's softmax at temperature 1
                q1 = torch.sub(z, lse1[sl, None], out=buf_e[: z.shape[0]]).exp_().mul_(coef_q1[sl, None])
            if ctx.temperature != 1.0:
                z.mul_(inv_t)
            d = z.sub_(lse[sl, None]).exp_().mul_(coef_q[sl, None])   # [c, V] coef_q * q, in place
            if coef_q1 is not None:
                d.add_(q1)
            d.scatter_(1, ids[sl], val_k[sl])                       # exact values on the teacher ids
            if lab_coef is not None:
                d.scatter_add_(1, labels[sl, None], lab_coef[sl, None])   # - ce_w at the label
            if low:                                                 # matmuls in the weights' dtype
                d = buf_lo[: d.shape[0]].copy_(d)
            # d [c, V] = d loss / d logits: chain through logits = h @ W.T
            if need_h:
                torch.mm(d, weight, out=dh[sl])                     # [c, D]
            if need_w and not low:
                dw.addmm_(d.T, h)                                   # [V, D] += [V, c] @ [c, D]
            elif need_w:
                dw.add_(torch.mm(d.T, h, out=dw_lo))                # accumulate in fp32
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None, None, None, None, None, None


def chunked_kd_loss(hidden, lm_head_weight, topk_ids, topk_logprobs, mask=None, labels=None, kind="fkl",
                    beta=0.5, temperature=1.0, ce_weight=0.0, chunk_size=1024, tail=None,
                    kd_t2_scale=False, ignore_index=IGNORE_INDEX):
    """Sparse KD (+ optional CE) loss from final hidden states, never building the [N, V] logits.

    hidden [..., D] and lm_head_weight [V, D] (same dtype: fp32, bf16, fp16 or fp64; math in fp32/fp64);
    topk_ids / topk_logprobs [..., k] (teacher log-probs at `temperature`); mask [...] (True = use);
    labels [...] int (ignore_index = skip, for CE; also the default mask); tail [...] optional stored
    teacher tail mass. Returns the scalar loss described in the module docstring; differentiable
    w.r.t. hidden and lm_head_weight. Peak extra memory: one [chunk_size, V] fp32 buffer (plus a
    second with CE and temperature != 1, and a half-size one for bf16/fp16 weights), reused by
    every chunk, and the fp32 [V, D] gradient accumulator.
    """
    if lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight: expected [V, D], got shape {_shape(lm_head_weight)}")
    V, D = lm_head_weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != D:
        raise ValueError(f"hidden: last dim of shape {_shape(hidden)} must equal the hidden size D={D} "
                         f"of lm_head_weight {_shape(lm_head_weight)}")
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"hidden: dtype {hidden.dtype} differs from lm_head_weight's {lm_head_weight.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive int, got {chunk_size!r}")
    h = hidden.reshape(-1, D)                                  # [N, D]
    cdt = _compute_dtype(hidden.dtype)
    p = _prepare(h.shape[0], V, h.device, cdt, topk_ids, topk_logprobs, mask, labels, kind, beta,
                 temperature, ce_weight, tail, kd_t2_scale, ignore_index)
    return _ChunkedKDLoss.apply(h, lm_head_weight, p.ids, p.lt, p.kd_w, p.ce_w, p.labels, kind, beta,
                                float(temperature), chunk_size)


# -----------------------------------------------------------------------------
# layer-wise structural distillation

def hidden_mse(student_hidden, teacher_hidden, proj=None, mask=None, normalize=False):
    """Mean squared error between student and teacher hidden states.

    student_hidden [..., Ds], teacher_hidden [..., Dt] (the teacher is a constant: detached). proj maps
    Ds -> Dt: a module/callable, or a [Dt, Ds] weight (nn.Linear layout); None needs Ds == Dt. The
    squared error is averaged over features, then over positions where mask [...] is True (all if
    None). Computed in fp32. Returns 0 when no position is unmasked. normalize=True divides each
    position's error by the teacher's mean square at that position (relative error): residual
    streams grow with depth and across tokens, and without it the deepest layers and the loudest
    tokens would outweigh the rest. Per position, so the value stays a plain mean over positions
    and splits over micro-batches and ranks like the KD loss.
    """
    s = student_hidden
    if proj is not None:
        if isinstance(proj, torch.Tensor):
            if proj.dim() != 2 or proj.shape[1] != s.shape[-1]:
                raise ValueError(f"proj: weight {_shape(proj)} must be [Dt, Ds={s.shape[-1]}]")
            s = s @ proj.T
        else:
            s = proj(s)
    if s.shape != teacher_hidden.shape:
        raise ValueError(f"teacher_hidden: shape {_shape(teacher_hidden)} does not match the (projected) "
                         f"student hidden {_shape(s)}" + ("; pass proj to map Ds -> Dt" if proj is None else ""))
    t = teacher_hidden.detach().float()
    err = (s.float() - t).pow(2).mean(-1)                                    # [...]
    if normalize:
        err = err / t.pow(2).mean(-1).clamp(min=1e-12)
    if mask is None:
        return err.mean()
    if mask.shape != err.shape:
        raise ValueError(f"mask: shape {_shape(mask)} does not match the positions {_shape(err)}")
    m = mask.to(err.device).bool()
    return torch.where(m, err, 0.0).sum() / m.sum().clamp(min=1)
