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
                 reading is the log-softmax at the last positions of probe sequences, at a set of
                 vocabulary ids per position. Every honest student approaches the teacher, so the
                 part of a reading the teacher's own reading explains says nothing about copying:
                 the fingerprint is the reading, centred, with its component along the teacher's
                 centred reading projected out (`without_teacher`). Similarity is the cosine of two
                 fingerprints after removing each one's mean (Pearson correlation; on these, the
                 partial correlation given the teacher). It ignores a shift or a temperature
                 change of the logits: those are copies too. Log-probs rather than probs: most of
                 the reading then comes from tail tokens, which distillation on the teacher's
                 top-k leaves unconstrained, so independently trained students disagree there
                 while a perturbed copy does not.
teacher          The teacher itself (or a student built to compute its function): the same
                 similarity between the raw log-softmax readings of the submission and the teacher
                 on the same probes and ids.

Probes and ids come from the round seed (`fingerprint_probes`, `fingerprint_ids`): uniform random
token sequences, and per probe position the teacher's top tokens there plus ids drawn uniformly
over the whole vocabulary. With fixed public probes and ids a copier could perturb just the
`lm_head` rows read, or fine-tune just enough to move those log-probs; drawn fresh each round
from a seed revealed after the commitments, nothing short of changing the whole function moves
the fingerprint. The cost: a fingerprint is only comparable with one taken on the same round's
probes, so every comparison is between models scored in the same round (the validator scores
the leader and every eligible submission each round).
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

import torch

from eval.budget import FP_POSITIONS  # last positions of each probe read (the token plan counts them)

MAX_PERIOD = 8
FP_TOP = 16        # the teacher's most likely ids per position: where KL is scored, a copy must keep them
FP_SPREAD = 48     # seeded ids over the whole vocabulary per position: the tail where students differ
PROBE_CHUNK = 8    # probes per forward: a 250k vocabulary makes [probes, positions, V] the memory peak


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

    A commitment in the same block is not a later copy: the hash was not public before that block.
    (Two hotkeys committing one hash in one block share its first commitment; the round ranking
    gates all of them, eval.scoring.)
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


def derived_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one use of the round seed, independent of every other use of it."""
    return int.from_bytes(hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:8], "big") >> 1


def fingerprint_probes(count: int, length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """`count` token sequences of `length` uniform random ids drawn from the round seed: off-distribution
    input, where models differ most in their own idiosyncratic ways."""
    if count < 1 or length < FP_POSITIONS or vocab_size < 2:
        raise ValueError(f"probes need count >= 1, length >= {FP_POSITIONS} and vocab_size >= 2, "
                         f"got {count}, {length}, {vocab_size}")
    g = torch.Generator().manual_seed(derived_seed(seed, "fingerprint-probes"))
    return torch.randint(0, vocab_size, (count, length), generator=g)


@torch.no_grad()
def _probe_logprobs(model, probes: torch.Tensor):
    """Yields (first probe, log-softmax [c, FP_POSITIONS, V] float32) over chunks of the probes."""
    probes = torch.as_tensor(probes, dtype=torch.long)
    if probes.dim() != 2 or probes.shape[1] < FP_POSITIONS:
        raise ValueError(f"probes must be [count, length >= {FP_POSITIONS}], got shape {tuple(probes.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for a in range(0, probes.shape[0], PROBE_CHUNK):
            # only the kept positions reach the LM head
            out = model(input_ids=probes[a:a + PROBE_CHUNK].to(device), use_cache=False, logits_to_keep=FP_POSITIONS)
            yield a, torch.log_softmax(out.logits[:, -FP_POSITIONS:].float(), dim=-1)
    finally:
        model.train(was_training)


def fingerprint_ids(teacher, probes: torch.Tensor, seed: int, vocab_size: int, top: int = FP_TOP,
                    spread: int = FP_SPREAD) -> torch.Tensor:
    """The vocabulary ids read at each probe position, [count, FP_POSITIONS, top + spread]: the
    teacher's `top` most likely ids there, then `spread` ids drawn from the round seed over the whole
    vocabulary (repeats allowed: a draw is cheaper than a permutation of 250k ids). Only ids below
    `vocab_size` (the student's) are read: a teacher's LM head may carry padding rows past it."""
    out = []
    g = torch.Generator().manual_seed(derived_seed(seed, "fingerprint-ids"))
    for _, lp in _probe_logprobs(teacher, probes):
        if lp.shape[-1] < vocab_size:
            raise ValueError(f"the teacher reads {lp.shape[-1]} ids, fewer than the student's vocab_size {vocab_size}")
        best = lp[..., :vocab_size].topk(min(top, vocab_size), dim=-1).indices.cpu()
        drawn = torch.randint(0, vocab_size, (*best.shape[:2], spread), generator=g)
        out.append(torch.cat([best, drawn], dim=-1))
    return torch.cat(out)


def logit_fingerprint(model, probes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log-softmax over the full vocabulary at the last FP_POSITIONS positions of each probe, read at
    `ids` ([count, FP_POSITIONS, n], fingerprint_ids); flat float32 [count * FP_POSITIONS * n]."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 3 or ids.shape[:2] != (len(probes), FP_POSITIONS):
        raise ValueError(f"ids must be [{len(probes)}, {FP_POSITIONS}, n] for these probes, got {tuple(ids.shape)}")
    out = []
    for a, lp in _probe_logprobs(model, probes):
        chunk = ids[a:a + lp.shape[0]].to(lp.device)
        if int(chunk.max()) >= lp.shape[-1]:
            raise ValueError(f"fingerprint id {int(chunk.max())} is outside the model's {lp.shape[-1]}-id vocabulary")
        out.append(lp.gather(-1, chunk).flatten().cpu())
    return torch.cat(out)


def without_teacher(reading, teacher_reading) -> torch.Tensor:
    """The fingerprint of a model: its centred reading minus its projection on the teacher's centred reading."""
    x, t = _as_vector(reading, "reading"), _as_vector(teacher_reading, "teacher reading")
    if x.numel() != t.numel():
        raise ValueError(f"readings differ in length ({x.numel()} vs {t.numel()}): taken on different probes")
    x, t = x - x.mean(), t - t.mean()
    if t.norm() == 0:  # a teacher indifferent to its input explains nothing
        return x
    t = t / t.norm()
    return x - (x @ t) * t


__all__ = ["MAX_PERIOD", "FP_POSITIONS", "FP_TOP", "FP_SPREAD", "loop_tokens", "degenerate", "exact_copy",
           "fingerprint_similarity", "functional_copy", "derived_seed", "fingerprint_probes", "fingerprint_ids",
           "logit_fingerprint", "without_teacher"]
