"""The miner's recall curriculum (distill/recall_curriculum.py) and its place in the trainer.

Documents: deterministic from their seed, never longer than asked, answers recoverable from the
prompt; the generator shares no code with the validator's. Trainer: recall rows mix into each step
(answer-span CE logged), a resumed run replays the same documents, and checkpoints written before the
`recall` section existed still resume.
"""
import ast
import json
import random
from pathlib import Path

import pytest
import torch

from distill.config import load_config
from distill.metrics_log import read_metrics
from distill.recall_curriculum import FAMILIES, DocMaker, curriculum_length, recall_batch
from distill.trainer import Trainer
from test_distill_train import caches, tiny_config  # noqa: F401  (module fixture, reused)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher
    return AutoTokenizer.from_pretrained(tiny_teacher(progress=False))


def test_documents_are_seeded_bounded_and_answerable(tok):
    maker = DocMaker(tok)
    for family in FAMILIES:
        for i in range(20):
            length = random.Random(i).randint(64, 256)
            a = maker.make(random.Random(f"{family}{i}"), length, family)
            b = maker.make(random.Random(f"{family}{i}"), length, family)
            assert a == b and len(a.ids) <= length
            if family in ("passkey", "multikey", "mqar", "copy"):
                # every answer part is stated earlier in the document: the answer can be looked up
                (s, e), = a.targets
                prompt, answer = tok.decode(a.ids[:s]), tok.decode(a.ids[s:e])
                parts = [p for p in answer.replace(";", ",").replace("|", ",").split(",") if p.strip()]
                assert parts and all(p.strip() in prompt for p in parts), (family, prompt, answer)
            if family == "induction" and a.targets:
                (s, e), = a.targets
                span = a.ids[s - 1:e]            # the segment's second occurrence...
                first = [j for j in range(s - 1) if a.ids[j:j + len(span)] == span]
                assert first                     # ...occurred before


def test_induction_documents_can_be_digit_strings(tok):
    """digit_share 1: every induction document is digits alone, its repeat a copyable target."""
    maker = DocMaker(tok, families=["induction"], digit_share=1.0)
    digits = {tok.encode(d, add_special_tokens=False)[0] for d in "0123456789"}
    for i in range(10):
        doc = maker.make(random.Random(i), 96)
        assert set(doc.ids) <= digits and len(doc.targets) == 1
    with pytest.raises(ValueError, match="digit_share"):
        DocMaker(tok, digit_share=1.5)


def test_batches_label_only_answers_and_follow_the_curriculum(tok):
    maker = DocMaker(tok, families=["passkey", "multikey"])
    b = recall_batch(maker, rows=4, seq_len=256, length=64, seed=3, step=7)
    again = recall_batch(maker, rows=4, seq_len=256, length=64, seed=3, step=7)
    assert all(torch.equal(b[k], again[k]) for k in b)
    assert b["input_ids"].shape == b["labels"].shape == (4, 256)
    lab = b["labels"]
    # several documents per row (positions restart), and a minority of positions are answers
    assert int((b["position_ids"] == 0).sum()) >= 4 * 3
    assert 0 < int((lab != -100).sum()) < 0.4 * lab.numel()
    # each label is the next token of the same row: the loss is teacher forcing on the answer
    i, t = torch.nonzero(lab != -100)[0].tolist()
    assert lab[i, t] == b["input_ids"][i, t + 1]
    # rank shares are disjoint and together the global batch
    r1 = recall_batch(maker, rows=4, seq_len=256, length=64, seed=3, step=7, rank=1, world_size=2)
    assert torch.equal(r1["input_ids"], b["input_ids"][1::2])
    assert [curriculum_length(s, 100, 64, 256, 0.5) for s in (0, 25, 50, 99)] == [64, 160, 256, 256]


def test_distill_does_not_import_the_validators_generator():
    """What a miner trains on must not be the validator's templates: no import of eval at all."""
    for path in sorted((ROOT / "distill").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "eval" or n.startswith("eval.") for n in names), (path.name, names)


def test_config_section_defaults_off_and_checks(tmp_path):
    cfg = load_config(ROOT / "configs" / "distill_tiny.json", ["data.train_cache=x"])
    assert cfg.recall.mix == 0 and cfg.recall_rows == 0           # configs without the section: off
    cfg = load_config(None, ["data.train_cache=x", "data.batch_size=8", "recall.mix=0.25"])
    assert cfg.recall_rows == 2
    for bad, key in [("recall.mix=1", "recall.mix"), ("recall.min_len=8", "recall.min_len"),
                     ('recall.families=["passkey","haystack"]', "recall.families"),
                     ("recall.max_len=4096", "recall.max_len")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_config(None, ["data.train_cache=x", "recall.mix=0.5", bad])


@pytest.mark.slow
def test_recall_mix_trains_logs_and_resumes_exactly(caches, tmp_path):  # noqa: F811
    """Recall rows in every step (CE logged); a crashed run resumes onto the same curve, recall
    documents included; a checkpoint whose config predates the recall section still resumes."""
    over = ["steps=4", "checkpoint_every=2", "data.batch_size=4", "recall.mix=0.5", "recall.min_len=32",
            "optim.warmup_steps=1"]
    whole = Trainer(tiny_config(caches, tmp_path / "whole", *over, heldout=False))
    whole.train()
    crashed = Trainer(tiny_config(caches, tmp_path / "crash", *over, heldout=False))
    crashed.train(until=3)
    del crashed
    resumed = Trainer(tiny_config(caches, tmp_path / "crash", *over, heldout=False))
    assert resumed.step == 2
    resumed.train()

    def curve(run):
        return [(r["step"], r["loss"], r["recall_ce"], r["recall_len"]) for r in read_metrics(tmp_path / run / "metrics.jsonl")]
    assert curve("crash") == curve("whole")
    assert all(0 < r[2] < 20 for r in curve("whole")) and [r[3] for r in curve("whole")] == [32, 80, 128, 128]

    # an old checkpoint: its saved config has no `recall` section, and the run had none
    old = ["steps=3", "checkpoint_every=2", "data.batch_size=4", "optim.warmup_steps=1"]
    Trainer(tiny_config(caches, tmp_path / "old", *old, heldout=False)).train(until=2)
    state = tmp_path / "old" / "checkpoints" / "step-00000002" / "trainer_state.json"
    saved = json.loads(state.read_text())
    del saved["config"]["recall"]
    state.write_text(json.dumps(saved))
    assert Trainer(tiny_config(caches, tmp_path / "old", *old, heldout=False)).step == 2
