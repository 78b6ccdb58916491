"""Red team: a model trained on the public recall generator's defaults gains no format advantage.

The attack: the recall generator is public, so a miner can train on unlimited items in its
default forms (`forms="fixed"`) until the model has learnt the templates ("the answer is the
number after 'The special code for <key> is'") instead of recall. The defence: a competition
with `recall.forms = "round"` draws the surface forms per round from the seed (eval.recall_forms).

How "no advantage beyond capability" is measured, cheaply and without training a model:
  template reader    the strongest thing template memorisation can buy: a perfect reader of the
                     DEFAULT forms (the oracle's parser with the default templates, cue, separator,
                     key and value shapes). Anything a default-trained model answers by format is
                     at most what this reader answers.
  capability reader  the same parser given the round's own forms: it stands for a model that
                     reads what the prompt says (which template, which separator) and recalls.
On default-form items both score 1.0: the template reader is a complete attack on fixed forms.
On a round's items the capability reader still scores 1.0 and the template reader scores 0, so
the only way to score on a round is the capability itself; its advantage over capability is
acc(template reader, round) = 0.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_recall_tasks import WordTokenizer

from eval.recall_forms import DEFAULT_FORMS, forms_signature, round_forms
from eval.recall_tasks import FAMILIES, forms_of, generate_items, items_digest, oracle_answer_text

CTX = 256
SEEDS = range(12)


def template_reader(family: str, prompt: str) -> str | None:
    """What a model that memorised the default forms can answer (None: it finds nothing to parse)."""
    try:
        return oracle_answer_text(family, prompt)
    except (ValueError, KeyError):
        return None


def capability_reader(family: str, prompt: str, forms: dict) -> str | None:
    try:
        return oracle_answer_text(family, prompt, forms)
    except (ValueError, KeyError):
        return None


def _accuracy(items, tok, read) -> float:
    return sum(read(it, tok.decode(it.prompt_ids)) == it.answer_text for it in items) / len(items)


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer()


@pytest.fixture(scope="module")
def items(tok):
    """Every family at 1x and 2x, two depths, over a dozen rounds: in default and in round forms."""
    def grid(forms):
        return [it for s in SEEDS for it in generate_items(s, tok, CTX, lengths=(1, 2), depth_bins=2, forms=forms)]
    return dict(fixed=grid("fixed"), round=grid("round"))


def test_a_default_template_reader_scores_nothing_on_round_forms(items, tok):
    def template(it, prompt):
        return template_reader(it.family, prompt)

    def capable(it, prompt):
        return capability_reader(it.family, prompt, forms_of(it))

    # the attack is real: on the public defaults, knowing the templates answers every item
    assert _accuracy(items["fixed"], tok, template) == 1.0
    assert _accuracy(items["fixed"], tok, capable) == 1.0
    # on a round's forms, reading the prompt still answers every item; the templates answer none
    assert _accuracy(items["round"], tok, capable) == 1.0
    for f in FAMILIES:
        fam = [it for it in items["round"] if it.family == f]
        assert _accuracy(fam, tok, template) == 0.0, f


def test_round_forms_never_reuse_the_default_templates():
    default = DEFAULT_FORMS["wording"]
    for seed in range(100):
        f = round_forms(seed)
        for fam in ("passkey", "niah_multikey", "multivalue"):
            for field in ("needles", "questions"):
                assert not set(f["wording"][fam][field]) & set(default[fam][field]), (seed, fam, field)
        for r in f["relations"]:
            for d in DEFAULT_FORMS["relations"]:
                assert not set(r["statements"]) & set(d["statements"]) and not set(r["questions"]) & set(d["questions"])
        assert f["var"]["assign"] != DEFAULT_FORMS["var"]["assign"] and f["cue"] != DEFAULT_FORMS["cue"]


def test_the_form_space_is_large_and_follows_the_seed():
    draws = [round_forms(s) for s in range(100)]
    # every round draws its own forms; the same seed always draws the same
    assert len({forms_signature(f) for f in draws}) == 100
    assert round_forms(7) == round_forms(7) and round_forms(7) != round_forms(8)
    # and they vary along every axis a template learner could key on
    def distinct(key):
        return len({repr(key(f)) for f in draws})
    assert distinct(lambda f: f["filler"]) == 4
    assert distinct(lambda f: f["cue"]) >= 6 and distinct(lambda f: f["join"]) >= 4
    assert distinct(lambda f: f["intros"]) >= 50
    assert distinct(lambda f: f["number_digits"]) >= 6 and distinct(lambda f: f["passkey_digits"]) >= 6
    assert distinct(lambda f: f["code"]) >= 40
    assert distinct(lambda f: f["key"]["code_alphabet"] + f["key"]["code_sep"] + str(f["key"]["code_digits"])) >= 10
    assert distinct(lambda f: f["var"]) >= 60
    assert distinct(lambda f: f["assoc"]) >= 12
    for fam in ("passkey", "niah_multikey", "multivalue"):
        assert distinct(lambda f: f["wording"][fam]["needles"]) >= 90, fam
        assert distinct(lambda f: f["wording"][fam]["questions"]) >= 50, fam
    assert distinct(lambda f: [r["statements"] for r in f["relations"]]) == 100


def test_round_items_are_byte_identical_across_processes(tok):
    """items_digest of a round's items does not depend on the process (hash seed, import order)."""
    here = items_digest(generate_items(3, WordTokenizer(), CTX, lengths=(1,), depth_bins=2, forms="round"))
    code = ("from test_recall_tasks import WordTokenizer\n"
            "from eval.recall_tasks import generate_items, items_digest\n"
            "print(items_digest(generate_items(3, WordTokenizer(), 256, lengths=(1,), depth_bins=2, forms='round')))")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    assert out.stdout.strip() == here
