"""Training: optimizer groups, schedule, config, and end to end on CPU.

The end-to-end tests distill the project's tiny teacher (trained on the local corpus on first use,
~70 s, then cached) into a `tiny` student through teacher caches of the corpus's train and held-out
splits (captured once, ~15 s, then reused from $QUASAR_CACHE/test-teacher-caches).

Slow: `test_slow_heldout_kl_halves` (~35-45 s of training); marked `slow`, so only the full run has it.
"""
import json
import time
from pathlib import Path

import pytest
import torch

from distill.cli import main as cli_main
from distill.cli import teacher_cache_main
from distill.config import load_config
from distill.kd_student import heldout_kl
from distill.metrics_log import read_metrics
from distill.optim import WarmupCosine, build_optimizer, build_scheduler, is_engram, no_weight_decay
from distill.trainer import Trainer
from quasar_model.paths import cache_root
from quasar_model.teacher_outputs.cache import TeacherCacheError, open_teacher_cache
from quasar_model.teacher_outputs.capture import load_teacher
from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "distill_tiny.json"


@pytest.fixture(scope="module")
def caches():
    root = cache_root() / "test-teacher-caches"
    kw = dict(k=16, seq_len=128, batch_size=64, progress=False)
    return (teacher_cache_main("tiny-teacher", "corpus:train", root / "train", **kw),
            teacher_cache_main("tiny-teacher", "corpus:heldout", root / "heldout", **kw))


def tiny_config(caches, out, *overrides, heldout=True):
    train, held = caches
    return load_config(CONFIG, [f"data.train_cache={train}", f"data.heldout_cache={held if heldout else 'none'}",
                                f"output_dir={out}", "progress=false", *overrides])


# -----------------------------------------------------------------------------
# optimizer, schedule, config

def test_param_groups_decay_and_engram_lr():
    from quasar_model import QuasarLongConfig, QuasarLongForCausalLM

    model = QuasarLongForCausalLM(QuasarLongConfig.preset("tiny"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, engram_lr_multiplier=5.0)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay", "engram_decay", "engram_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    in_group = {names[id(p)]: g["name"] for g in opt.param_groups for p in g["params"]}
    assert sorted(in_group) == sorted(names.values())                  # every parameter, exactly once
    for name, g in in_group.items():
        p = model.get_parameter(name)
        assert g.startswith("engram_") == is_engram(name)
        assert g.endswith("no_decay") == no_weight_decay(name, p)
    for n in ("model.norm.weight", "model.loop_gates", "model.layers.1.mixer.alpha",
              "model.layers.1.mixer.channel_scale", "model.layers.2.engram.k_norm.weight"):
        assert in_group[n].endswith("no_decay"), n
    for n in ("lm_head.weight", "model.layers.1.mixer.attn.qkv_proj.weight", "model.layers.1.ffn.gate_up_proj"):
        assert in_group[n] == "decay", n
    assert in_group["model.layers.2.engram.table.weight"] == "engram_decay"
    assert groups["engram_decay"]["lr"] == pytest.approx(5e-3) and groups["decay"]["lr"] == pytest.approx(1e-3)
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1


def test_warmup_cosine_schedule_and_its_state():
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert [round(f(s), 6) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))                # monotone after the warmup
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([{"params": [p], "lr": 2.0, "lr_scale": 2.0}], lr=1.0)
    sched = build_scheduler(opt, warmup=10, total=110, min_ratio=0.1)
    for _ in range(37):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * f(37))      # the engram scale rides along
    opt2 = torch.optim.AdamW([{"params": [p], "lr": 2.0, "lr_scale": 2.0}], lr=1.0)
    sched2 = build_scheduler(opt2, warmup=1, total=5)
    sched2.load_state_dict(sched.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_config_file_overrides_and_errors(tmp_path):
    cfg = load_config(CONFIG, ["optim.lr=1e-3", "loss.kind=jsd", "student.overrides.num_loops=1",
                               "eval_sequences=none", "resume=false"])
    assert (cfg.optim.lr, cfg.loss.kind, cfg.student.overrides, cfg.resume) == (1e-3, "jsd", {"num_loops": 1}, False)
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  train_cache: x\n  batch_size: 2\nsteps: 7\n")
    cfg = load_config(y)
    assert (cfg.data.batch_size, cfg.steps, cfg.data.seq_len) == (2, 7, 128)
    for bad, msg in ((["optim.lrr=1"], "unknown key; did you mean 'lr'"),
                     (["steps=1.5"], "steps=1.5: expected int"),
                     (["loss.kind=kl"], "loss.kind: must be one of"),
                     (["data.batch_size=0"], "data.batch_size: must be >= 1"),
                     (["optim"], "expected key=value")):
        with pytest.raises(ValueError, match=msg):
            load_config(CONFIG, bad)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"data": {"train_cache": "x", "seq_len": "long"}}))
    with pytest.raises(ValueError, match=r"data.seq_len: expected int, got str 'long'"):
        load_config(j)


def test_dtype_short_spellings_are_read_at_the_config_boundary_only():
    cfg = load_config(CONFIG, ["dtype=bf16", "teacher.dtype=fp16"])
    assert (cfg.dtype, cfg.teacher.dtype) == ("bfloat16", "float16")     # the code sees one spelling
    assert load_config(CONFIG, ["dtype=fp32"]).dtype == "float32"
    with pytest.raises(ValueError, match="config dtype: must be bfloat16 or float32"):
        load_config(CONFIG, ["dtype=half"])
    with pytest.raises(ValueError, match=r"dtype: unknown 'bf16'"):      # past the boundary: torch's names
        load_teacher(tiny_teacher(progress=False), dtype="bf16")


# -----------------------------------------------------------------------------
# end to end

@pytest.mark.slow
def test_slow_heldout_kl_halves(caches, tmp_path):
    """Tiny teacher -> tiny student on the corpus train split: held-out KL at least halves in ~a CPU-minute."""
    cfg = tiny_config(caches, tmp_path / "run")
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    records = trainer.train()
    wall = time.perf_counter() - t0
    kl = [r["heldout_kl"] for r in records if "heldout_kl" in r]
    print(f"\nheld-out KL {kl[0]:.4f} -> {kl[-1]:.4f} ({kl[0] / kl[-1]:.2f}x) in {cfg.steps} steps, {wall:.1f} s; "
          f"curve {[round(x, 3) for x in kl]}")
    assert kl[-1] <= 0.5 * kl[0]
    out = Path(cfg.output_dir)
    assert (out / "loss_curve.png").stat().st_size > 0
    assert len([r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]) == cfg.steps
    # the export is a plain Hugging Face checkpoint that scores exactly what the trainer measured
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quasar_model

    quasar_model.register()
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert AutoTokenizer.from_pretrained(out / "final").eos_token_id == model.config.eos_token_id
    again = heldout_kl(model, open_teacher_cache(caches[1]), seq_len=128, batch_size=4)
    assert again == pytest.approx(kl[-1], rel=1e-5)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(caches, tmp_path):
    """Kill after a checkpoint (and after some unsaved steps), resume in a new Trainer: the loss curve
    and the final weights are those of the run that was never interrupted, bit for bit."""
    over = ["steps=10", "checkpoint_every=4", "data.batch_size=2", "data.grad_accum=2", "loss.ce_weight=0.1",
            "optim.warmup_steps=3"]
    whole = Trainer(tiny_config(caches, tmp_path / "whole", *over, heldout=False))
    whole.train()
    crashed = Trainer(tiny_config(caches, tmp_path / "crash", *over, heldout=False))
    crashed.train(until=6)                  # checkpoint at 4, then 2 steps that are lost
    del crashed
    resumed = Trainer(tiny_config(caches, tmp_path / "crash", *over, heldout=False))
    assert resumed.step == 4 and resumed.resumed_from.name == "step-00000004"
    resumed.train()

    def curve(run):
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens"])
                for r in read_metrics(tmp_path / run / "metrics.jsonl")]
    assert curve("crash") == curve("whole")
    assert [r[0] for r in curve("crash")] == list(range(1, 11))
    a, b = whole.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)                      # MoE balancing buffers included
    assert resumed.loader.position == whole.loader.position


def test_grad_accumulation_equals_the_big_batch(caches, tmp_path):
    """A step over 2 micro-batches of 2 rows is the step over one batch of 4 rows."""
    base = ["steps=2", "checkpoint_every=100", "optim.warmup_steps=1"]
    big = Trainer(tiny_config(caches, tmp_path / "big", *base, "data.batch_size=4", heldout=False))
    acc = Trainer(tiny_config(caches, tmp_path / "acc", *base, "data.batch_size=2", "data.grad_accum=2",
                              heldout=False))
    r1, r2 = big.train_step(), acc.train_step()
    assert r1["tokens"] == r2["tokens"]
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)
    # Adam's first step is ~lr * sign(grad): float-level gradient differences on near-zero entries
    # move those weights by up to 2 lr, so the next step agrees to a looser tolerance
    r1, r2 = big.train_step(), acc.train_step()
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-3)


def test_clear_errors(caches, tmp_path):
    train, held = caches
    with pytest.raises(TeacherCacheError, match="k mismatch"):
        open_teacher_cache(train, k=8)
    with pytest.raises(TeacherCacheError, match="vocab mismatch"):
        open_teacher_cache(train, vocab_size=50)
    with pytest.raises(TeacherCacheError, match="another tokenizer"):
        open_teacher_cache(train, tokenizer_fingerprint="0" * 64)
    cases = [
        (["student.overrides.vocab_size=300"], "smaller than the teacher's"),
        (["loss.temperature=2.0"], "captured at temperature 1.0"),
        (["loss.hidden_mse_weight=0.5"], "teacher.model: must name the live teacher"),
        (["loss.hidden_mse_weight=0.5", "teacher.model=tiny"], "compares the residual streams directly"),
        ([f"data.heldout_cache={train}"], "same data as the training cache"),
        ([f"data.train_cache={tmp_path / 'nothing'}"], "no such directory"),
        ([f"data.train_cache={tmp_path}"], "holds no teacher cache"),
        (["data.seq_len=64"], "longer than seq_len=64"),
    ]
    for over, msg in cases:
        with pytest.raises(ValueError, match=msg):
            Trainer(tiny_config(caches, tmp_path / "err", *over))
    # a checkpoint only resumes the run it belongs to
    Trainer(tiny_config(caches, tmp_path / "ck", "steps=1", heldout=False)).train()
    with pytest.raises(ValueError, match="trained with optim.lr=0.006"):
        Trainer(tiny_config(caches, tmp_path / "ck", "steps=1", "optim.lr=0.01", heldout=False))


def test_cli_reports_a_dataset_without_the_text_field(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"body": "some text"}) + "\n")
    rc = cli_main(["teacher-cache", "--teacher", "tiny-teacher", "--data", str(data), "--out", str(tmp_path / "c"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no text field 'text'" in err and "['body']" in err
