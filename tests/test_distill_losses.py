"""Sparse KD losses: naive == written-out dense reference, chunked == naive (values and grads),
exact KL when top-k is the whole vocab, GKD's JSD limits, masking, bf16, bad inputs, and that
the chunked loss saves nothing of size N x V for backward."""

import math

import pytest
import torch
import torch.nn.functional as F


from distill.losses import chunked_kd_loss, hidden_mse, naive_kd_loss
from quasar_model.teacher_outputs.buckets import bucket_kd, bucket_kd_grad, student_buckets

N, V, D, K = 37, 101, 16, 8   # D < N so that lm_head_weight [V, D] is smaller than N x V


def make_case(dtype=torch.float32, tau=1.0, n=N, v=V, d=D, k=K, seed=0, masked=True):
    """Student hidden/weight and a top-k teacher captured at tau from a random full teacher."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 3
    teacher_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    lp_full = F.log_softmax(teacher_logits / tau, dim=-1)
    topk_lp, topk_ids = lp_full.topk(k, dim=-1)                          # [n, k]
    mask = torch.rand(n, generator=g) > 0.25 if masked else torch.ones(n, dtype=torch.bool)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::6] = -100
    return (h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), topk_ids, topk_lp.float(),
            mask, labels)


def dense_reference(logits, topk_ids, topk_lp, mask, kind, beta, tau):
    """Spell the loss out over the full vocab: a dense teacher (top-k + tail spread uniformly over
    the other ids), the full student softmax, and the k+1 buckets summed by hand, row by row."""
    n, v = logits.shape
    k = topk_ids.shape[1]
    q_full = torch.softmax(logits.double() / tau, dim=-1)
    total, count = 0.0, 0
    for i in range(n):
        if not mask[i]:
            continue
        ids = topk_ids[i].tolist()
        rest = [j for j in range(v) if j not in set(ids)]
        tail = 1.0 - sum(math.exp(x) for x in topk_lp[i].double().tolist())
        p_dense = torch.zeros(v, dtype=torch.float64)
        p_dense[ids] = topk_lp[i].double().exp()
        p_dense[rest] = tail / (v - k)
        p = [p_dense[j].item() for j in ids] + [p_dense[rest].sum().item()]
        q = [q_full[i, j].item() for j in ids] + [q_full[i, rest].sum().item()]
        if kind == "fkl":
            val = sum(pb * math.log(pb / qb) for pb, qb in zip(p, q))
        elif kind == "rkl":
            val = sum(qb * math.log(qb / pb) for pb, qb in zip(p, q))
        else:
            m = [beta * pb + (1 - beta) * qb for pb, qb in zip(p, q)]
            val = (beta * sum(pb * math.log(pb / mb) for pb, mb in zip(p, m))
                   + (1 - beta) * sum(qb * math.log(qb / mb) for qb, mb in zip(q, m)))
        total += val
        count += 1
    return total / count


LOSSES = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


# -----------------------------------------------------------------------------
# values against the written-out reference

@pytest.mark.parametrize("kind,beta", LOSSES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_naive_matches_dense_reference(kind, beta, tau):
    h, w, ids, lp, mask, _ = make_case(torch.float64, tau=tau)
    logits = h @ w.T
    got = naive_kd_loss(logits, ids, lp, mask, kind=kind, beta=beta, temperature=tau).item()
    ref = dense_reference(logits.detach(), ids, lp, mask, kind, beta, tau)
    assert abs(got - ref) <= 1e-5, (got, ref)


def test_stored_tail_equals_recomputed_tail():
    h, w, ids, lp, mask, _ = make_case(torch.float64)
    tail = 1 - lp.double().exp().sum(-1)
    for kind in ("fkl", "rkl", "jsd"):
        a = chunked_kd_loss(h, w, ids, lp, mask, kind=kind, chunk_size=8)
        b = chunked_kd_loss(h, w, ids, lp, mask, kind=kind, chunk_size=8, tail=tail)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_full_vocab_topk_is_exact_kl():
    # k = V: the teacher's top-k holds all its mass (tail ~ 0), so fkl is the exact full KL(p || q)
    tau = 1.5
    h, w, ids, lp, mask, _ = make_case(torch.float64, tau=tau, k=V)
    logits = h @ w.T
    p = torch.zeros(N, V, dtype=torch.float64).scatter_(1, ids, lp.double())       # log p, dense
    s = F.log_softmax(logits / tau, dim=-1)
    exact = (p.exp() * (p - s)).sum(-1)[mask].mean()
    assert (1 - lp.double().exp().sum(-1)).abs().max() < 1e-6                       # tail ~ 0
    naive = naive_kd_loss(logits, ids, lp, mask, kind="fkl", temperature=tau)
    chunk = chunked_kd_loss(h, w, ids, lp, mask, kind="fkl", temperature=tau, chunk_size=10)
    assert abs(naive.item() - exact.item()) <= 1e-5
    assert abs(chunk.item() - exact.item()) <= 1e-5
    # and so are its gradients (the clamped tails carry none)
    g_exact = torch.autograd.grad(exact, h, retain_graph=True)[0]
    g_chunk = torch.autograd.grad(chunk, h)[0]
    torch.testing.assert_close(g_chunk, g_exact, rtol=1e-4, atol=1e-6)


def test_jsd_limits_are_forward_and_reverse_kl():
    # GKD convention: JSD(beta) / beta -> KL(p || q) as beta -> 0, JSD / (1 - beta) -> KL(q || p) at 1
    h, w, ids, lp, mask, _ = make_case(torch.float64)
    logits = (h @ w.T).detach()
    fkl = naive_kd_loss(logits, ids, lp, mask, kind="fkl").item()
    rkl = naive_kd_loss(logits, ids, lp, mask, kind="rkl").item()
    eps = 1e-8   # the gap is O(beta * chi^2(p, q)), large for these far-apart random distributions
    lo = naive_kd_loss(logits, ids, lp, mask, kind="jsd", beta=eps).item() / eps
    hi = naive_kd_loss(logits, ids, lp, mask, kind="jsd", beta=1 - eps).item() / eps
    assert abs(lo - fkl) <= 1e-3 * fkl and abs(hi - rkl) <= 1e-3 * rkl


@pytest.mark.parametrize("kind,beta", LOSSES)
def test_analytic_bucket_grad_matches_autograd(kind, beta):
    g = torch.Generator().manual_seed(1)
    lsk = F.log_softmax(torch.randn(5, 20, generator=g, dtype=torch.float64), -1)[:, :K].requires_grad_()
    ls = student_buckets(lsk)
    lt = student_buckets(F.log_softmax(torch.randn(5, 20, generator=g, dtype=torch.float64), -1)[:, :K])
    ls_leaf = ls.detach().requires_grad_()
    auto = torch.autograd.grad(bucket_kd(ls_leaf, lt, kind, beta).sum(), ls_leaf)[0]
    torch.testing.assert_close(bucket_kd_grad(ls_leaf.detach(), lt, kind, beta), auto)


# -----------------------------------------------------------------------------
# chunked == naive

CONFIGS = {   # name: (temperature, ce_weight, masked)
    "plain": (1.0, 0.0, False),
    "mask+tau": (2.5, 0.0, True),
    "mask+ce": (1.0, 0.3, True),
    "mask+tau+ce": (0.7, 0.4, True),
}


def _both(dtype, kind, beta, tau, ce, masked, chunk_size, t2=False):
    h, w, ids, lp, mask, labels = make_case(dtype, tau=tau, masked=masked)
    m = mask if masked else None
    lab = labels if ce > 0 else None
    kw = dict(kind=kind, beta=beta, temperature=tau, ce_weight=ce, kd_t2_scale=t2)
    ref = naive_kd_loss(h @ w.T, ids, lp, m, lab, **kw)
    ref_g = torch.autograd.grad(ref, (h, w))
    got = chunked_kd_loss(h, w, ids, lp, m, lab, chunk_size=chunk_size, **kw)
    got_g = torch.autograd.grad(got, (h, w))
    return ref, ref_g, got, got_g


@pytest.mark.parametrize("kind,beta", LOSSES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("chunk_size", [1, 5, 37, 64])   # 5 does not divide N = 37
def test_chunked_matches_naive(kind, beta, config, chunk_size):
    tau, ce, masked = CONFIGS[config]
    ref, (rh, rw), got, (gh, gw) = _both(torch.float32, kind, beta, tau, ce, masked, chunk_size)
    assert abs(got.item() - ref.item()) <= 1e-5
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,beta", LOSSES)
def test_chunked_matches_naive_fp64_tight(kind, beta):
    ref, (rh, rw), got, (gh, gw) = _both(torch.float64, kind, beta, 1.3, 0.2, True, 6, t2=True)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)


def test_t2_scaling_and_ce_mixing():
    h, w, ids, lp, mask, labels = make_case(torch.float64, tau=2.0)
    kd = chunked_kd_loss(h, w, ids, lp, mask, temperature=2.0)
    kd_t2 = chunked_kd_loss(h, w, ids, lp, mask, temperature=2.0, kd_t2_scale=True)
    torch.testing.assert_close(kd_t2, 4 * kd)
    lam = 0.25
    mixed = chunked_kd_loss(h, w, ids, lp, mask, labels, temperature=2.0, ce_weight=lam)
    valid = mask & (labels != -100)
    ce = F.cross_entropy((h @ w.T)[valid], labels[valid])      # temperature 1, full softmax
    torch.testing.assert_close(mixed, (1 - lam) * kd + lam * ce)


def test_mask_defaults_to_labels_and_ignores_garbage_rows():
    h, w, ids, lp, mask, labels = make_case(torch.float32)
    # garbage teacher rows where masked: NaN log-probs, out-of-vocab and repeated ids
    ids_bad, lp_bad = ids.clone(), lp.clone()
    ids_bad[~mask] = V + 7
    ids_bad[~mask, 1] = ids_bad[~mask, 0]
    lp_bad[~mask] = float("nan")
    loss = chunked_kd_loss(h, w, ids_bad, lp_bad, mask, kind="jsd", chunk_size=4)
    gh, gw = torch.autograd.grad(loss, (h, w))
    keep = chunked_kd_loss(h[mask], w, ids[mask], lp[mask], kind="jsd", chunk_size=4)
    torch.testing.assert_close(loss, keep)
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all() and (gh[~mask] == 0).all()
    # no mask: labels != -100 is the mask
    lab_mask = labels != -100
    a = chunked_kd_loss(h, w, ids, lp, None, labels, chunk_size=8)
    b = chunked_kd_loss(h, w, ids, lp, lab_mask, chunk_size=8)
    torch.testing.assert_close(a, b)


def test_all_masked_gives_zero_not_nan():
    h, w, ids, lp, mask, _ = make_case(torch.float32)
    loss = chunked_kd_loss(h, w, ids, lp, torch.zeros(N, dtype=torch.bool), kind="rkl")
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0.0 and (gh == 0).all() and (gw == 0).all()


def test_leading_dims_and_neg_inf_teacher_logprobs():
    h, w, ids, lp, mask, _ = make_case(torch.float32, n=36)
    lp = lp.clone()
    lp[:, -1] = float("-inf")                  # ids outside the teacher's support
    a = chunked_kd_loss(h.view(4, 9, D), w, ids.view(4, 9, K), lp.view(4, 9, K), mask.view(4, 9),
                        kind="rkl", chunk_size=5)
    b = naive_kd_loss(h @ w.T, ids, lp, mask, kind="rkl")
    assert torch.isfinite(a)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(a, (h, w)))


def test_bf16_is_close_to_fp32():
    h, w, ids, lp, mask, labels = make_case(torch.float32, tau=2.0)
    kw = dict(kind="jsd", temperature=2.0, ce_weight=0.2, chunk_size=8)
    ref = chunked_kd_loss(h, w, ids, lp, mask, labels, **kw)
    rh, rw = torch.autograd.grad(ref, (h, w))
    hb = h.detach().bfloat16().requires_grad_()
    wb = w.detach().bfloat16().requires_grad_()
    got = chunked_kd_loss(hb, wb, ids, lp, mask, labels, **kw)
    gh, gw = torch.autograd.grad(got, (hb, wb))
    assert got.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    assert abs(got.item() - ref.item()) < 2e-2 * abs(ref.item())
    torch.testing.assert_close(gh.float(), rh, rtol=5e-2, atol=2e-2 * rh.abs().max().item())
    torch.testing.assert_close(gw.float(), rw, rtol=5e-2, atol=2e-2 * rw.abs().max().item())


# -----------------------------------------------------------------------------
# memory, structurally: nothing of size N x V is kept for backward

def _max_saved_numel(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return max(sizes)


@pytest.mark.parametrize("ce", [0.0, 0.3])
def test_chunked_saves_nothing_of_size_n_by_v(ce):
    h, w, ids, lp, mask, labels = make_case(torch.float32, tau=2.0)
    kw = dict(kind="jsd", temperature=2.0, ce_weight=ce, labels=labels if ce else None)
    chunked = _max_saved_numel(lambda: chunked_kd_loss(h, w, ids, lp, mask, chunk_size=8, **kw))
    naive = _max_saved_numel(lambda: naive_kd_loss(h @ w.T, ids, lp, mask, **kw))
    assert naive >= N * V            # the hook does see the reference's full logits
    assert chunked < N * V, chunked  # the largest is lm_head_weight itself (V x D, D < N)


# -----------------------------------------------------------------------------
# bad inputs

def _call(**over):
    h, w, ids, lp, mask, labels = make_case(torch.float32)
    args = dict(hidden=h, lm_head_weight=w, topk_ids=ids, topk_logprobs=lp, mask=mask)
    args.update(over)
    return chunked_kd_loss(**args)


def _bad_ids(fill):
    _, _, ids, *_ = make_case()
    ids = ids.clone()
    ids[0, 0] = fill
    return ids


@pytest.mark.parametrize("over,match", [
    (dict(topk_logprobs=torch.zeros(N, K + 1)), r"topk_logprobs.*k mismatch"),
    (dict(topk_logprobs=torch.zeros(N - 1, K)), r"topk_logprobs.*does not match topk_ids"),
    (dict(topk_ids=torch.zeros(N + 1, K, dtype=torch.long),
          topk_logprobs=torch.zeros(N + 1, K)), r"topk_ids.*positions"),
    (dict(topk_ids=_bad_ids(V)), r"topk_ids.*vocab.*tokenizer mapping"),
    (dict(topk_ids=_bad_ids(-3)), r"topk_ids.*negative"),
    (dict(topk_ids=_bad_ids(_bad_ids(0)[0, 1].item())), r"topk_ids.*same id twice"),
    (dict(topk_ids=torch.zeros(N, K)), r"topk_ids.*integer"),
    (dict(mask=torch.ones(N + 2, dtype=torch.bool)), r"mask.*does not match"),
    (dict(labels=torch.zeros(N - 1, dtype=torch.long)), r"labels.*does not match"),
    (dict(tail=torch.zeros(3)), r"tail.*does not match"),
    (dict(hidden=torch.zeros(N, D + 1)), r"hidden.*hidden size"),
    (dict(hidden=torch.zeros(N, D, dtype=torch.float64)), r"hidden.*dtype"),
    (dict(lm_head_weight=torch.zeros(V)), r"lm_head_weight"),
    (dict(kind="kl"), r"kind.*'fkl', 'rkl', 'jsd'"),
    (dict(kind="jsd", beta=0.0), r"beta.*\(0, 1\)"),
    (dict(kind="jsd", beta=1.0), r"beta.*\(0, 1\)"),
    (dict(kind="jsd", beta=1.5), r"beta"),
    (dict(temperature=0.0), r"temperature"),
    (dict(ce_weight=0.5), r"labels.*ce_weight"),
    (dict(ce_weight=1.5, labels=torch.zeros(N, dtype=torch.long)), r"ce_weight"),
    (dict(ce_weight=0.5, labels=torch.full((N,), V)), r"labels.*\[0, "),
    (dict(chunk_size=0), r"chunk_size"),
])
def test_bad_inputs_raise(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


def test_naive_bad_inputs_raise():
    h, w, ids, lp, mask, _ = make_case()
    with pytest.raises(ValueError, match=r"tokenizer mapping"):
        naive_kd_loss((h @ w.T)[:, : V // 2], ids.clamp(min=V // 2), lp)
    with pytest.raises(ValueError, match=r"k mismatch"):
        naive_kd_loss(h @ w.T, ids, lp[:, :-1])


# -----------------------------------------------------------------------------
# hidden-state MSE

def test_hidden_mse():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 4, generator=g)
    proj = torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    want = ((s @ proj.T - t) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(hidden_mse(s, t, proj, mask), want)
    lin = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(proj)
    torch.testing.assert_close(hidden_mse(s, t, lin, mask), want)
    torch.testing.assert_close(hidden_mse(s[..., :4], t), F.mse_loss(s[..., :4], t))
    assert hidden_mse(s, t, proj, torch.zeros_like(mask)).item() == 0.0
    # normalize: each position's error over the teacher's mean square there
    rel = ((s @ proj.T - t) ** 2).mean(-1) / (t ** 2).mean(-1)
    torch.testing.assert_close(hidden_mse(s, t, proj, mask, normalize=True), rel[mask].mean())
    torch.testing.assert_close(hidden_mse(s[..., :4], t, normalize=True),
                               (((s[..., :4] - t) ** 2).mean(-1) / (t ** 2).mean(-1)).mean())
    with pytest.raises(ValueError, match="teacher_hidden.*proj"):
        hidden_mse(s, t)
    with pytest.raises(ValueError, match="mask"):
        hidden_mse(s, t, proj, mask[0])


def test_tail_floor_keeps_gradients_finite():
    # a student that puts all its mass on the teacher's ids: its tail is floored, no NaN/inf anywhere
    h, w, ids, lp, mask, _ = make_case(torch.float32, k=V)
    for kind in ("fkl", "rkl", "jsd"):
        loss = chunked_kd_loss(h * 50, w, ids, lp, mask, kind=kind, chunk_size=16)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (h, w)))


def test_frozen_lm_head_or_hidden():
    # only the inputs that need a gradient get one (e.g. a tied, frozen head)
    h, w, ids, lp, mask, _ = make_case(torch.float32)
    ref_h, ref_w = torch.autograd.grad(chunked_kd_loss(h, w, ids, lp, mask, chunk_size=8), (h, w))
    (gh,) = torch.autograd.grad(chunked_kd_loss(h, w.detach(), ids, lp, mask, chunk_size=8), (h,))
    (gw,) = torch.autograd.grad(chunked_kd_loss(h.detach(), w, ids, lp, mask, chunk_size=8), (w,))
    torch.testing.assert_close(gh, ref_h)
    torch.testing.assert_close(gw, ref_w)
