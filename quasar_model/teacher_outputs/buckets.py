"""The competition's KD divergence on k+1 buckets: the teacher's top-k ids and "everything else".

A teacher output (quasar_model.teacher_outputs.cache) holds, per position, the teacher's k most
likely ids, their log-probs at the capture temperature and the tail mass of every other id. That is
all that is known of the teacher, so teacher and student are compared on k+1 buckets:

    p_b    = exp(topk_logprobs[b])                  q_b    = softmax(z / tau)[topk_ids[b]]   b = 1..k
    p_tail = 1 - sum_b p_b  (or the stored tail)    q_tail = 1 - sum_b q_b

Per position (kind=):

    fkl  KL(p || q) = sum_b p_b (log p_b - log q_b)          mode covering
    rkl  KL(q || p) = sum_b q_b (log q_b - log p_b)          mode seeking
    jsd  JSD(beta)  = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q

Both roles need this one definition: distillation trains on it (distill.losses) and the validator
scores held-out KL with it (eval.heldout). Either tail is floored at TAIL_EPS: 1 - sum(probs) in
fp32 is only good to ~1e-7..1e-6, so a smaller tail is noise. Teacher log-probs below
TEACHER_LOGPROB_FLOOR (-inf for ids outside the teacher's support) are raised to it, so that
0 * log 0 never makes a NaN.
"""
from __future__ import annotations

import math

import torch

KINDS = ("fkl", "rkl", "jsd")
TAIL_EPS = 1e-6                 # floor on the teacher's and the student's tail probability
TEACHER_LOGPROB_FLOOR = -100.0  # exp(-100) ~ 4e-44: "zero" without 0 * -inf = NaN

__all__ = [
    "KINDS", "TAIL_EPS", "TEACHER_LOGPROB_FLOOR",
    "log1mexp", "tail_logprob", "teacher_buckets", "student_buckets", "bucket_kd", "bucket_kd_grad",
]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    # near 0, 1 - exp(x) = -expm1(x) keeps its digits; far from 0, log1p(-exp(x)) does. Both branches
    # are finite for any x < 0, so torch.where's unused branch never leaks a NaN into the gradient.
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_logprob(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[..., k] log-probs of k distinct ids -> [...] log of the mass on all other ids (>= ~log TAIL_EPS)."""
    # log sum_k p is kept <= -TAIL_EPS, so the tail 1 - exp(.) is >= ~TAIL_EPS. Clamp the input of
    # log1mexp, not its output: a clamped tail is then a constant with a zero gradient (not
    # 0 * inf = NaN). Floats are dense near 0, so the clamp keeps the tail's digits down to TAIL_EPS.
    return log1mexp(torch.logsumexp(topk_logprobs, dim=-1).clamp(max=-TAIL_EPS))


def teacher_buckets(topk_logprobs: torch.Tensor, tail: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Teacher [..., k] top-k log-probs (+ optional stored tail [...]) -> [..., k+1] bucket log-probs."""
    lp = topk_logprobs.to(dtype).clamp(min=TEACHER_LOGPROB_FLOOR)       # [..., k]
    if tail is None:
        lt_tail = tail_logprob(lp)                                      # [...]
    else:
        lt_tail = torch.log(tail.to(dtype).clamp(TAIL_EPS, 1.0))        # [...]
    return torch.cat([lp, lt_tail.unsqueeze(-1)], dim=-1)               # [..., k+1]


def student_buckets(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Student log-probs on the teacher's ids [..., k] -> [..., k+1] bucket log-probs (differentiable)."""
    return torch.cat([topk_logprobs, tail_logprob(topk_logprobs).unsqueeze(-1)], dim=-1)


def bucket_kd(ls: torch.Tensor, lt: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Divergence per position from bucket log-probs ls (student), lt (teacher) [..., B] -> [...]."""
    if kind == "fkl":   # sum p (log p - log q)
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "rkl":   # sum q (log q - log p)
        return (ls.exp() * (ls - lt)).sum(-1)
    if kind == "jsd":   # beta KL(p || m) + (1 - beta) KL(q || m), log m by logaddexp (no underflow)
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    raise ValueError(f"kind: unknown loss kind {kind!r}; expected one of {KINDS}")


def bucket_kd_grad(ls: torch.Tensor, lt: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """d bucket_kd / d ls, in closed form [..., B] (q_b = exp(ls_b) moves with ls_b)."""
    if kind == "fkl":   # d/dl [-p l] = -p
        return -lt.exp()
    if kind == "rkl":   # d/dl [e^l (l - a)] = q (l - a + 1)
        return ls.exp() * (ls - lt + 1)
    if kind == "jsd":   # dm/dl = (1-beta) q; the -p/m, -q/m, +1 terms cancel: (1-beta) q (l - log m)
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        return (1 - beta) * ls.exp() * (ls - lm)
    raise ValueError(f"kind: unknown loss kind {kind!r}; expected one of {KINDS}")
