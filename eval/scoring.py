"""The scoring rule: per-item results of one round -> gates, composite, leader, weights.

Utility of one item, in [0, 1] (1 = as good as it gets):
    kl      u = exp(-KL)                          KL of the document, nats/token; 1 = the teacher
    ce      u = exp(-max(0, CE - teacher_CE))     the gap to the teacher on that document;
            u = exp(-CE) when the teacher's CE is unknown (then only comparable between students)
    recall  u = 1 or 0                            greedy exact match
    A non-finite value (an overflowing model) is utility 0; a slightly negative KL or gap from
    rounding is clipped to 0 so no item is worth more than 1.
    exp(-x) turns an unbounded loss into a bounded utility: one catastrophic document cannot
    outweigh the rest, and gains near the teacher (small x) count almost linearly.

Composite of a submission:
    composite = sum_a w_a * mean_i u_{a,i} / sum_a w_a      over axes a with items and w_a > 0
    w = the competition's score.weights (they sum to 1). An axis with no items this round drops
    out and the others are renormalised, so a round without, say, CE items still ranks on [0, 1].

Gates (eval.gates): degenerate output, exact copy (same weight hash, later commitment), teacher
(correlation of the logit readings with the teacher's own on the same probes > teacher_threshold),
functional copy (correlation > functional_copy_threshold with an earlier-committed model
scored in the same round: fingerprints are taken on the round's probes, so only those of one
round are comparable). A gated submission gets composite 0, is never leader and gets no weight.
Order of commitment is (commit block, hotkey): within one block the lower hotkey counts as first,
so one owner cannot multiply a model over hotkeys by committing it several times in the same block.

Leader. The previous leader (its model hash) is re-scored on the same items every round. A
challenger takes the crown only when
    LB = lower (1 - confidence) quantile of the paired bootstrap of composite(ch) - composite(leader)
    LB > margin.
The bootstrap resamples item ids with replacement within each axis (stratified: every resample
keeps each axis's item count, so the axis weights stay as defined) and pairs the two submissions
on the same (axis, item id), so the per-item difficulty the two share cancels out. Axes scored on
the same ids (kl and ce of one document) are resampled together, keeping their correlation. Because the composite is
linear in the per-axis means, composite(ch) - composite(leader) = composite of the per-item
differences, which is what is resampled. Every comparison uses the same resamples (one seed per
round). Among challengers statistically indistinguishable from each other, the earliest commitment
wins: the challengers are taken in commitment order, and each replaces the one holding the crown so
far (the previous leader to begin with) only when it clears the bar against that one. So a copy
fine-tuned to escape the fingerprint gate, committed after its source, cannot take the crown by
noise: it must beat the source by the margin. With no previous leader in the round (first round,
deregistered, re-committed or gated), the earliest-committed ungated submission (the best of its
block) starts as the holder.
Why: a challenger better by less than the margin, or equal to the leader and lucky on the items,
must not take the crown (equal models dethrone in at most 1 - confidence of rounds even at margin
0); a clearly better one wins in the round it is first scored. Items are fresh every round (the
seed), so a model tuned on revealed items gains nothing.

Weights. Ranked order: leader, then ungated submissions by composite. Round target:
    t_r = decay^r / sum_{r' < k} decay^{r'}   for rank r < k = schedule.weights_top_k, else 0
with decay <= 0.5, so the leader always holds at least half of the round's target (k = 1: all).
Per hotkey, state_h <- alpha * t_h + (1 - alpha) * state_h with alpha = score.ema_alpha; a gated
hotkey's state is reset to 0 (a gate is a verdict, not a noisy score); hotkeys no longer
registered are dropped. Weights sent = state normalised to sum 1. The EMA smooths a new leader in
over a few rounds, so weights do not swing on one round, and validators that disagree on one round
still agree on the trend. The state is a plain {hotkey: float} the validator persists.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from eval.competition import ScoreSpec
from eval.gates import degenerate, exact_copy, functional_copy
from eval.results import AXES, ItemResult, SubmissionResult

MAX_DECAY = 0.5  # at most this, the leader's target share is at least one half


# ------------------------------------------------------------------ utilities and the composite
def utility(item: ItemResult) -> float:
    v = item.value
    if not math.isfinite(v):
        return 0.0
    if item.axis == "recall":
        return v
    gap = v - item.teacher_ce if item.axis == "ce" and item.teacher_ce is not None else v
    return math.exp(-max(0.0, gap))


def _axis_weights(weights: Mapping[str, float], present: Iterable[str]) -> dict[str, float]:
    """The weights of the axes that have items this round, renormalised to sum 1."""
    unknown = sorted(set(weights) - set(AXES))
    if unknown:
        raise ValueError(f"weights name unknown axes {unknown}; known: {list(AXES)}")
    live = {a: float(weights[a]) for a in sorted(set(present)) if weights.get(a, 0.0) > 0}
    total = sum(live.values())
    if total <= 0:
        raise ValueError(f"no items on any weighted axis: items on {sorted(set(present))}, weights {dict(weights)}")
    return {a: w / total for a, w in live.items()}


def axis_means(items: Sequence[ItemResult]) -> dict[str, float]:
    """Mean utility per axis (axes without items absent)."""
    by_axis: dict[str, list[float]] = {}
    for it in items:
        by_axis.setdefault(it.axis, []).append(utility(it))
    return {a: sum(u) / len(u) for a, u in by_axis.items()}


def composite(items: Sequence[ItemResult], weights: Mapping[str, float]) -> float:
    means = axis_means(items)
    return sum(w * means[a] for a, w in _axis_weights(weights, means).items())


# ------------------------------------------------------------------ paired bootstrap
def _by_key(items: Sequence[ItemResult], who: str) -> dict[tuple[str, str], ItemResult]:
    out: dict[tuple[str, str], ItemResult] = {}
    for it in items:
        key = (it.axis, it.item_id)
        if key in out:
            raise ValueError(f"{who}: item {it.item_id!r} appears twice on axis {it.axis!r}")
        out[key] = it
    return out


def paired_differences(challenger_items: Sequence[ItemResult],
                       leader_items: Sequence[ItemResult]) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """Per axis: (item ids sorted, u(challenger) - u(leader) per id). Input order never matters."""
    ch, ld = _by_key(challenger_items, "challenger"), _by_key(leader_items, "leader")
    if ch.keys() != ld.keys():
        only_c, only_l = sorted(ch.keys() - ld.keys()), sorted(ld.keys() - ch.keys())
        raise ValueError(f"challenger and leader were scored on different items: {len(only_c)} only in the "
                         f"challenger's (e.g. {only_c[:3]}), {len(only_l)} only in the leader's (e.g. {only_l[:3]})")
    ids: dict[str, list[str]] = {}
    diffs: dict[str, list[float]] = {}
    for axis, iid in sorted(ch):
        ids.setdefault(axis, []).append(iid)
        diffs.setdefault(axis, []).append(utility(ch[axis, iid]) - utility(ld[axis, iid]))
    return {a: (tuple(ids[a]), np.asarray(diffs[a], dtype=np.float64)) for a in ids}


def _rng(seed: int | str | bytes) -> np.random.Generator:
    if isinstance(seed, (str, bytes)):  # a round seed as hex text or digest bytes
        raw = seed.encode() if isinstance(seed, str) else seed
        seed = int.from_bytes(hashlib.sha256(raw).digest()[:16], "big")
    return np.random.default_rng(seed)


def paired_bootstrap(challenger_items: Sequence[ItemResult], leader_items: Sequence[ItemResult],
                     weights: Mapping[str, float], resamples: int, confidence: float,
                     seed: int | str | bytes) -> float:
    """Lower `confidence` bound of composite(challenger) - composite(leader), by a paired bootstrap
    over item ids stratified by axis."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = paired_differences(challenger_items, leader_items)
    w = _axis_weights(weights, diffs)
    # axes scored on the same ids (a document's kl and ce) are resampled together: one draw per id set
    strata: dict[tuple[str, ...], list[str]] = {}
    for axis in sorted(w):
        strata.setdefault(diffs[axis][0], []).append(axis)
    rng = _rng(seed)
    total = np.zeros(resamples)
    for ids, axes in sorted(strata.items(), key=lambda kv: kv[1]):  # fixed order: same seed, same draws
        idx = rng.integers(0, len(ids), size=(resamples, len(ids)))
        for axis in axes:
            total += w[axis] * diffs[axis][1][idx].mean(axis=1)
    return float(np.quantile(total, 1.0 - confidence))


def dethrones(lower_bound: float, margin: float) -> bool:
    return lower_bound > margin


# ------------------------------------------------------------------ one round
@dataclass(frozen=True)
class Entry:
    hotkey: str
    model_hash: str
    commit_block: int
    composite: float               # 0 when gated
    gate: str | None = None        # "exact_copy" | "teacher" | "functional_copy" | "degenerate"
    reason: str = ""               # why the gate fired, for the round's record
    lower_bound: float | None = None  # bootstrap LB of the improvement over the crown's holder it was compared with


@dataclass(frozen=True)
class Ranking:
    entries: tuple[Entry, ...]     # leader first, then ungated by composite, then gated
    leader: Entry | None
    previous_leader_hash: str | None
    changed: bool                  # the crown moved to another model this round

    def to_dict(self) -> dict:
        return {"entries": [asdict(e) for e in self.entries], "leader": self.leader.hotkey if self.leader else None,
                "previous_leader_hash": self.previous_leader_hash, "changed": self.changed}


def _gates(results: Sequence[SubmissionResult], score: ScoreSpec,
           first_blocks: Mapping[str, int]) -> dict[str, tuple[str, str]]:
    """hotkey -> (gate, reason) for every gated submission."""
    gated: dict[str, tuple[str, str]] = {}
    owners: dict[str, SubmissionResult] = {}   # hash -> its one first commitment in this round
    by_hash: dict[str, list[SubmissionResult]] = {}
    for r in results:
        by_hash.setdefault(r.model_hash, []).append(r)
    for model_hash, same in sorted(by_hash.items()):
        first = min(r.commit_block for r in same)
        firsts = sorted(r.hotkey for r in same if r.commit_block == first)
        for r in same:
            if exact_copy(model_hash, r.commit_block, first_blocks):
                gated[r.hotkey] = ("exact_copy", f"hash first committed at block {first_blocks[model_hash]}")
            elif r.commit_block > first:
                gated[r.hotkey] = ("exact_copy", f"same hash as {firsts[0]!r} (block {first})")
            elif len(firsts) > 1:  # no order inside a block: a first commitment shared is no one's
                gated[r.hotkey] = ("exact_copy", f"hash first committed by {len(firsts)} hotkeys in one block ({first})")
            else:
                owners[model_hash] = r
    for r in sorted(owners.values(), key=lambda r: (r.commit_block, r.hotkey)):
        # the same block counts as earlier both ways: twins in one block gate each other
        earlier = {o.model_hash: o.fingerprint for o in owners.values()
                   if o.commit_block <= r.commit_block and o.hotkey != r.hotkey}
        copied = functional_copy(r.fingerprint, earlier, score.functional_copy_threshold)
        if r.teacher_similarity is not None and r.teacher_similarity > score.teacher_threshold:
            gated[r.hotkey] = ("teacher", f"logit fingerprint matches the teacher's "
                                          f"(similarity {r.teacher_similarity:.5f} > {score.teacher_threshold})")
        elif copied is not None:
            gated[r.hotkey] = ("functional_copy", f"logit fingerprint matches model {copied} "
                                                  "committed in an earlier or the same block")
        elif degenerate(r.continuations, score.degenerate_max_repeat):
            gated[r.hotkey] = ("degenerate", f"loops fill more than {score.degenerate_max_repeat:.0%} of greedy output")
    return gated


def _rank_key(e: Entry):
    return (-e.composite, e.commit_block, e.model_hash)  # best first; ties: the earlier commitment


def _commit_key(e: Entry):
    # never the hotkey: whoever can register a low-sorting one would be "first" in its block
    return (e.commit_block, -e.composite, e.model_hash)


def round_ranking(results: Sequence[SubmissionResult], score: ScoreSpec, seed: int | str | bytes,
                  leader_hash: str | None = None, first_blocks: Mapping[str, int] | None = None) -> Ranking:
    """Gate, score and order one round's submissions and decide the leader.

    leader_hash: the model hash holding the crown before this round (None on the first round).
    first_blocks: hash -> earliest commit block known from earlier rounds (copies of models no longer
    committed stay copies). `results` must all come from one round: their fingerprints are compared.
    """
    hotkeys = [r.hotkey for r in results]
    if len(set(hotkeys)) != len(hotkeys):
        raise ValueError(f"a hotkey appears twice in the round: {sorted({h for h in hotkeys if hotkeys.count(h) > 1})}")
    gated = _gates(results, score, first_blocks or {})
    by_key = {r.hotkey: r for r in results}

    entries = {}
    for r in results:
        if r.hotkey in gated:
            g, why = gated[r.hotkey]
            entries[r.hotkey] = Entry(r.hotkey, r.model_hash, r.commit_block, 0.0, g, why)
        else:
            entries[r.hotkey] = Entry(r.hotkey, r.model_hash, r.commit_block, composite(r.items, score.weights))
    live = sorted((e for e in entries.values() if e.gate is None), key=_rank_key)

    incumbent = next((e for e in live if e.model_hash == leader_hash), None)
    holder = incumbent if incumbent is not None else min(live, key=_commit_key, default=None)
    for e in sorted(live, key=_commit_key):
        if e is holder or holder is None:
            continue
        lb = paired_bootstrap(by_key[e.hotkey].items, by_key[holder.hotkey].items, score.weights,
                              score.bootstrap_resamples, score.confidence, seed)
        entries[e.hotkey] = e = Entry(e.hotkey, e.model_hash, e.commit_block, e.composite, lower_bound=lb)
        if dethrones(lb, score.margin):
            holder = e
    leader = None if holder is None else entries[holder.hotkey]
    live = sorted((entries[e.hotkey] for e in live), key=_rank_key)

    order = ([leader] if leader else []) + [e for e in live if leader is None or e.hotkey != leader.hotkey]
    order += sorted((e for e in entries.values() if e.gate is not None), key=lambda e: (e.commit_block, e.hotkey))
    changed = leader is not None and leader.model_hash != leader_hash
    return Ranking(tuple(order), leader, leader_hash, changed)


# ------------------------------------------------------------------ weights
def round_targets(ranking: Ranking, top_k: int, decay: float = MAX_DECAY) -> dict[str, float]:
    """This round's share per hotkey: geometric in rank over the first top_k ungated, summing to 1."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not 0 <= decay <= MAX_DECAY:
        raise ValueError(f"decay must be in [0, {MAX_DECAY}] so the leader keeps at least half, got {decay}")
    ranked = [e.hotkey for e in ranking.entries if e.gate is None][:top_k]
    raw = [decay ** r for r in range(len(ranked))]
    return {h: v / sum(raw) for h, v in zip(ranked, raw)}


def normalized(ema: Mapping, registered: Callable | None = None) -> dict:
    """The weights an EMA state gives: each value over their sum, {} when nothing is earned. The one
    place the validator's weights are normalised; the chain then checks and normalises whatever any
    client sends (neurons.chain.normalize_weights), which moves a vector summing to 1 by rounding only.
    `registered(key)`: the key to weight it under (a uid), None to drop it; the sum is over what is
    kept, so the weight of a deregistered hotkey goes to the others."""
    if registered is not None:
        ema = {k: v for k, v in ((registered(h), v) for h, v in ema.items()) if k is not None}
    total = sum(ema.values())
    return {k: v / total for k, v in ema.items()} if total > 0 else {}


def weights_from_scores(ranking: Ranking, top_k: int, ema_alpha: float, state: Mapping[str, float],
                        registered: Iterable[str] | None = None,
                        decay: float = MAX_DECAY) -> tuple[dict[str, float], dict[str, float]]:
    """(weights summing to 1, new EMA state): `ema_from_scores`, normalised. Empty weights when no
    hotkey has earned any (e.g. all gated)."""
    new_state = ema_from_scores(ranking, top_k, ema_alpha, state, registered, decay)
    return normalized(new_state), new_state


def ema_from_scores(ranking: Ranking, top_k: int, ema_alpha: float, state: Mapping[str, float],
                    registered: Iterable[str] | None = None, decay: float = MAX_DECAY) -> dict[str, float]:
    """The new EMA state, what a validator keeps between rounds; its weights are `normalized` when
    they are sent, against the metagraph of that moment. `registered`: the hotkeys on the metagraph
    now (None = keep every hotkey)."""
    if not 0 < ema_alpha <= 1:
        raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
    target = round_targets(ranking, top_k, decay)
    gated = {e.hotkey for e in ranking.entries if e.gate is not None}
    keys = set(state) | set(target)
    if registered is not None:
        keys &= set(registered)
    new_state = {}
    for h in sorted(keys - gated):
        v = ema_alpha * target.get(h, 0.0) + (1.0 - ema_alpha) * float(state.get(h, 0.0))
        if v > 1e-12:  # forget hotkeys whose weight has decayed to nothing
            new_state[h] = v
    return new_state


__all__ = ["utility", "axis_means", "composite", "paired_differences", "paired_bootstrap", "dethrones",
           "Entry", "Ranking", "ema_from_scores", "normalized", "round_ranking", "round_targets", "weights_from_scores"]
