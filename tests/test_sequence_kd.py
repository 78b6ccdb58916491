"""Sequence-level KD across tokenizers: teacher generations, re-tokenised by a different student
tokenizer, trained with plain CE through the same cache/trainer machinery."""
import json
import math

import pytest

from distill.cli import main as distill_main
from distill.config import load_config
from distill.sequence_kd import generate_teacher_texts, write_teacher_texts
from distill.trainer import Trainer
from quasar_model import corpus
from quasar_model.teacher_outputs.cache import open_teacher_cache
from quasar_model.teacher_outputs.capture import load_teacher
from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher, train_tokenizer
from quasar_model.tokenization import VocabMap


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("seqkd")
    student_tok = train_tokenizer(corpus.local_split("train")[:120], 400)  # another vocabulary than the teacher's
    student_tok.save_pretrained(d / "student-tok")
    teacher_tok = AutoTokenizer.from_pretrained(tiny_teacher())
    gen = d / "generations.jsonl"
    assert distill_main(["teacher-generate", "--teacher", "tiny-teacher", "--data", "corpus:train", "--max-docs", "32",
                         "--prompt-chars", "80", "--max-new-tokens", "48", "--device", "cpu", "--out", str(gen)]) == 0
    assert distill_main(["teacher-cache", "--text-only", "--tokenizer", str(d / "student-tok"), "--data", str(gen),
                         "--seq-len", "64", "--out", str(d / "cache")]) == 0
    (cache_dir,) = [p for p in (d / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return d, gen, cache_dir, student_tok, teacher_tok


def test_generations_are_teacher_text_in_the_student_vocabulary(setup):
    d, gen, cache_dir, student_tok, teacher_tok = setup
    texts = [json.loads(line)["text"] for line in gen.read_text().splitlines()]
    assert len(texts) == 32 and all(len(t) > 80 for t in texts)
    cache = open_teacher_cache(cache_dir)
    assert cache.meta.teacher_id == "text-only" and cache.meta.vocab_size == len(student_tok)
    s = cache[0]
    assert s.topk_ids[:-1, 0].tolist() == s.input_ids[1:].tolist()  # the "teacher" is the next token
    assert VocabMap(teacher_tok, student_tok).coverage < 0.6          # the case this fallback exists for


@pytest.mark.slow
def test_ce_on_teacher_generations_trains_the_student(setup, tmp_path):
    d, gen, cache_dir, student_tok, teacher_tok = setup
    cfg = load_config(None, [f"data.train_cache={cache_dir}", f"data.tokenizer={d / 'student-tok'}",
                             "data.seq_len=64", "data.batch_size=8", "loss.ce_weight=1", "steps=80",
                             "optim.warmup_steps=5", "optim.lr=0.005", "student.preset=tiny",
                             'student.overrides={"num_loops": 1}', f"output_dir={tmp_path / 'run'}",
                             "progress=false", "device=cpu", "checkpoint_every=80"])
    records = Trainer(cfg).train()
    losses = [r["loss"] for r in records if "loss" in r]
    # starts at the uniform guess, log V; ends more than a nat per token better than it
    assert abs(losses[0] - math.log(len(student_tok))) < 0.3 and losses[-1] < math.log(len(student_tok)) - 1, losses
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_text_cache_refuses_kd_mixing(setup, tmp_path):
    d, gen, cache_dir, *_ = setup
    cfg = load_config(None, [f"data.train_cache={cache_dir}", f"data.tokenizer={d / 'student-tok'}",
                             "loss.ce_weight=0.5", f"output_dir={tmp_path / 'run'}", "device=cpu"])
    with pytest.raises(ValueError, match="ce_weight=1"):
        Trainer(cfg)


# -----------------------------------------------------------------------------
# the teacher's generations

def test_generate_teacher_texts_is_deterministic_by_seed(tmp_path):
    model, tok = load_teacher(tiny_teacher(progress=False))
    prompts = ["The for statement", "A class definition"]
    a = generate_teacher_texts(model, tok, prompts, 12, temperature=1.0, seed=0)
    b = generate_teacher_texts(model, tok, prompts, 12, temperature=1.0, seed=0)
    c = generate_teacher_texts(model, tok, prompts, 12, temperature=1.0, seed=1)
    assert a == b and a != c
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(a, prompts))
    # prompt i's text depends on (seed, i, prompt i) only, not on the other prompts
    assert generate_teacher_texts(model, tok, ["Something else", prompts[1]], 12, temperature=1.0, seed=0)[1] == a[1]
    g1 = generate_teacher_texts(model, tok, prompts, 8, temperature=0, seed=0, include_prompt=False)
    assert g1 == generate_teacher_texts(model, tok, prompts, 8, temperature=0, seed=5, include_prompt=False)
    path = write_teacher_texts(tmp_path / "seqkd" / "train.jsonl", a)
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == a
