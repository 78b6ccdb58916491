"""A distill checkpoint written before issue 16's trainer split (tests/data/distill_checkpoint_v1) still
resumes, and writing the same state now gives the same files: the format did not change with the code's home.

The fixture was written by `Trainer.save_checkpoint` at f151d32 on the objects `_run` builds below,
after two optimizer steps, with the RNGs seeded to RNG_SEED just before saving.
"""
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill import parallel
from distill.checkpoint import check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint
from distill.config import load_config
from distill.data import PackedLoader
from distill.kd_student import KDStudent, batch_loss
from distill.optim import build_optimizer, build_scheduler
from distill.setup import build_student
from quasar_model.teacher_outputs.cache import open_teacher_cache

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "distill_checkpoint_v1"
CACHE = DATA / "teacher_cache_v1" / "6727916c4d87b3733b233ac45e5af46edc699761c41e6c947de79a0ad2b9959b"
RNG_SEED = 1234
# the tiny preset cut to ~7k parameters (every component kept: hybrid branches, MoE, engram)
STUDENT = dict(vocab_size=32, num_hidden_layers=2, hybrid_attention_layers=[1], engram_layers=[1], engram_slots=7,
               engram_dim=8, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
               intermediate_size=16, moe_intermediate_size=8, num_experts=4, n_group=2, topk_group=1,
               hybrid_output_adapter_rank=2, hybrid_quasar_gate_rank=4, hybrid_raven_slots=4, hybrid_raven_topk=2)


def _config(**optim):
    return load_config(student={"preset": "tiny", "overrides": STUDENT},
                       data={"train_cache": "tests/data/teacher_cache_v1", "seq_len": 8, "batch_size": 2},
                       optim={"lr": 1e-2, "warmup_steps": 1, **optim}, steps=4, checkpoint_every=2,
                       output_dir="unused", device="cpu", progress=False)


def _run(cfg):
    """(KDStudent, optimizer, scheduler, loader) as the trainer builds them, at step 0."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    student = build_student(cfg, 32)
    oc = cfg.optim
    opt = build_optimizer(student, lr=oc.lr, weight_decay=oc.weight_decay, betas=(oc.beta1, oc.beta2), eps=oc.eps,
                          engram_lr_multiplier=student.config.engram_lr_multiplier)
    sched = build_scheduler(opt, warmup=oc.warmup_steps, total=cfg.steps, min_ratio=oc.min_lr_ratio)
    loader = PackedLoader(open_teacher_cache(CACHE), cfg.data.seq_len, cfg.data.batch_size, cfg.seed)
    return KDStudent(student, temperature=1.0), opt, sched, loader


def _step(engine, opt, sched, loader) -> int:
    b = loader.next_batch()
    batch_loss(engine, b).backward()
    opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
    for moe in engine.student.model.moe_layers():
        moe.update_bias()
    return b.n_tokens


def test_a_checkpoint_written_before_the_split_resumes(tmp_path):
    cfg, env = _config(), parallel.DistEnv()
    ckpt = latest_checkpoint(FIXTURE)
    assert ckpt == FIXTURE / "step-00000002"
    check_resumable(ckpt, cfg)
    with pytest.raises(ValueError, match=r"trained with optim.lr=0.01, the config now says 0.02"):
        check_resumable(ckpt, _config(lr=2e-2))

    engine, opt, sched, loader = _run(cfg)
    saved = load_file(str(ckpt / "model.safetensors"))
    assert set(saved) == set(engine.student.state_dict())          # MoE balancing buffers included
    assert not torch.equal(engine.student.lm_head.weight, saved["lm_head.weight"])
    step, tokens = load_checkpoint(ckpt, model=engine, optimizer=opt, scheduler=sched, loader=loader, env=env)
    assert (step, tokens, loader.state_dict()) == (2, 24, {"epoch": 2, "offset": 0})
    now = engine.student.state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())
    assert [s["step"] for s in opt.state.values()] == [torch.tensor(2.0)] * len(opt.state)
    assert sched.last_epoch == 2
    got_torch, got_python = torch.get_rng_state(), random.getstate()
    torch.manual_seed(RNG_SEED)
    random.seed(RNG_SEED)
    assert torch.equal(got_torch, torch.get_rng_state()) and got_python == random.getstate()

    # the state it restored, written now, is the fixture again: the same bytes where the writer
    # controls them (safetensors, JSON), the same contents in torch's pickles
    new = save_checkpoint(tmp_path, step=step, tokens_seen=tokens, model=engine, optimizer=opt, scheduler=sched,
                          loader=loader, cfg=cfg, env=env)
    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in ckpt.iterdir())
    for name in ("model.safetensors", "trainer_state.json"):
        assert (new / name).read_bytes() == (ckpt / name).read_bytes(), name
    for name in ("optimizer.pt", "trainer_state.pt", "rng_rank0.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (new, ckpt))
        assert _same(a, b), name
    assert (tmp_path / "latest").read_text() == (FIXTURE / "latest").read_text()

    # and training goes on from it
    assert _step(engine, opt, sched, loader) > 0 and sched.last_epoch == 3


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):      # a resumed optimizer's betas come back from torch as a list
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
