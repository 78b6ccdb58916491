"""The scoring rule against every adversary of the spec, on synthetic per-item results.

A simulated round: 16 held-out documents with a per-document difficulty (base KL, teacher CE) and
150 recall items with a per-item solve probability, shared by every model scored on the round, as
real items are. A model's quality shifts those (KL scale, recall probability); its own per-item
noise is drawn from its own stream. Fingerprints for the copy gates come from real tiny models.
"""
import copy
import math
import zlib

import numpy as np
import pytest
import torch

from eval.competition import load_competition
from eval.gates import (degenerate, exact_copy, fingerprint_ids, fingerprint_probes, fingerprint_similarity,
                        functional_copy, logit_fingerprint, loop_tokens)
from eval.results import ItemResult, SubmissionResult, results_from_json, results_to_json
from eval.scoring import (composite, dethrones, paired_bootstrap, round_ranking, round_targets, utility,
                          weights_from_scores)
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM

COMP = load_competition("localnet")
SCORE = COMP.score          # weights kl .6 / ce .1 / recall .3, margin .005, 1000 resamples, 95 %
N_DOCS, N_RECALL = COMP.heldout.documents, 5 * 3 * 10


# ------------------------------------------------------------------ the simulated world
class Round:
    def __init__(self, seed: int, tag: str = ""):
        rng = np.random.default_rng(seed)
        self.tag = tag or f"s{seed}"
        self.kl = rng.lognormal(math.log(0.4), 0.5, N_DOCS)       # per-document difficulty
        self.teacher_ce = rng.uniform(2.5, 4.0, N_DOCS)
        self.p = rng.beta(0.5, 0.5, N_RECALL)                     # most items: mostly solved or mostly not
        self.doc_ids = [f"{self.tag}/heldout/{i}" for i in range(N_DOCS)]
        self.recall_ids = [f"{self.tag}/recall/{i}" for i in range(N_RECALL)]

    def measure(self, seed: int, kl_scale=1.0, recall_shift=0.0, kl_noise=0.05) -> list[ItemResult]:
        rng = np.random.default_rng(seed)
        kl = self.kl * kl_scale * np.exp(rng.normal(0, kl_noise, N_DOCS))
        hit = rng.random(N_RECALL) < np.clip(self.p + recall_shift, 0, 1)
        return ([ItemResult("kl", i, float(k)) for i, k in zip(self.doc_ids, kl)]
                + [ItemResult("ce", i, float(t + k), teacher_ce=float(t)) for i, k, t in zip(self.doc_ids, kl, self.teacher_ce)]
                + [ItemResult("recall", i, float(h)) for i, h in zip(self.recall_ids, hit)])


def healthy_text(seed: int, probes=8, n=32) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, COMP.student.vocab_size, (probes, n)).tolist()


def sub(hotkey, items, block=10, model_hash=None, fp=None, continuations=None, teacher_similarity=None):
    model_hash = model_hash or f"hash-{hotkey}"
    if fp is None:  # a distinct model: an unrelated fingerprint
        fp = np.random.default_rng(zlib.crc32(model_hash.encode())).normal(size=256).tolist()
    return SubmissionResult(hotkey, model_hash, block, items, fp, continuations or healthy_text(block),
                            teacher_similarity)


def duel(rnd: Round, leader_items, challenger_items, seed=0):
    """One round with the leader defending: (dethroned?, the challenger's lower bound)."""
    ranking = round_ranking([sub("leader", leader_items, block=5), sub("chal", challenger_items, block=8)],
                            SCORE, seed=seed, leader_hash="hash-leader")
    lb = next(e.lower_bound for e in ranking.entries if e.hotkey == "chal")
    return ranking.leader.hotkey == "chal", lb


# ------------------------------------------------------------------ results format and the composite
def test_results_round_trip_through_json():
    items = Round(0).measure(1)[:3] + [ItemResult("kl", "x/nan", float("nan"))]
    r = SubmissionResult("hk", "h", 7, items, torch.tensor([[0.5, -1.0]]), [[1, 2, 3]])
    back = results_from_json(results_to_json([r]))[0]
    assert back.fingerprint == [0.5, -1.0] and back.continuations == [[1, 2, 3]]
    assert [i.to_dict() for i in back.items[:3]] == [i.to_dict() for i in items[:3]]
    assert math.isnan(back.items[3].value) and SubmissionResult.from_json(r.to_json()).items[:3] == items[:3]
    with pytest.raises(ValueError, match="unknown axis"):
        ItemResult("bleu", "a", 1.0)
    with pytest.raises(ValueError, match="0 or 1"):
        ItemResult("recall", "a", 0.5)
    with pytest.raises(ValueError, match="unknown keys"):
        SubmissionResult.from_dict({**r.to_dict(), "scores": 1})


def test_utility_and_composite_follow_the_documented_formula():
    assert utility(ItemResult("kl", "a", 0.5)) == pytest.approx(math.exp(-0.5))
    assert utility(ItemResult("ce", "a", 3.2, teacher_ce=3.0)) == pytest.approx(math.exp(-0.2))
    assert utility(ItemResult("ce", "a", 2.9, teacher_ce=3.0)) == 1.0          # beating the teacher caps at 1
    assert utility(ItemResult("ce", "a", 3.0)) == pytest.approx(math.exp(-3.0))
    assert utility(ItemResult("kl", "a", float("inf"))) == utility(ItemResult("kl", "b", float("nan"))) == 0.0
    items = [ItemResult("kl", "d0", 0.2), ItemResult("kl", "d1", 0.4), ItemResult("recall", "r0", 1.0),
             ItemResult("recall", "r1", 0.0)]
    w = SCORE.weights
    # no ce items: kl and recall renormalise to .6/.9 and .3/.9
    expect = (w["kl"] * (math.exp(-0.2) + math.exp(-0.4)) / 2 + w["recall"] * 0.5) / (w["kl"] + w["recall"])
    assert composite(items, w) == pytest.approx(expect)
    with pytest.raises(ValueError, match="no items on any weighted axis"):
        composite(items, {"ce": 1.0})


def test_bootstrap_refuses_items_that_do_not_pair():
    rnd = Round(0)
    a, b = rnd.measure(1), rnd.measure(2)
    with pytest.raises(ValueError, match="different items.*1 only in the challenger"):
        paired_bootstrap(a + [ItemResult("recall", "extra", 1.0)], b, SCORE.weights, 100, 0.95, 0)
    with pytest.raises(ValueError, match="appears twice on axis"):
        paired_bootstrap(a + a[:1], b, SCORE.weights, 100, 0.95, 0)
    lb = paired_bootstrap(a, b, SCORE.weights, 200, 0.95, seed="ab" * 32)
    assert lb == paired_bootstrap(a[::-1], b, SCORE.weights, 200, 0.95, seed="ab" * 32)  # order-free, seeded


# ------------------------------------------------------------------ copies
def test_exact_copy_scores_zero_and_never_leads():
    rnd = Round(1)
    original = sub("orig", rnd.measure(1), block=5, model_hash="H")
    copier = sub("copier", rnd.measure(1), block=9, model_hash="H")
    assert exact_copy("H", 9, {"H": 5}) and not exact_copy("H", 5, {"H": 5})
    ranking = round_ranking([copier, original], SCORE, seed=0)
    by = {e.hotkey: e for e in ranking.entries}
    assert ranking.leader.hotkey == "orig" and by["copier"].gate == "exact_copy" and by["copier"].composite == 0
    # the original has deregistered: the validator's record of the hash's first block still convicts the copy
    alone = round_ranking([copier], SCORE, seed=0, first_blocks={"H": 5})
    assert alone.leader is None and alone.entries[0].gate == "exact_copy"
    # one hash committed from two hotkeys in one block: no order inside a block, so nobody owns it
    # (one owner cannot multiply a model, and a copier with leaked weights gains nothing)
    for names in (("a", "b"), ("b", "a"), ("5Fzz", "5Faa")):
        twins = round_ranking([sub(n, rnd.measure(1), 5, "H") for n in names], SCORE, seed=0)
        assert twins.leader is None and [e.gate for e in twins.entries] == ["exact_copy"] * 2
        assert all("2 hotkeys in one block" in e.reason for e in twins.entries)
    # ... and the later copy of a shared hash is still a copy
    third = round_ranking([sub("a", rnd.measure(1), 5, "H"), sub("b", rnd.measure(1), 5, "H"),
                           sub("c", rnd.measure(1), 7, "H")], SCORE, seed=0)
    assert third.leader is None and {e.gate for e in third.entries} == {"exact_copy"}


def _tiny(seed):
    torch.manual_seed(seed)
    return QuasarLongForCausalLM(QuasarLongConfig.preset("tiny")).eval()


def _perturbed(model, relative, seed=5):
    out, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(relative * p.abs().mean() * torch.randn(p.shape, generator=g))
    return out


class PaddedHead(torch.nn.Module):
    """A model whose LM head carries `pad` extra rows (as Qwen's does), each scoring above every real id."""

    def __init__(self, model, pad):
        super().__init__()
        self.model, self.pad = model, pad

    def forward(self, **kw):
        logits = self.model(**kw).logits
        extra = logits.amax(-1, keepdim=True).expand(*logits.shape[:-1], self.pad) + 10.0
        return type("Out", (), {"logits": torch.cat([logits, extra], dim=-1)})()


def _round_probes(seed, teacher):
    probes = fingerprint_probes(SCORE.fingerprint_probes, 24, QuasarLongConfig.preset("tiny").vocab_size, seed)
    return probes, fingerprint_ids(teacher, probes, seed, QuasarLongConfig.preset("tiny").vocab_size)


@pytest.fixture(scope="module")
def fingerprints():
    probes, ids = _round_probes(3, teacher=_tiny(7))
    original = _tiny(0)
    models = {"original": original, "copy": copy.deepcopy(original), "noisy": _perturbed(original, 1e-4),
              "independent": _tiny(1)}
    return {k: logit_fingerprint(m, probes, ids) for k, m in models.items()}


def test_probes_and_ids_come_from_the_round_seed_and_span_the_vocabulary():
    teacher = _tiny(7)
    (p1, i1), (p1b, i1b), (p2, i2) = _round_probes(1, teacher), _round_probes(1, teacher), _round_probes(2, teacher)
    assert torch.equal(p1, p1b) and torch.equal(i1, i1b)            # a replay of the round reads the same
    assert not torch.equal(p1, p2) and not torch.equal(i1, i2)      # the next round reads elsewhere
    vocab = QuasarLongConfig.preset("tiny").vocab_size
    assert i1.shape == (SCORE.fingerprint_probes, 8, 64)
    # every fifth of the vocabulary is read somewhere, not a fixed 64 ids a copier could perturb
    assert {int(x) * 5 // vocab for x in i1.flatten()} == set(range(5))
    # the first ids at each position are the teacher's own most likely there
    with torch.no_grad():
        top = teacher(input_ids=p1, use_cache=False).logits[:, -8:].argmax(-1)
    assert torch.equal(i1[..., 0], top)
    # a teacher whose LM head has padding rows past the student's vocabulary: never read there
    padded = PaddedHead(teacher, 64)
    with torch.no_grad():
        assert int(padded(input_ids=p1).logits.argmax(-1).min()) >= vocab  # padding would be every top id
    assert int(fingerprint_ids(padded, p1, 1, vocab).max()) < vocab
    with pytest.raises(ValueError, match="fewer than the student's vocab_size"):
        fingerprint_ids(teacher, p1, 1, vocab + 1)


def test_functional_copy_threshold_on_real_logits(fingerprints):
    fp, t = fingerprints, SCORE.functional_copy_threshold
    sims = {k: fingerprint_similarity(fp["original"], fp[k]) for k in ("copy", "noisy", "independent")}
    print(f"\nfingerprint similarity to the original: {sims}")
    assert fp["original"].numel() == SCORE.fingerprint_probes * 8 * 64
    assert sims["copy"] == pytest.approx(1.0) and sims["noisy"] > t and sims["independent"] < 0.5
    assert functional_copy(fp["noisy"], {"H0": fp["original"]}, t) == "H0"
    assert functional_copy(fp["independent"], {"H0": fp["original"]}, t) is None
    # a shifted or sharpened copy of the logits is the same function
    assert fingerprint_similarity(fp["original"], 1.3 * fp["original"] - 2) == pytest.approx(1.0)


def test_copy_plus_tiny_noise_scores_zero_even_when_it_scores_better(fingerprints):
    rnd = Round(2)
    original = sub("orig", rnd.measure(1), block=5, model_hash="H0", fp=fingerprints["original"])
    noisy = sub("noisy", rnd.measure(2, kl_scale=0.5, recall_shift=0.3), block=9, model_hash="H1",
                fp=fingerprints["noisy"])
    honest = sub("honest", rnd.measure(3), block=9, model_hash="H2", fp=fingerprints["independent"])
    ranking = round_ranking([original, noisy, honest], SCORE, seed=0, leader_hash="H0")
    by = {e.hotkey: e for e in ranking.entries}
    assert by["noisy"].gate == "functional_copy" and by["noisy"].composite == 0 and "H0" in by["noisy"].reason
    assert by["honest"].gate is None and ranking.leader.hotkey == "orig"
    weights, _ = weights_from_scores(ranking, top_k=3, ema_alpha=SCORE.ema_alpha, state={})
    assert "noisy" not in weights and weights["orig"] > weights["honest"] > 0


def test_the_teacher_scores_zero_even_with_the_best_items():
    rnd, t = Round(8), SCORE.teacher_threshold
    teacher = sub("teacher", rnd.measure(1, kl_scale=0.01, recall_shift=1.0), block=3, teacher_similarity=0.99999)
    # a good student close to the teacher, closer than the copy gate's threshold, is not the teacher
    honest = sub("honest", rnd.measure(2), block=6, teacher_similarity=SCORE.functional_copy_threshold + 0.01)
    for leader_hash in (None, "hash-teacher"):
        ranking = round_ranking([teacher, honest], SCORE, seed=0, leader_hash=leader_hash)
        by = {e.hotkey: e for e in ranking.entries}
        assert by["teacher"].gate == "teacher" and by["teacher"].composite == 0 and str(t) in by["teacher"].reason
        assert ranking.leader.hotkey == "honest"


def test_same_block_is_decided_by_neither_hotkey_order_nor_position(fingerprints):
    """Red team, issue 11 item 2: a copier holding leaked weights commits them in its victim's
    block from a hotkey that sorts first. Identical weights and matching fingerprints in one block
    gate every one of them; distinct models of one block are ordered by their scores alone."""
    rnd = Round(31)
    for victim, copier in (("5Fvictim", "5Aaa-copier"), ("5Aaa-victim", "5Fzz-copier")):
        source = sub(victim, rnd.measure(1, kl_scale=0.8), block=7, model_hash="H0", fp=fingerprints["original"])
        tweaked = sub(copier, rnd.measure(2, kl_scale=0.75), block=7, model_hash="H1", fp=fingerprints["noisy"])
        honest = sub("honest", rnd.measure(3), block=4, fp=fingerprints["independent"])
        ranking = round_ranking([tweaked, source, honest], SCORE, seed=0)
        by = {e.hotkey: e for e in ranking.entries}
        assert by[victim].gate == by[copier].gate == "functional_copy", by
        assert ranking.leader.hotkey == "honest"
    # two distinct models in one block, no leader before, too close for either to clear the margin
    # against the other: the better one holds the crown, whatever the hotkeys
    for names in (("5Aaa", "5Fzz"), ("5Fzz", "5Aaa")):
        better = sub(names[0], rnd.measure(4, kl_scale=0.995), block=9, model_hash="Hb")
        worse = sub(names[1], rnd.measure(4), block=9, model_hash="Hw")
        ranking = round_ranking([worse, better], SCORE, seed=0)
        assert ranking.leader.model_hash == "Hb"
        assert not any(e.lower_bound is not None and e.lower_bound > SCORE.margin for e in ranking.entries)


@pytest.mark.parametrize("leader_hash", [None, "hash-old"])
def test_later_copies_indistinguishable_from_a_challenger_never_take_its_crown(leader_hash):
    """Four copies of a new challenger that escaped the fingerprint gate, committed a block later:
    over 50 rounds none takes the crown from the challenger by noise."""
    stolen = 0
    for seed in range(50):
        rnd = Round(20_000 + seed)
        old = sub("old", rnd.measure(1, kl_scale=1.5), block=1)
        source = sub("source", rnd.measure(2, kl_scale=0.7, recall_shift=0.15), block=10)
        copies = [sub(f"copy{k}", rnd.measure(3 + k, kl_scale=0.7, recall_shift=0.15), block=11) for k in range(4)]
        ranking = round_ranking([old, source, *copies], SCORE, seed=seed, leader_hash=leader_hash)
        assert ranking.leader.hotkey in ("source", *[c.hotkey for c in copies])
        stolen += ranking.leader.hotkey != "source"
    print(f"\ncopies took the crown in {stolen}/50 rounds")
    assert stolen <= 2  # each copy clears the margin against its equal in < 5 % of rounds


# ------------------------------------------------------------------ degenerate output
def test_degenerate_gate():
    mr = SCORE.degenerate_max_repeat
    assert loop_tokens([7] * 10) == 9 and loop_tokens([1, 2, 3] * 4) == 9 and loop_tokens([1, 2, 3, 4]) == 0
    assert degenerate([[7] * 32] * 8, mr)                                  # one token repeated
    assert degenerate([list(range(i, i + 6)) * 6 for i in range(8)], mr)  # a loop of period 6
    assert not degenerate([list(range(10)) * 3] * 8, mr)                   # period 10: longer than a short loop
    assert not degenerate(healthy_text(0), mr) and not degenerate([], mr)
    assert not degenerate(healthy_text(0)[:6] + [[7] * 32] * 2, mr)        # two looping probes of eight: allowed
    for comp in ("localnet", "sn24"):  # every pure loop of period <= 8 over 32 tokens fills >= 75 %: gated
        threshold = load_competition(comp).score.degenerate_max_repeat
        for p in range(1, 9):
            assert degenerate([list(range(p)) * (32 // p) + list(range(32 % p))] * 8, threshold), (comp, p)


def test_degenerate_looping_model_scores_zero_whatever_its_items():
    rnd = Round(3)
    looper = sub("looper", rnd.measure(1, kl_scale=0.1, recall_shift=1.0), block=5,
                 continuations=[[3, 9] * 16] * 8)
    honest = sub("honest", rnd.measure(2), block=6)
    for leader_hash in (None, "hash-looper"):  # not as newcomer, not as former leader
        ranking = round_ranking([looper, honest], SCORE, seed=0, leader_hash=leader_hash)
        assert ranking.leader.hotkey == "honest" and ranking.entries[-1].gate == "degenerate"
        assert ranking.entries[-1].composite == 0


# ------------------------------------------------------------------ the margin and the bootstrap
def test_sub_margin_challenger_never_dethrones():
    """The leader's own model fine-tuned to gain half the margin (same recall answers, KL a little
    lower on every document): over 100 rounds it never takes the crown."""
    gain = SCORE.margin / 2
    w_kl = SCORE.weights["kl"]
    wins, lbs = 0, []
    for seed in range(100):
        rnd = Round(seed)
        leader = rnd.measure(1000 + seed)
        rng = np.random.default_rng(seed)
        tweaked = []
        for it in leader:
            if it.axis == "kl":  # utility up by gain / w_kl on average, so the composite gains `gain`
                u = min(1.0, math.exp(-it.value) + gain / w_kl * (1 + 0.5 * rng.standard_normal()))
                it = ItemResult("kl", it.item_id, -math.log(u))
            tweaked.append(it)
        won, lb = duel(rnd, leader, tweaked, seed=seed)
        wins += won
        lbs.append(lb)
    print(f"\nsub-margin challenger: dethroned in {wins}/100 rounds; max lower bound {max(lbs):.4f} (margin {SCORE.margin})")
    assert wins == 0


def test_clearly_better_challenger_dethrones_within_one_round():
    for seed in range(20):
        rnd = Round(seed)
        won, lb = duel(rnd, rnd.measure(1), rnd.measure(2, kl_scale=0.7, recall_shift=0.15), seed=seed)
        assert won, f"seed {seed}: lower bound {lb:.4f} did not clear the margin {SCORE.margin}"


def test_model_tuned_on_revealed_items_gains_nothing_next_round():
    r1, r2 = Round(1, "round1"), Round(2, "round2")
    assert not set(r1.doc_ids + r1.recall_ids) & set(r2.doc_ids + r2.recall_ids)  # fresh items every round

    def tuned_on_round1(rnd, base):
        # perfect on the revealed items, the leader's own behaviour on everything else
        perfect = {"kl": lambda it: 0.0, "ce": lambda it: it.teacher_ce, "recall": lambda it: 1.0}
        return [ItemResult(it.axis, it.item_id, perfect[it.axis](it), it.teacher_ce)
                if it.item_id.startswith("round1/") else it for it in base]

    leader1 = r1.measure(10)
    assert duel(r1, leader1, tuned_on_round1(r1, leader1))[0]       # a replay of round 1 would reward it...
    for seed in range(20):                                            # ...but the next round is fresh
        leader2 = r2.measure(20 + seed)
        tuned = [ItemResult(it.axis, it.item_id, it.value * (1 + 0.01 * np.sin(k)), it.teacher_ce)
                 if it.axis != "recall" else it for k, it in enumerate(tuned_on_round1(r2, leader2))]
        won, lb = duel(r2, leader2, tuned, seed=seed)
        assert not won, f"seed {seed}: lower bound {lb:.4f}"


def test_false_dethrone_rate_of_equal_models_is_below_five_percent():
    rounds, wins = 200, 0
    for seed in range(rounds):
        rnd = Round(10_000 + seed)
        wins += duel(rnd, rnd.measure(2 * seed), rnd.measure(2 * seed + 1), seed=seed)[0]
    rate = wins / rounds
    print(f"\nequal models: false dethrone rate {rate:.1%} over {rounds} rounds "
          f"(margin {SCORE.margin}, confidence {SCORE.confidence})")
    assert rate < 0.05


def test_dethrones_is_strictly_above_the_margin():
    assert dethrones(0.0051, 0.005) and not dethrones(0.005, 0.005) and not dethrones(-0.1, 0.0)


def test_first_round_crowns_the_clearly_better_and_ties_go_to_the_earlier_commitment():
    rnd = Round(4)
    worse, better = sub("worse", rnd.measure(1), 5), sub("better", rnd.measure(2, kl_scale=0.8), 6)
    ranking = round_ranking([worse, better], SCORE, seed=0)
    assert ranking.leader.hotkey == "better" and ranking.changed and ranking.entries[0].lower_bound > SCORE.margin
    same = round_ranking([sub("late", rnd.measure(1), 9), sub("early", rnd.measure(1), 3)], SCORE, seed=0)
    assert same.leader.hotkey == "early"


# ------------------------------------------------------------------ weights
def test_weights_copier_gets_nothing_and_weights_sum_to_one():
    rnd = Round(6)
    subs = [sub("a", rnd.measure(1, kl_scale=0.8), 5), sub("b", rnd.measure(2), 6), sub("c", rnd.measure(3, kl_scale=1.3), 7),
            sub("copier", rnd.measure(1, kl_scale=0.8), 9, model_hash="hash-a")]
    ranking = round_ranking(subs, SCORE, seed=0)
    assert [e.hotkey for e in ranking.entries] == ["a", "b", "c", "copier"]
    assert round_targets(ranking, top_k=3) == pytest.approx({"a": 4 / 7, "b": 2 / 7, "c": 1 / 7})
    state = {"copier": 0.9}  # even earlier weight of a now-gated hotkey is dropped
    for _ in range(5):
        weights, state = weights_from_scores(ranking, top_k=3, ema_alpha=SCORE.ema_alpha, state=state)
        assert "copier" not in weights and "copier" not in state
        assert sum(weights.values()) == pytest.approx(1.0) and weights["a"] > 0.5
    only_leader, _ = weights_from_scores(ranking, top_k=COMP.schedule.weights_top_k, ema_alpha=1.0, state={})
    assert only_leader == {"a": 1.0}


def test_weights_ema_follows_the_documented_update():
    rnd, a = Round(7), SCORE.ema_alpha
    r_a = round_ranking([sub("A", rnd.measure(1), 5)], SCORE, seed=0)
    r_b = round_ranking([sub("A", rnd.measure(1), 5), sub("B", rnd.measure(2, kl_scale=0.5, recall_shift=0.2), 6)],
                        SCORE, seed=0, leader_hash="hash-A")
    assert r_b.leader.hotkey == "B" and r_b.changed
    w1, s1 = weights_from_scores(r_a, 1, a, {})
    assert s1 == pytest.approx({"A": a}) and w1 == pytest.approx({"A": 1.0})
    w2, s2 = weights_from_scores(r_b, 1, a, s1)
    assert s2 == pytest.approx({"A": (1 - a) * a, "B": a})
    assert w2 == pytest.approx({"A": (1 - a) / (2 - a), "B": 1 / (2 - a)})
    state = s2
    for _ in range(3, 30):
        w, state = weights_from_scores(r_b, 1, a, state)
    assert w["B"] > 0.999 and state["A"] == pytest.approx(a * (1 - a) ** 28)
    # A deregisters: it drops out of the state and the weights, which still sum to 1
    w, state = weights_from_scores(r_b, 1, a, s2, registered=["B", "someone"])
    assert set(state) == {"B"} and w == {"B": 1.0}
    # nothing earned anywhere: no weights rather than a division by zero
    assert weights_from_scores(round_ranking([], SCORE, seed=0), 1, a, {}) == ({}, {})
