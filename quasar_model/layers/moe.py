"""Mixture of Experts with bias-balanced (auxiliary-loss-free) routing.

Routing (DeepSeek-V3 style):
    s      = sigmoid(W_gate x)                      fp32, [N, E]
    pick   = top-k of (s + b) restricted to the best `topk_group` of `n_group`
             groups, a group scored by the sum of its top-2 biased scores
    weight = s[pick] / sum(s[pick]) * routed_scaling_factor      (unbiased!)
    y      = sum_j weight_j * Expert_{pick_j}(x)  +  SharedExpert(x)

Variants, for teachers routed otherwise (default off): score="softmax" takes
s = softmax(W_gate x) over all experts (Qwen-MoE); norm_topk_prob=False keeps
weight = s[pick] * routed_scaling_factor unnormalised; shared_gate multiplies
the shared expert's output by sigmoid(w_g . x), one scalar per token; and
shared_intermediate_size sets the shared expert's width directly.

The bias b only decides *which* experts a token goes to, never how much they
count, so it balances the load without distorting the function the model
computes and without a gradient-carrying auxiliary loss. b is a buffer, moved
by `update_bias()` from the loads counted since the previous call:

    smebu (default):  v = (n_mean - n) / n_mean
                      d = lambda * tanh(kappa * v) - mean     (bounded, smooth)
                      m = beta * m + (1 - beta) * d           (momentum)
                      b = clip(b + m, +-10) - mean
    sign (DeepSeek-V3): b += gamma * sign(n_mean - n)
    none:               b stays 0

Expert compute is loop-free over experts: all (token, slot) assignments are
sorted by expert, and the experts run as two grouped matmuls over the sorted
rows (`torch._grouped_mm`, or a padded [E, capacity, hidden] bmm where that
kernel is not usable), then the results are index_add-ed back to their tokens.
`_experts_loop` is the slow, obviously-correct reference.

Parameters (names matter for init / checkpoint code):
    gate.weight       [E, hidden]          router, an nn.Linear (no bias)
    gate_up_proj      [E, hidden, 2 * I]   per-expert [gate | up], x @ W layout
    down_proj         [E, I, hidden]       per-expert down, x @ W layout
    shared_experts.*  SwiGLU(hidden, I * num_shared_experts), or None
    shared_expert_gate.weight [1, hidden]  with shared_gate only
Buffers:
    expert_bias       [E] fp32, persistent  (b)
    bias_momentum     [E] fp32, persistent  (m, smebu only)
    tokens_per_expert [E] int64, non-persistent: loads since last update_bias
    last_window_counts[E] int64, non-persistent: loads used by last update_bias
    last_counts       [E] int64, non-persistent: loads of the latest forward
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .loading import load_
from .mlp import SwiGLU

BALANCING = ("smebu", "sign", "none")
SCORES = ("sigmoid", "softmax")
DISPATCH = ("auto", "grouped_mm", "padded", "loop")


# --------------------------------------------------------------------------
# routing rule


def route(scores, bias, top_k, n_group, topk_group):
    """Pick experts by biased score inside the best groups.

    scores: [N, E] fp32 expert scores (sigmoid or softmax); bias: [E].
    Returns (topk_idx [N, k] int64, topk_weight [N, k] fp32) where the weight is
    the *unbiased* score of each chosen expert, not yet normalised.
    """
    N, E = scores.shape
    biased = scores + bias.to(scores.dtype)  # [N, E], used for selection only
    if n_group > 1:
        per_group = E // n_group
        # a group's strength = sum of its best two biased scores (one expert
        # alone does not make a group worth opening)
        group_scores = biased.view(N, n_group, per_group)
        group_scores = group_scores.topk(min(2, per_group), dim=-1).values.sum(-1)  # [N, G]
        group_idx = group_scores.topk(topk_group, dim=-1).indices  # [N, topk_group]
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool)
        group_keep.scatter_(1, group_idx, True)  # [N, G]
        expert_keep = group_keep.repeat_interleave(per_group, dim=1)  # [N, E]
        # -inf, not 0: the bias can push scores below zero
        biased = biased.masked_fill(~expert_keep, float("-inf"))
    topk_idx = biased.topk(top_k, dim=-1, sorted=False).indices  # [N, k]
    topk_weight = scores.gather(1, topk_idx)  # [N, k] unbiased
    return topk_idx, topk_weight


# --------------------------------------------------------------------------
# expert compute: reference loop and loop-free grouped dispatch
#
# All take x [N, hidden], topk_idx [N, k], topk_weight [N, k] (final combine
# weights), gate_up_proj [E, hidden, 2I], down_proj [E, I, hidden] and return
# the weighted sum over each token's experts, [N, hidden] in fp32.


def _experts_loop(x, topk_idx, topk_weight, gate_up_proj, down_proj):
    """Reference: one small matmul pair per expert (a Python loop over E)."""
    N, H = x.shape
    y = torch.zeros(N, H, device=x.device, dtype=torch.float32)
    for e in range(gate_up_proj.shape[0]):
        tok, slot = (topk_idx == e).nonzero(as_tuple=True)  # [n_e], [n_e]
        if tok.numel() == 0:
            continue
        h = x[tok].to(gate_up_proj.dtype) @ gate_up_proj[e]  # [n_e, 2I]
        g, u = h.chunk(2, dim=-1)
        out = (F.silu(g) * u) @ down_proj[e]  # [n_e, H]
        y = y.index_add(0, tok, out.float() * topk_weight[tok, slot, None])
    return y


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming grad contiguous.

    torch._grouped_mm's backward rejects odd-strided grads (e.g. the stride-0
    grad of `y.sum()`), so every grouped_mm output passes through this.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _gmm(x, w, offs):
    # x: [rows, in] sorted by group, w: [G, in, out], offs: [G] int32 cumulative
    # row ends -> [rows, out], row r multiplied by the w of its group
    return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offs))


def _experts_sorted(x, topk_idx, topk_weight, gate_up_proj, down_proj, dispatch, counts=None):
    """Loop-free dispatch: sort assignments by expert, grouped matmuls, scatter back."""
    N, k = topk_idx.shape
    E, H, _ = gate_up_proj.shape
    flat = topk_idx.reshape(-1)  # [N*k] expert of each (token, slot)
    order = torch.argsort(flat, stable=True)  # [N*k] rows grouped by expert
    token_of = order // k  # [N*k] source token of each sorted row
    if counts is None:
        counts = torch.bincount(flat, minlength=E)  # [E]
    xs = x[token_of].to(gate_up_proj.dtype)  # [N*k, H] tokens, copied per slot
    # combine weight of each sorted row, applied *before* the down projection
    # (it is linear): a multiply over [N*k, I] instead of [N*k, H]
    w = topk_weight.reshape(-1)[order].to(gate_up_proj.dtype)[:, None]  # [N*k, 1]

    if dispatch == "grouped_mm":
        offs = counts.cumsum(0).to(torch.int32)  # [E] end row of each expert
        h = _gmm(xs, gate_up_proj, offs)  # [N*k, 2I]
        g, u = h.chunk(2, dim=-1)
        out = _gmm(F.silu(g) * (u * w), down_proj, offs)  # [N*k, H], already weighted
    elif dispatch == "padded":
        # scatter the sorted rows into an [E, C, H] slab (C = busiest expert's
        # row count, zero padding elsewhere) and run two plain bmm's
        expert_of = flat[order]  # [N*k] ascending
        start = counts.cumsum(0) - counts  # [E] first row of each expert
        pos = torch.arange(N * k, device=x.device) - start[expert_of]  # [N*k] slot in its expert
        C = int(counts.max())
        xp = xs.new_zeros(E, C, H).index_put((expert_of, pos), xs)  # [E, C, H]
        h = torch.bmm(xp, gate_up_proj)  # [E, C, 2I]
        g, u = h.chunk(2, dim=-1)
        wp = w.new_zeros(E, C, 1).index_put((expert_of, pos), w)  # [E, C, 1]
        o = torch.bmm(F.silu(g) * (u * wp), down_proj)  # [E, C, H]; padded rows stay 0
        out = o[expert_of, pos]  # [N*k, H], already weighted
    else:
        raise ValueError(f"dispatch: unknown {dispatch!r}")

    # accumulate the k contributions per token in fp32, in the original order
    y = torch.zeros(N, H, device=x.device, dtype=torch.float32)
    return y.index_add(0, token_of, out.float())


_GMM_OK = {}


@torch.compiler.disable
def _grouped_mm_ok(device, dtype, hidden, inter):
    """Can torch._grouped_mm run fwd+bwd, correctly, for this device/dtype/shape?

    Shapes matter: bf16 on CPU needs 16-byte aligned row strides, i.e. hidden
    and inter multiples of 8. Probed once with a tiny problem, then cached.
    Uses deterministic inputs so the caller's RNG stream is not consumed.
    """
    key = (device.type, dtype, hidden, inter)
    if key not in _GMM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                # the caller may sit in no_grad / inference_mode / autocast
                with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                    kw = dict(device=device, dtype=dtype)
                    x = torch.linspace(-1, 1, 4 * hidden, **kw).view(4, hidden).requires_grad_()
                    w1 = torch.linspace(-1, 1, 2 * hidden * 2 * inter, **kw).view(2, hidden, 2 * inter) / hidden**0.5
                    w2 = torch.linspace(1, -1, 2 * inter * hidden, **kw).view(2, inter, hidden) / inter**0.5
                    w1.requires_grad_()
                    w2.requires_grad_()
                    idx = torch.tensor([[0], [1], [1], [1]], device=device)
                    wt = torch.ones(4, 1, device=device)
                    y = _experts_sorted(x, idx, wt, w1, w2, "grouped_mm")
                    y.sum().backward()
                    ref = _experts_loop(x.detach(), idx, wt, w1.detach(), w2.detach())
                    tol = 1e-3 if dtype == torch.float32 else 5e-2
                    ok = bool(torch.allclose(y.detach(), ref, rtol=tol, atol=tol * ref.abs().max().item()))
                    ok = ok and all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, w1, w2))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GMM_OK[key] = ok
    return _GMM_OK[key]


# --------------------------------------------------------------------------
# the layer


class MoE(nn.Module):
    def __init__(
        self,
        hidden_size,
        moe_intermediate_size,
        num_experts,
        num_experts_per_tok,
        num_shared_experts,
        n_group,
        topk_group,
        routed_scaling_factor,
        balancing="smebu",
        smebu_kappa=2.0,
        smebu_lambda=2e-3,
        smebu_beta=0.5,
        sign_gamma=1e-3,
        dispatch="auto",
        score="sigmoid",
        norm_topk_prob=True,
        shared_intermediate_size=None,
        shared_gate=False,
    ):
        super().__init__()
        for name, value, low in (
            ("hidden_size", hidden_size, 1),
            ("moe_intermediate_size", moe_intermediate_size, 1),
            ("num_experts", num_experts, 1),
            ("num_experts_per_tok", num_experts_per_tok, 1),
            ("num_shared_experts", num_shared_experts, 0),
            ("n_group", n_group, 1),
            ("topk_group", topk_group, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if num_experts % n_group != 0:
            raise ValueError(f"n_group ({n_group}) must divide num_experts ({num_experts})")
        if topk_group > n_group:
            raise ValueError(f"topk_group ({topk_group}) must be <= n_group ({n_group})")
        reachable = topk_group * (num_experts // n_group)
        if num_experts_per_tok > reachable:
            raise ValueError(
                f"num_experts_per_tok ({num_experts_per_tok}) exceeds the {reachable} experts "
                f"in the kept groups (topk_group * num_experts / n_group)"
            )
        if not routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {routed_scaling_factor!r}")
        if balancing not in BALANCING:
            raise ValueError(f"balancing must be one of {BALANCING}, got {balancing!r}")
        if not 0.0 <= smebu_beta < 1.0:
            raise ValueError(f"smebu_beta must be in [0, 1), got {smebu_beta!r}")
        if not smebu_kappa > 0:
            raise ValueError(f"smebu_kappa must be > 0, got {smebu_kappa!r}")
        if smebu_lambda < 0:
            raise ValueError(f"smebu_lambda must be >= 0, got {smebu_lambda!r}")
        if sign_gamma < 0:
            raise ValueError(f"sign_gamma must be >= 0, got {sign_gamma!r}")
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch must be one of {DISPATCH}, got {dispatch!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if shared_intermediate_size is not None and (
            not isinstance(shared_intermediate_size, int) or shared_intermediate_size < 1 or num_shared_experts < 1
        ):
            raise ValueError(f"shared_intermediate_size must be an int >= 1 with num_shared_experts >= 1, "
                             f"got {shared_intermediate_size!r}")
        if shared_gate and num_shared_experts < 1:
            raise ValueError("shared_gate needs num_shared_experts >= 1")

        self.hidden_size = hidden_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.top_k = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.balancing = balancing
        self.smebu_kappa = float(smebu_kappa)
        self.smebu_lambda = float(smebu_lambda)
        self.smebu_beta = float(smebu_beta)
        self.sign_gamma = float(sign_gamma)
        self.dispatch = dispatch
        self.score = score
        self.norm_topk_prob = bool(norm_topk_prob)

        E, H, I = num_experts, hidden_size, moe_intermediate_size
        self.gate = nn.Linear(H, E, bias=False)  # router
        # stacked expert weights, x @ W layout so grouped_mm/bmm need no transpose
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))  # [E, H, 2I] = [gate | up]
        self.down_proj = nn.Parameter(torch.empty(E, I, H))  # [E, I, H]
        shared_width = shared_intermediate_size or I * num_shared_experts
        self.shared_experts = SwiGLU(H, shared_width) if num_shared_experts > 0 else None
        self.shared_expert_gate = nn.Linear(H, 1, bias=False) if shared_gate else None

        # balancing state: buffers, so no optimizer or autograd ever touches them
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)
        self.register_buffer("bias_momentum", torch.zeros(E), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.long), persistent=False)
        self.register_buffer("last_window_counts", torch.zeros(E, dtype=torch.long), persistent=False)
        self.register_buffer("last_counts", torch.zeros(E, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std=0.02):
        # same scheme an HF `_init_weights` applies to nn.Linear: N(0, std)
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=std)

    @torch.no_grad()
    def load_weights(self, router, gate_up, down, *, expert_bias=None, shared=None, shared_gate=None,
                     name: str = "ffn") -> None:
        """Another MoE's, the experts in nn.Linear's layout (transposed here to x @ W): router [E, hidden];
        gate_up [E, 2I, hidden] ([gate | up] rows), down [E, hidden, I]; expert_bias a selection-only
        bias (b's role); shared (gate, up, down) of the shared expert; shared_gate [1, hidden]."""
        load_(self.gate.weight, router, f"{name}.gate.weight")
        load_(self.gate_up_proj, gate_up.transpose(1, 2), f"{name}.gate_up_proj")
        load_(self.down_proj, down.transpose(1, 2), f"{name}.down_proj")
        if expert_bias is not None:
            load_(self.expert_bias, expert_bias, f"{name}.expert_bias")
        for part, given, mine in (("shared_experts", shared, self.shared_experts),
                                  ("shared_expert_gate", shared_gate, self.shared_expert_gate)):
            if given is not None and mine is None:
                raise ValueError(f"{name}: the teacher's MoE has {part}, the student's has none "
                                 "(moe_shared_expert_gate / num_shared_experts differ)")
        if shared is not None:
            self.shared_experts.load_weights(*shared, name=f"{name}.shared_experts")
        if shared_gate is not None:
            load_(self.shared_expert_gate.weight, shared_gate, f"{name}.shared_expert_gate.weight")

    @torch.no_grad()
    def upcycle(self, gate, up, down, name: str = "ffn") -> None:
        """A dense SwiGLU (nn.Linear's layout) as this MoE's start. It becomes the shared expert, and
        routed expert e starts as slice e mod (I / I_moe) of its hidden units, writing nothing (down = 0):
        the layer's output is the dense one's, and the experts grow from known features."""
        if self.shared_experts is None:
            raise ValueError(f"{name}: upcycling a dense MLP needs a shared expert (num_shared_experts >= 1)")
        self.shared_experts.load_weights(gate, up, down, name=f"{name}.shared_experts")
        I_moe = self.moe_intermediate_size
        n_slices = gate.shape[0] // I_moe
        for e in range(self.num_experts):
            rows = slice((e % n_slices) * I_moe, (e % n_slices + 1) * I_moe)
            load_(self.gate_up_proj[e], torch.cat([gate[rows], up[rows]]).t(), f"{name}.gate_up_proj[{e}]")
        self.down_proj.zero_()

    def _apply(self, fn, *args, **kwargs):
        # model.to(bfloat16) would cast the balancing state too; bf16 cannot
        # hold b + 1e-3 steps, so keep b and m in fp32 (device moves still apply)
        keep = {n: getattr(self, n) for n in ("expert_bias", "bias_momentum")}
        super()._apply(fn, *args, **kwargs)
        for n, t in keep.items():
            setattr(self, n, t.to(device=getattr(self, n).device, dtype=torch.float32))
        return self

    # ---- forward -----------------------------------------------------------

    def _resolve_dispatch(self, device, dtype):
        if self.dispatch != "auto":
            return self.dispatch
        ok = _grouped_mm_ok(device, dtype, self.hidden_size, self.moe_intermediate_size)
        return "grouped_mm" if ok else "padded"

    def forward(self, x, token_mask=None):
        # x: [B, T, H]; token_mask: [B, T] bool, False = padding
        B, T, H = x.shape
        xf = x.reshape(B * T, H)
        if token_mask is not None:
            # padding is not routed at all: no expert compute, no load
            rows = token_mask.reshape(B * T).nonzero().squeeze(1)  # [N]
            xr = xf[rows]
        else:
            rows, xr = None, xf
        N = xr.shape[0]

        if N > 0:
            logits = F.linear(xr.float(), self.gate.weight.float())  # [N, E] fp32
            scores = torch.sigmoid(logits) if self.score == "sigmoid" else torch.softmax(logits, dim=-1)
            topk_idx, topk_w = route(scores, self.expert_bias, self.top_k, self.n_group, self.topk_group)
            if self.norm_topk_prob:
                topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
            topk_w = topk_w * self.routed_scaling_factor
            counts = torch.bincount(topk_idx.reshape(-1), minlength=self.num_experts)  # [E]

            with torch.no_grad():
                self.last_counts.copy_(counts)
                if self.training:
                    # (activation checkpointing recomputes forwards and counts
                    # twice; both balancing rules are invariant to scaling n)
                    self.tokens_per_expert.add_(counts)

            dispatch = self._resolve_dispatch(x.device, self.gate_up_proj.dtype)
            if dispatch == "loop":
                routed = _experts_loop(xr, topk_idx, topk_w, self.gate_up_proj, self.down_proj)
            else:
                routed = _experts_sorted(
                    xr, topk_idx, topk_w, self.gate_up_proj, self.down_proj, dispatch, counts
                )  # [N, H] fp32
            if rows is not None:  # back to the padded layout, padding rows 0
                routed = routed.new_zeros(B * T, H).index_add(0, rows, routed)
            y = routed
        else:
            with torch.no_grad():
                self.last_counts.zero_()
            y = torch.zeros(B * T, H, device=x.device, dtype=torch.float32)

        if self.shared_experts is not None:
            shared = self.shared_experts(xf).float()
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(xf).float())  # [B*T, 1]
            y = y + shared
        return y.to(x.dtype).view(B, T, H)

    # ---- balancing -----------------------------------------------------------

    @torch.no_grad()
    def update_bias(self, sync=True):
        """Move b from the loads counted since the last call; call after optimizer.step().

        With torch.distributed initialised (and sync=True) the counts are summed
        over ranks first so every replica keeps the same b.
        """
        counts = self.tokens_per_expert.clone()
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.last_window_counts.copy_(counts)
        self.tokens_per_expert.zero_()
        if self.balancing == "none" or counts.sum() == 0:
            return

        n = counts.float()  # [E]
        n_mean = n.mean()
        b = self.expert_bias
        if self.balancing == "smebu":
            v = (n_mean - n) / n_mean  # > 0 under-loaded, < 0 over-loaded
            # tanh: proportional for small imbalance, bounded step for large
            delta = self.smebu_lambda * torch.tanh(self.smebu_kappa * v)
            delta -= delta.mean()  # only relative bias matters
            m = self.bias_momentum
            m.mul_(self.smebu_beta).add_((1.0 - self.smebu_beta) * delta)
            b.add_(m).clamp_(-10.0, 10.0)
            b.sub_(b.mean())
        else:  # sign
            b.add_(self.sign_gamma * torch.sign(n_mean - n))

    def load_stats(self, counts=None):
        """{'max_over_mean', 'cv'} of expert loads (1.0 / 0.0 = perfect balance).

        Default window: the loads counted since the last update_bias(), or, if
        none yet, the window that update_bias() last consumed.
        """
        if counts is None:
            counts = self.tokens_per_expert
            if counts.sum() == 0:
                counts = self.last_window_counts
        n = counts.float()
        mean = n.mean()
        if mean == 0:
            return {"max_over_mean": float("nan"), "cv": float("nan")}
        return {
            "max_over_mean": (n.max() / mean).item(),
            "cv": (n.std(unbiased=False) / mean).item(),
        }

    def load_imbalance(self, counts=None):
        """max_i n_i / mean(n) over the window of `load_stats`; 1.0 = perfect."""
        return self.load_stats(counts)["max_over_mean"]

    def extra_repr(self):
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, groups={self.topk_group}/{self.n_group}, "
            f"shared={self.num_shared_experts}, scale={self.routed_scaling_factor}, score={self.score}, "
            f"balancing={self.balancing}, dispatch={self.dispatch}"
        )
