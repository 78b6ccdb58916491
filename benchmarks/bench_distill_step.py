"""One distillation step end to end: teacher-cache read + packing + student fwd/bwd + KD loss + AdamW.

On the GPU machine (bf16 autocast, fp32 master weights, as `quasar distill` runs):
    python benchmarks/bench_distill_step.py                      # small, 4 x 2048 tokens, k=64
A CPU run of the same harness:
    python benchmarks/bench_distill_step.py --device cpu --preset tiny --seq 128 --batch 8

Two loss paths, each in its own fresh subprocess (so each peak memory is its own):
  sparse  the trainer's path: final hidden states -> chunked sparse KD (never builds [B*T, V] logits)
  naive   the baseline: full logits model(...).logits [B, T, V] -> naive_kd_loss on them
The teacher cache is synthetic (random top-k of the preset's vocab, written with the real cache
writer and read back through the real reader and packer), so no teacher is needed. Reports the
median step time and tokens/s (row slots B*T per step) after --warmup untimed steps, the peak
memory over the timed steps (CUDA: max_memory_allocated; CPU: the process's peak RSS, its
high-water mark reset just before the timed steps, see peak_rss.py; and the part of it over the
RSS between steps, i.e. what a step itself needs), and the sparse/naive ratios. --json writes the
results.

Before any timing, both loss paths are run once on the same weights and the same batch, in a
subprocess of their own, and the benchmark stops unless they give the same loss and gradients.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from distill.config import DTYPE_ALIASES
from distill.data import PackedLoader
from distill.kd_student import KDStudent
from distill.losses import naive_kd_loss
from distill.optim import build_optimizer
from peak_rss import PeakRSS
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM
from quasar_model.teacher_outputs.cache import CapturedSequence, TeacherCacheMeta, TeacherCacheWriter, open_teacher_cache


def synthetic_cache(root: Path, n_seq: int, seq_len: int, vocab: int, k: int, seed: int = 0) -> Path:
    """n_seq sequences of seq_len/4..seq_len tokens with a peaked random top-k teacher."""
    g = torch.Generator().manual_seed(seed)
    meta = TeacherCacheMeta(teacher_id="synthetic", teacher_revision=None, tokenizer_fingerprint="synthetic",
                            vocab_size=vocab, k=k, temperature=1.0, data_fingerprint=f"synthetic-{seed}")
    with TeacherCacheWriter(root, meta) as w:
        for i in range(n_seq):
            T = int(torch.randint(seq_len // 4, seq_len + 1, (1,), generator=g))
            ids = torch.randint(0, vocab, (T,), generator=g)
            # k distinct ids per row: a random start and stride modulo the vocab
            base = torch.randint(0, vocab, (T, 1), generator=g)
            stride = torch.randint(1, vocab // k, (T, 1), generator=g)
            top = (base + torch.arange(k) * stride) % vocab                           # [T, k]
            lp = torch.log_softmax(torch.randn(T, k, generator=g) * 2.5, -1).sort(-1, descending=True).values
            mass = 0.9 + 0.09 * torch.rand(T, 1, generator=g)                         # top-k mass, tail = rest
            w.add(CapturedSequence(i, ids, top, lp + mass.log(), (1 - mass).squeeze(1)))
    return w.path


class NaiveKD(nn.Module):
    """The baseline loss path: full logits, then the plain KD loss on them."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, input_ids, position_ids, topk_ids, topk_logprobs, tail, mask, labels):
        logits = self.student(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return naive_kd_loss(logits, topk_ids, topk_logprobs, mask=mask, tail=tail)   # [B, T, V] materialised


def build_student(args):
    torch.manual_seed(0)
    cfg = QuasarLongConfig.preset(args.preset)
    return QuasarLongForCausalLM(cfg).to(torch.device(args.device)).train()


def uses_amp(args) -> bool:
    return args.device.startswith("cuda") and args.dtype == "bfloat16"


def check_same_loss(args) -> dict:
    """Both loss paths on one batch from the same weights: loss and gradients must agree."""
    device = torch.device(args.device)
    student = build_student(args)
    b = PackedLoader(open_teacher_cache(args.cache), args.seq, args.batch, seed=0).next_batch().to(device)
    out = {}
    for mode, model in (("sparse", KDStudent(student)), ("naive", NaiveKD(student))):
        student.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_amp(args)):
            loss = model(b.input_ids, b.position_ids, b.topk_ids, b.topk_logprobs, b.tail, b.mask, b.labels)
        loss.backward()
        grad = torch.cat([p.grad.float().flatten() for p in student.parameters() if p.grad is not None])
        out[mode] = (loss.float().item(), grad)
    (ls, gs), (ln, gn) = out["sparse"], out["naive"]
    grad_err = ((gs - gn).norm() / gn.norm()).item()
    tol = 2e-2 if uses_amp(args) else 1e-4      # bf16 logits vs fp32 logits; else summation order
    if not (abs(ls - ln) <= tol * abs(ln) and grad_err <= tol):
        raise SystemExit(f"sparse and naive paths disagree: loss {ls:.6f} vs {ln:.6f}, "
                         f"gradient error ratio {grad_err:.2e} (tolerance {tol:g})")
    return {"loss_sparse": ls, "loss_naive": ln, "grad_err": grad_err}


def worker(args) -> dict:
    """Measure one mode in this process; returns its results."""
    device = torch.device(args.device)
    student = build_student(args)
    cfg = student.config
    model = KDStudent(student) if args.mode == "sparse" else NaiveKD(student)
    opt = build_optimizer(student, lr=1e-4, weight_decay=0.1, engram_lr_multiplier=cfg.engram_lr_multiplier)
    cache = open_teacher_cache(args.cache)
    loader = PackedLoader(cache, args.seq, args.batch, seed=0)
    use_amp = uses_amp(args)

    def step():
        b = loader.next_batch().to(device)                     # cache read + packing + copy
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = model(b.input_ids, b.position_ids, b.topk_ids, b.topk_logprobs, b.tail, b.mask, b.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for moe in student.model.moe_layers():
            moe.update_bias()
        return loss

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss = PeakRSS()
    resident = rss.reset()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        step_mem = None
    else:
        step_mem = rss.peak_over_baseline() / 1024
        peak = resident / 1024 + step_mem
    t = statistics.median(times)
    return {"step_s": t, "tokens_per_s": args.batch * args.seq / t, "peak_mem_gib": peak,
            "step_mem_gib": step_mem, "loss": float(loss),
            "params": sum(p.numel() for p in student.parameters())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--preset", default=None, help="default: small on CUDA, tiny on CPU")
    ap.add_argument("--seq", type=int, default=None, help="row length (default 2048 CUDA, 128 CPU)")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default 4 CUDA, 8 CPU)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", type=lambda s: DTYPE_ALIASES.get(s, s),
                    choices=["bfloat16", "float32"], help="autocast on CUDA (bf16/fp32 accepted); CPU is float32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["sparse", "naive"], choices=["sparse", "naive"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)      # internal: worker subprocess
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.preset = args.preset or ("small" if on_gpu else "tiny")
    args.seq = args.seq or (2048 if on_gpu else 128)
    args.batch = args.batch or (4 if on_gpu else 8)

    if args.mode:           # worker: one mode (or the check), results as the last stdout line
        print(json.dumps(check_same_loss(args) if args.mode == "check" else worker(args)))
        return

    vocab = QuasarLongConfig.preset(args.preset).vocab_size
    n_seq = math.ceil(2 * (args.warmup + args.steps) * args.batch) + 16      # rows hold ~1.6 sequences
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = synthetic_cache(Path(tmp), n_seq, args.seq, vocab, args.k)
        print(f"synthetic teacher cache: {n_seq} sequences, k={args.k}, V={vocab} ({time.perf_counter() - t0:.1f} s)")
        for mode in ["check"] + args.modes:
            cmd = [sys.executable, __file__, "--mode", mode, "--cache", str(cache)] + [
                f"--{a}={getattr(args, a)}" for a in ("device", "preset", "seq", "batch", "k", "dtype", "steps", "warmup")]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                tail = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "?"
                if mode == "check":
                    raise SystemExit(f"not timing: {tail}")
                results[mode] = {"error": tail}
                print(f"  {mode:<6} failed: {tail}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if mode == "check":
                print(f"same batch, same weights: loss sparse {r['loss_sparse']:.6f}, naive {r['loss_naive']:.6f}, "
                      f"gradient error ratio {r['grad_err']:.1e}")
                continue
            results[mode] = r

    amp = "bf16 autocast" if on_gpu and args.dtype == "bfloat16" else "fp32"
    print(f"{args.preset} distill step (cache read + pack + fwd/bwd + KD + AdamW + MoE bias), "
          f"{args.batch}x{args.seq} tokens, k={args.k}, {amp}, {args.device}")
    for mode, r in results.items():
        if "error" not in r:
            step = "" if r["step_mem_gib"] is None else f" (a step's own: {r['step_mem_gib']:.3f} GiB)"
            print(f"  {mode:<6} {r['tokens_per_s']:>12,.0f} tok/s  step {r['step_s'] * 1e3:8.1f} ms  "
                  f"peak {r['peak_mem_gib']:.3f} GiB{step}  loss {r['loss']:.4f}")
    s, n = results.get("sparse", {}), results.get("naive", {})
    if "tokens_per_s" in s and "tokens_per_s" in n:
        step = "" if s["step_mem_gib"] is None else \
            f", a step's own memory {s['step_mem_gib'] / max(n['step_mem_gib'], 1e-9):.2f}x"
        print(f"  sparse/naive: throughput {s['tokens_per_s'] / n['tokens_per_s']:.2f}x, "
              f"peak memory {s['peak_mem_gib'] / max(n['peak_mem_gib'], 1e-9):.2f}x{step}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
