"""The evaluator: recall runner, held-out KL/CE, the whole checkpoint score, the report and `quasar eval`.

One reduced localnet round is shared by every test (6 documents of 128 tokens; 20 recall items at
384 and 768 tokens), with the teacher cache under a session temp dir. The "real" student is a
`tiny` Quasar-Long (one loop, the tiny teacher's 1024-token vocabulary) distilled from the tiny
teacher for ~100 steps: bad, but clearly better than random.
"""
import dataclasses
import json
import math
import time
from types import SimpleNamespace

import pytest
import torch

from eval.competition import load_competition
from eval.evaluate import prepare_round, resolve_tokenizer, score_model, teacher_location
from eval.heldout import draw_documents, heldout_source, prepare_heldout
from eval.recall import greedy_decode, prefill, run_recall
from eval.recall_tasks import items_digest, oracle_answer
from eval.report import report_json, summarize, write_report
from eval.scoring import composite
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM
from quasar_model.tokenization import PlainTextTokenizer

SEED = 7


@pytest.fixture(scope="session")
def comp():
    c = load_competition("localnet")
    # localnet, shrunk to a few seconds a score: fewer documents, shorter contexts, 2 depth bins
    return dataclasses.replace(
        c, heldout=dataclasses.replace(c.heldout, documents=6, seq_len=128),
        recall=dataclasses.replace(c.recall, context_len=384, lengths=(1, 2), depth_bins=2, prefill_chunk=128))


@pytest.fixture(scope="session")
def comp_file(comp, tmp_path_factory):
    path = tmp_path_factory.mktemp("competition") / "small-localnet.json"
    path.write_text(json.dumps(comp.to_dict()))
    return path


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="session")
def round_inputs(comp, cache_root):
    return prepare_round(comp, SEED, cache_root=cache_root)


@pytest.fixture(scope="session")
def teacher(comp):
    from quasar_model.teacher_outputs.capture import load_teacher

    return load_teacher(teacher_location(comp)[0], dtype="float32")[0]


def random_student(seed=0, **overrides):
    torch.manual_seed(seed)
    return QuasarLongForCausalLM(QuasarLongConfig.preset("tiny", vocab_size=1024, **overrides)).eval()


@pytest.fixture(scope="session")
def trained_student(distilled_student, tmp_path_factory):
    """A tiny student distilled (full-vocabulary forward KL) from the tiny teacher on the train split
    (conftest's `distilled_student`: random_student(0, num_loops=1, use_looped_injection=False), 100 steps)."""
    model = distilled_student
    path = tmp_path_factory.mktemp("student") / "ckpt"
    model.save_pretrained(path)
    return model, path


# -----------------------------------------------------------------------------
# recall runner

class OracleLM:
    """Model-shaped: reads the answer out of the prompt text (recall_tasks.oracle_answer) and puts all
    logit mass on the next answer token. Its "cache" is just the tokens seen so far."""

    def __init__(self, items, tokenizer, vocab_size):
        self.answers = {tuple(it.prompt_ids): oracle_answer(it, tokenizer) for it in items}
        self.V = vocab_size
        self.calls = []   # chunk lengths, to check the prefill really is chunked

    def __call__(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        seen = (cache or []) + input_ids[0].tolist()
        self.calls.append(input_ids.shape[1])
        logits = torch.zeros(1, 1, self.V)
        done = [p for p in self.answers if tuple(seen[:len(p)]) == p]   # none while the prompt is being read
        if done:
            answer, n = self.answers[done[0]], len(seen) - len(done[0])
            logits[0, -1, answer[n] if n < len(answer) else 0] = 1.0
        return SimpleNamespace(logits=logits, cache=seen)


def test_oracle_scores_one_on_recall(round_inputs, comp):
    items = round_inputs.items
    oracle = OracleLM(items, round_inputs.tokenizer, comp.student.vocab_size)
    out = run_recall(oracle, items, prefill_chunk=100, max_answer_tokens=comp.recall.max_answer_tokens, device="cpu")
    assert len(out) == len(items) == 20 and all(o.correct for o in out)
    assert {o.family for o in out} == set(comp.recall.families) and {o.length_bin for o in out} == {1, 2}
    assert max(oracle.calls) == 100                  # prefill went through in 100-token chunks
    assert any(o.truncated for o in out)             # multi-part answers exceed localnet's 12-token budget


@pytest.fixture(scope="session")
def random_result(round_inputs):
    return score_model(random_student(), round_inputs)


def test_random_model_scores_zero_on_recall(random_result, comp):
    recall = [it for it in random_result.items if it.axis == "recall"]
    assert len(recall) == 20 and all(it.value == 0.0 for it in recall)
    assert composite(random_result.items, comp.score.weights) < 0.1


def test_recall_results_record_truncation(random_result, round_inputs, comp):
    from eval.results import SubmissionResult

    recall = [it for it in random_result.items if it.axis == "recall"]
    long = [len(it.answer_ids) > comp.recall.max_answer_tokens for it in round_inputs.items]
    assert [it.truncated for it in recall] == long and any(long) and not all(long)
    stored = random_result.to_dict()
    assert SubmissionResult.from_dict(stored).items == random_result.items     # stored and read back
    for it in stored["items"]:   # a row written before truncation was recorded still loads
        it.pop("truncated", None)
    assert not any(it.truncated for it in SubmissionResult.from_dict(stored).items)
    assert summarize(random_result, comp, SEED)["recall"]["truncated"] == sum(long)


def test_batched_recall_equals_one_at_a_time(round_inputs, comp):
    """Equal-length items run as one batch give the outcomes they give one at a time: on items
    graded against the model's own greedy output (every decode step runs) and on the real items
    (most rows stop at their first token, while others go on)."""
    model = random_student(1)
    assert len({len(it.prompt_ids) for it in round_inputs.items}) == 2   # the round's forms fit prompts exactly
    items = [it for it in round_inputs.items if it.length_bin == 1][:6]
    own = [dataclasses.replace(it, answer_ids=greedy_decode(model, it.prompt_ids, 5, prefill_chunk=128))
           for it in items[:3]]
    mixed = [own[0], items[3], own[1], items[4], own[2], items[5]]
    kw = dict(prefill_chunk=128, max_answer_tokens=comp.recall.max_answer_tokens)
    one = run_recall(model, mixed, **kw)
    assert [o.correct for o in one] == [True, False] * 3
    assert run_recall(model, mixed, batch_size=4, **kw) == one   # a batch of 4 and one of 2


def test_chunked_prefill_equals_unchunked():
    model = random_student(1, initializer_range=0.08)   # wider init: logits far from uniform
    ids = torch.randint(0, 1024, (200,)).tolist()   # crosses nope_after_position=16 and every chunk size
    full, _ = prefill(model, ids, 10_000)
    for chunk in (7, 64, 128):
        part, _ = prefill(model, ids, chunk)
        assert (part - full).abs().max().item() <= 1e-4, chunk
    assert full.abs().max() > 0.5
    a = greedy_decode(model, ids, 12, prefill_chunk=64)
    b = greedy_decode(model, ids, 12, prefill_chunk=10_000)
    assert a == b and len(a) == 12


# -----------------------------------------------------------------------------
# held-out

def test_teacher_against_itself_has_zero_kl(round_inputs, teacher):
    from eval.heldout import score_heldout

    h = round_inputs.heldout
    scores = score_heldout(teacher, h, 1.0)
    assert max(s.kl for s in scores) < 1e-4
    # the teacher's CE stored at capture equals its CE scored now as a "student"
    assert h.teacher_ce == pytest.approx([s.ce for s in scores], abs=1e-5)
    rand = score_heldout(random_student(), h, 1.0)
    assert min(s.kl for s in rand) > 1.0 and min(s.ce for s in rand) > max(h.teacher_ce)


def test_heldout_sample_is_seeded_and_the_teacher_cache_is_reused(round_inputs, comp, cache_root):
    h, tok = comp.heldout, round_inputs.tokenizer
    source = heldout_source(h)
    docs = draw_documents(source, SEED, h.documents, tok, h.seq_len)
    assert docs == round_inputs.heldout.docs
    assert docs != draw_documents(source, SEED + 1, h.documents, tok, h.seq_len)
    assert all(2 <= len(d.input_ids) <= h.seq_len for d in docs)

    def no_teacher():
        raise AssertionError("the teacher was loaded although its cache exists")

    again = prepare_heldout(docs, SEED, teacher=_teacher_identity(comp), k=h.topk, temperature=h.temperature,
                            cache_root=cache_root, load_teacher=no_teacher)
    assert again.key == round_inputs.heldout.key and again.cache.path == round_inputs.heldout.cache.path
    assert again.teacher_ce == round_inputs.heldout.teacher_ce


def _teacher_identity(comp):
    from eval.evaluate import _teacher_identity as ident

    return ident(comp, teacher_location(comp)[0])


# -----------------------------------------------------------------------------
# the whole score, the report, the CLI

def test_round_items_are_a_function_of_the_seed(round_inputs, comp):
    tok = PlainTextTokenizer(resolve_tokenizer(comp))
    from eval.evaluate import recall_items

    assert items_digest(recall_items(comp, SEED, tok)) == items_digest(round_inputs.items)
    assert items_digest(recall_items(comp, SEED + 1, tok)) != items_digest(round_inputs.items)


@pytest.mark.slow
def test_composite_orders_random_trained_teacher_and_cli_is_reproducible(
        round_inputs, comp, comp_file, cache_root, teacher, trained_student, random_result, tmp_path):
    from eval.cli import main

    rand = random_result
    teach = score_model(teacher, round_inputs)
    w = comp.score.weights
    c_rand, c_teach = composite(rand.items, w), composite(teach.items, w)

    # `python -m eval.cli eval CKPT ...`, twice: the JSON must be the same bytes
    outs = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        t0 = time.perf_counter()
        assert main(["eval", str(trained_student[1]), "--competition", str(comp_file), "--seed", str(SEED),
                     "--out", str(out), "--device", "cpu", "--cache-root", str(cache_root), "--quiet"]) == 0
        outs.append(out)
        print(f"cli eval run {run}: {time.perf_counter() - t0:.1f} s")
    a, b = ((o / "report.json").read_bytes() for o in outs)
    assert a == b
    for o in outs:
        for png in ("recall.png", "kl_hist.png"):
            assert (o / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(a)
    s = report["summary"]
    c_trained = s["composite"]
    print(f"composite: random {c_rand:.4f}  trained {c_trained:.4f}  teacher {c_teach:.4f}")
    assert c_rand + 0.03 < c_trained < c_teach - 0.1
    assert s["mean"]["kl"] < min(it.value for it in rand.items if it.axis == "kl")
    assert set(s["recall"]["grid"]) == set(comp.recall.families)
    assert s["items"] == {"kl": 6, "ce": 6, "recall": 20}
    assert s["competition_digest"] == comp.digest
    assert len(report["result"]["fingerprint"]) > 0 and len(report["result"]["continuations"]) == 6

    # the in-memory model gives the same items as its checkpoint read back by the CLI
    direct = score_model(trained_student[0], round_inputs, model_hash=report["result"]["model_hash"])
    assert json.loads(report_json(direct, comp, SEED))["result"]["items"] == report["result"]["items"]


def test_report_without_recall_or_kl_items(comp, tmp_path):
    from eval.results import ItemResult, SubmissionResult

    r = SubmissionResult("hk", "h" * 64, 5, [ItemResult("ce", "heldout/0", 4.0, teacher_ce=3.5)])
    paths = write_report(r, comp, 1, tmp_path)
    assert set(paths) == {"json"}
    s = summarize(r, comp, 1)
    assert s["composite"] == pytest.approx(math.exp(-0.5)) and s["recall"]["grid"] == {}


# -----------------------------------------------------------------------------
# the teacher's fingerprint and its size

def test_teacher_fingerprint_is_the_teachers_own_and_cached(round_inputs, comp, cache_root, teacher,
                                                            trained_student, random_result):
    from eval.evaluate import _teacher_fingerprint
    from eval.gates import fingerprint_similarity, logit_fingerprint

    again = logit_fingerprint(teacher, round_inputs.probes, round_inputs.fp_ids)
    assert fingerprint_similarity(again, round_inputs.teacher_fingerprint) == pytest.approx(1.0)
    trained = score_model(trained_student[0], round_inputs)
    t = comp.score.teacher_threshold
    print(f"\nteacher similarity: distilled student {trained.teacher_similarity:.4f}, "
          f"random student {random_result.teacher_similarity:.4f} (threshold {t})")
    assert trained.teacher_similarity < t and random_result.teacher_similarity < t

    def no_teacher():
        raise AssertionError("the teacher was loaded although its fingerprint is cached")

    ids, fp = _teacher_fingerprint(comp, SEED, round_inputs.probes, _teacher_identity(comp), cache_root, no_teacher)
    assert torch.equal(ids, round_inputs.fp_ids) and torch.equal(fp, round_inputs.teacher_fingerprint)


def test_teacher_params_pin_is_checked_against_the_loaded_teacher(comp, teacher):
    from eval.evaluate import check_teacher_params

    check_teacher_params(comp, teacher)  # localnet pins the tiny teacher's exact count
    wrong = dataclasses.replace(comp, teacher=dataclasses.replace(comp.teacher, params=comp.teacher.params * 2))
    with pytest.raises(ValueError, match="teacher.params"):
        check_teacher_params(wrong, teacher)
