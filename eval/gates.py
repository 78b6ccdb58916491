"""Gates: verdicts that zero a submission whatever its scores (spec "One evaluation round", step 4).

degenerate       Greedy output on the probes is dominated by a loop. For each continuation and each
                 period p in 1..8, count the tokens that merely repeat the token p positions back;
                 keep the best p per continuation. Repeating one token is the loop p = 1. If these
                 loop tokens are more than `max_repeat` of all generated tokens (summed over the
                 probes), the model is degenerate. Natural text rarely repeats at a fixed short
                 period, so it stays far below the competitions' 0.5.
exact_copy       The earliest commitment of a weight hash owns it; a later commitment of the same
                 hash is a copy.
functional_copy  A copy with its weights perturbed has a new hash but the same function. The logit
                 fingerprint is the log-softmax at fixed positions and vocabulary ids of fixed probe
                 sequences; similarity is the cosine of the two fingerprints after removing each
                 one's mean (Pearson correlation). Log-probs rather than probs: most of the
                 fingerprint then comes from tail tokens, which distillation on the teacher's top-k
                 leaves unconstrained, so independently trained students disagree there while a
                 perturbed copy does not. The correlation ignores a shift or a temperature
                 change of the logits: those are copies too.

The probes are fixed (`fingerprint_probes`), not drawn from the round seed, so a fingerprint stored
in one round is comparable with one taken in any later round.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

MAX_PERIOD = 8
PROBE_SEED = 24  # fixed for the life of a competition: stored fingerprints stay comparable


def loop_tokens(tokens: Sequence[int], max_period: int = MAX_PERIOD) -> int:
    """How many tokens of one continuation repeat the token p back, for the best period p <= max_period."""
    n, best = len(tokens), 0
    for p in range(1, min(max_period, n - 1) + 1):
        best = max(best, sum(tokens[t] == tokens[t - p] for t in range(p, n)))
    return best


def degenerate(token_lists: Sequence[Sequence[int]], max_repeat: float, max_period: int = MAX_PERIOD) -> bool:
    """True when loops fill more than `max_repeat` of the generated tokens across all probes.

    No generated tokens at all is not judged here (False): such a model scores 0 on recall anyway.
    """
    if not 0 < max_repeat <= 1:
        raise ValueError(f"max_repeat must be in (0, 1], got {max_repeat}")
    total = sum(len(t) for t in token_lists)
    if total == 0:
        return False
    return sum(loop_tokens(t, max_period) for t in token_lists) / total > max_repeat


def exact_copy(model_hash: str, commit_block: int, earlier: Mapping[str, int]) -> bool:
    """True when `earlier` (hash -> block of its earliest commitment) shows this hash committed before.

    A commitment in the same block is not a copy: the hash was not public before that block.
    (Two hotkeys committing one hash in one block are one owner's duplicate; the round ranking
    credits the first of them by hotkey order.)
    """
    first = earlier.get(model_hash)
    return first is not None and first < commit_block


def _as_vector(fp, what: str) -> torch.Tensor:
    v = torch.as_tensor(fp, dtype=torch.float64).flatten()
    if v.numel() < 2:
        raise ValueError(f"{what}: a fingerprint needs at least 2 values, got {v.numel()}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{what}: fingerprint has non-finite values")
    return v


def fingerprint_similarity(a, b) -> float:
    """Pearson correlation of two fingerprints, in [-1, 1]; 1 = the same function up to shift/scale."""
    x, y = _as_vector(a, "first"), _as_vector(b, "second")
    if x.numel() != y.numel():
        raise ValueError(f"fingerprints differ in length ({x.numel()} vs {y.numel()}): taken on different probes")
    x, y = x - x.mean(), y - y.mean()
    nx, ny = x.norm(), y.norm()
    if nx == 0 or ny == 0:
        # a constant fingerprint is a model that ignores its input: equal only to another constant one
        return 1.0 if nx == ny else 0.0
    return float((x @ y / (nx * ny)).clamp(-1.0, 1.0))


def functional_copy(fp, earlier_fps: Mapping[str, object], threshold: float) -> str | None:
    """The key of the earlier fingerprint most similar to `fp` if that similarity is above threshold, else None.

    `earlier_fps` holds fingerprints of models committed before this one (key: their model hash).
    threshold = 1 switches the gate off (a correlation cannot exceed 1).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    best_key, best = None, -math.inf
    for key, other in earlier_fps.items():
        s = fingerprint_similarity(fp, other)
        if s > best:
            best_key, best = key, s
    return best_key if best > threshold else None


def fingerprint_probes(count: int, length: int, vocab_size: int, seed: int = PROBE_SEED) -> torch.Tensor:
    """`count` fixed token sequences of `length` uniform random ids: off-distribution input, where
    models differ most in their own idiosyncratic ways."""
    if count < 1 or length < 1 or vocab_size < 2:
        raise ValueError(f"probes need count, length >= 1 and vocab_size >= 2, got {count}, {length}, {vocab_size}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=g)


@torch.no_grad()
def logit_fingerprint(model, probes: torch.Tensor, positions: int = 8, ids: int = 64) -> torch.Tensor:
    """log-softmax over the full vocabulary at the last `positions` positions of each probe, kept at
    `ids` vocabulary ids spread evenly over the vocabulary; flat float32 [count * positions * ids]."""
    probes = torch.as_tensor(probes, dtype=torch.long)
    if probes.dim() != 2 or probes.shape[1] < positions:
        raise ValueError(f"probes must be [count, length >= positions={positions}], got shape {tuple(probes.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # only the kept positions reach the LM head: a 150k vocabulary makes full logits the memory peak
        out = model(input_ids=probes.to(device), use_cache=False, logits_to_keep=positions)
        logits = out.logits[:, -positions:].float()
    finally:
        model.train(was_training)
    vocab = logits.shape[-1]
    keep = torch.arange(min(ids, vocab), device=logits.device) * (vocab // min(ids, vocab))
    return torch.log_softmax(logits, dim=-1)[..., keep].flatten().cpu()


__all__ = ["MAX_PERIOD", "PROBE_SEED", "loop_tokens", "degenerate", "exact_copy", "fingerprint_similarity",
           "functional_copy", "fingerprint_probes", "logit_fingerprint"]
