"""Evaluation speed and memory: held-out and recall tokens/s, prefill peak memory, a full score.

1. tokens/s of the evaluator's three loops on one model: held-out scoring (forward + bucket KL +
   CE against a synthetic top-k teacher), recall prefill (chunked, through the cache), greedy decode.
2. peak memory of recall prefill at 1x and 4x the context, chunked (`--chunk` tokens per forward,
   what eval.recall does) vs unchunked (the whole prompt in one forward, the baseline), and the
   ratios. Chunking bounds the activations by the chunk; what still grows with the context is the
   cache itself (attention K/V; the branches' recurrent states are fixed-size), printed beside.
   CUDA: torch's peak allocated bytes. CPU: each point runs in a fresh process and reports its
   peak RSS growth during the prefill (after a warm-up forward).
3. recall evaluation at 1x/2x/4x of --recall-context: `--recall-items` prompts per length (equal
   length, as a round's exact-length forms make them), graded by eval.recall.run_recall one item at
   a time (the baseline) and `--batch` items per forward; tokens/s, peak memory (as in 2.) and the
   ratios batched / one at a time. Answers are random tokens, so most rows stop after one decode
   step: prefill dominates, as it does for the validator.
4. --e2e: one submission fully scored as a validator does (eval.evaluate: held-out set + teacher
   cache, recall items, KL/CE, recall, fingerprint, continuations) on a localnet round resized by
   --context/--docs/--depth-bins; the teacher is the tiny teacher (trained on first use), so no
   download is needed and any preset can be the student (its vocabulary only has to cover 1024 ids).

    python benchmarks/bench_eval.py                                   # CPU, tiny
    python benchmarks/bench_eval.py --device cuda --preset small --context 8192 --e2e
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from eval.heldout import score_document
from eval.recall import greedy_decode, prefill, run_recall
from eval.recall_tasks import TaskItem
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM


def build(preset: str, device: str, seed: int = 0, min_vocab: int = 0):
    torch.manual_seed(seed)
    vocab = max(QuasarLongConfig.preset(preset).vocab_size, min_vocab)
    cfg = QuasarLongConfig.preset(preset, vocab_size=vocab, max_position_embeddings=1 << 22)
    return QuasarLongForCausalLM(cfg).to(device).eval()


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_teacher(T: int, V: int, k: int, device: str):
    """A CapturedSequence-shaped top-k of a random distribution (what score_document reads)."""
    lp = torch.log_softmax(torch.randn(T, V, device=device) * 2, dim=-1)
    top_lp, top_ids = lp.topk(k, dim=-1)
    tail = (1 - top_lp.exp().sum(-1)).clamp_min(0)
    return SimpleNamespace(topk_ids=top_ids, topk_logprobs=top_lp, tail_mass=tail)


@torch.no_grad()
def throughput(model, device: str, T: int, docs: int, ctx: int, chunk: int, k: int = 32) -> dict:
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    out = {}
    ids = [torch.randint(0, V, (T,), generator=g).tolist() for _ in range(docs)]
    caps = [synthetic_teacher(T, V, k, device) for _ in range(docs)]
    score_document(model, ids[0], caps[0], device=device)   # warm-up
    sync(device)
    t0 = time.perf_counter()
    for d, c in zip(ids, caps):
        score_document(model, d, c, device=device)
    sync(device)
    out["held-out score"] = docs * T / (time.perf_counter() - t0)

    prompt = torch.randint(0, V, (ctx,), generator=g).tolist()
    prefill(model, prompt[:chunk], chunk, device)
    sync(device)
    t0 = time.perf_counter()
    prefill(model, prompt, chunk, device)
    sync(device)
    out[f"recall prefill ({ctx} tok, chunk {chunk})"] = ctx / (time.perf_counter() - t0)

    n = 32
    short = prompt[:64]
    t0 = time.perf_counter()
    greedy_decode(model, short, 1, prefill_chunk=chunk, device=device)
    sync(device)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy_decode(model, short, n + 1, prefill_chunk=chunk, device=device)
    sync(device)
    out["greedy decode"] = n / max(1e-9, time.perf_counter() - t0 - t_prefill)
    return out


# -----------------------------------------------------------------------------
# peak memory of one prefill

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


@torch.no_grad()
def prefill_peak(preset: str, device: str, ctx: int, chunk: int) -> tuple[int, int]:
    """(bytes the prefill of a ctx-token prompt adds at its peak, bytes of the cache it leaves)."""
    model = build(preset, device)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (ctx,), generator=torch.Generator().manual_seed(0)).tolist()
    prefill(model, prompt[:256], 256, device)   # warm-up: lazy allocations belong to the baseline
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _, cache = prefill(model, prompt, chunk, device)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, _tensor_bytes(cache.entries)
    base = _rss_bytes()
    _, cache = prefill(model, prompt, chunk, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
    return max(0, peak - base), _tensor_bytes(cache.entries)


def measure_peak(preset: str, device: str, ctx: int, chunk: int, threads: int) -> tuple[int, int]:
    if device.startswith("cuda"):
        return prefill_peak(preset, device, ctx, chunk)
    # CPU: ru_maxrss only ever grows, so every point needs a process of its own
    cmd = [sys.executable, __file__, "--child-peak", preset, str(ctx), str(chunk), "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return tuple(json.loads(res.stdout.strip().splitlines()[-1]))


# -----------------------------------------------------------------------------
# recall evaluation: one item at a time vs batched

def _recall_items(V: int, ctx: int, n: int) -> list[TaskItem]:
    g = torch.Generator().manual_seed(ctx)
    return [TaskItem("passkey", 1, 0, torch.randint(0, V, (ctx,), generator=g).tolist(),
                     torch.randint(0, V, (4,), generator=g).tolist(), " ?") for _ in range(n)]


@torch.no_grad()
def recall_point(preset: str, device: str, ctx: int, n: int, batch: int, chunk: int) -> tuple[float, int]:
    """(prompt tokens/s of run_recall over n items of ctx tokens at this batch size, peak bytes it adds)."""
    model = build(preset, device)
    items = _recall_items(model.config.vocab_size, ctx, n)
    run_recall(model, _recall_items(model.config.vocab_size, 64, batch), prefill_chunk=chunk, max_answer_tokens=4,
               device=device, batch_size=batch)   # warm-up: lazy allocations belong to the baseline
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    run_recall(model, items, prefill_chunk=chunk, max_answer_tokens=4, device=device, batch_size=batch)
    sync(device)
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return n * ctx / dt, max(0, peak - base)


def measure_recall(args, ctx: int, batch: int) -> tuple[float, int]:
    if args.device.startswith("cuda"):
        return recall_point(args.preset, args.device, ctx, args.recall_items, batch, args.chunk)
    cmd = [sys.executable, __file__, "--child-recall", args.preset, str(ctx), str(args.recall_items), str(batch),
           str(args.chunk), "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return tuple(json.loads(res.stdout.strip().splitlines()[-1]))


def recall_batching(args) -> None:
    mib = 1 << 20
    print(f"\nrecall evaluation (run_recall), {args.recall_items} items per length, chunk {args.chunk}: "
          f"one at a time vs --batch {args.batch}")
    print(f"  {'context':>8}{'1 at a time':>16}{f'batch {args.batch}':>16}{'speed':>8}"
          f"{'peak, 1 at a time':>20}{f'peak, batch {args.batch}':>16}{'memory':>8}")
    out = {}
    for m in (1, 2, 4):
        ctx = m * args.recall_context
        (t1, p1), (tb, pb) = measure_recall(args, ctx, 1), measure_recall(args, ctx, args.batch)
        out[f"{m}x"] = dict(tokens_per_s_1=t1, tokens_per_s_batch=tb, peak_1=p1, peak_batch=pb)
        print(f"  {f'{m}x {ctx}':>8}{t1:>11,.0f} tok/s{tb:>11,.0f} tok/s{tb / t1:>7.2f}x"
              f"{p1 / mib:>16.1f} MiB{pb / mib:>12.1f} MiB{pb / max(p1, 1):>7.2f}x")
    print(json.dumps(out))


# -----------------------------------------------------------------------------
# one submission, end to end

def end_to_end(args) -> None:
    from eval.competition import load_competition
    from eval.evaluate import prepare_round, score_model

    c = load_competition("localnet")
    comp = dataclasses.replace(
        c, heldout=dataclasses.replace(c.heldout, documents=args.docs, seq_len=args.seq_len),
        recall=dataclasses.replace(c.recall, context_len=args.context, depth_bins=args.depth_bins,
                                   prefill_chunk=args.chunk, max_answer_tokens=32))
    model = build(args.preset, args.device, min_vocab=comp.student.vocab_size)   # tiny: 384 -> 1024 ids
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    inputs = prepare_round(comp, 0, cache_root=args.cache_root, device=args.device, progress=False)
    t_prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = score_model(model, inputs, device=args.device)
    sync(args.device)
    t_score = time.perf_counter() - t0
    n_doc = sum(len(d.input_ids) for d in inputs.heldout.docs)
    n_rec = sum(len(it.prompt_ids) for it in inputs.items)
    print(f"\nend to end, preset {args.preset} ({n_params / 1e6:.1f} M params) on {args.device}: "
          f"{len(inputs.heldout.docs)} documents ({n_doc} tokens), {len(inputs.items)} recall items "
          f"({n_rec} prompt tokens, contexts {[args.context * m for m in comp.recall.lengths]})")
    print(f"  prepare round (documents, teacher cache, recall items): {t_prep:8.2f} s")
    print(f"  score the submission (KL/CE, recall, fingerprint, gate): {t_score:8.2f} s   "
          f"({(n_doc + n_rec) / t_score:,.0f} tokens/s)")
    print(f"  {len(result.items)} item results")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=2048, help="1x context of the memory comparison")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk")
    ap.add_argument("--seq-len", type=int, default=256, help="held-out document length")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--depth-bins", type=int, default=10)
    ap.add_argument("--recall-context", type=int, default=512, help="1x context of the recall batching comparison")
    ap.add_argument("--recall-items", type=int, default=8, help="recall items per length in that comparison")
    ap.add_argument("--batch", type=int, default=4, help="recall items per forward in that comparison")
    ap.add_argument("--e2e", action="store_true", help="also score one submission end to end")
    ap.add_argument("--cache-root", default=None)
    ap.add_argument("--child-peak", nargs=3, metavar=("PRESET", "CTX", "CHUNK"), help=argparse.SUPPRESS)
    ap.add_argument("--child-recall", nargs=5, metavar=("PRESET", "CTX", "N", "BATCH", "CHUNK"), help=argparse.SUPPRESS)
    ap.add_argument("--skip-prefill", action="store_true", help="only the recall batching comparison (and --e2e)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_recall:
        preset, ctx, n, batch, chunk = args.child_recall
        print(json.dumps(recall_point(preset, "cpu", int(ctx), int(n), int(batch), int(chunk))))
        return
    if args.skip_prefill:
        recall_batching(args)
        if args.e2e:
            end_to_end(args)
        return
    if args.child_peak:
        preset, ctx, chunk = args.child_peak
        print(json.dumps(prefill_peak(preset, "cpu", int(ctx), int(chunk))))
        return

    model = build(args.preset, args.device)
    print(f"preset {args.preset} on {args.device}, {args.threads} thread(s)")
    for name, tps in throughput(model, args.device, args.seq_len, args.docs, args.context, args.chunk).items():
        print(f"  {name:<40} {tps:>12,.0f} tokens/s")
    del model

    c1, c4 = args.context, 4 * args.context
    peaks = {(mode, ctx): measure_peak(args.preset, args.device, ctx, args.chunk if mode == "chunked" else ctx,
                                       args.threads)
             for mode in ("chunked", "unchunked") for ctx in (c1, c4)}
    mib = 1 << 20
    print(f"\nprefill peak memory ({'allocated' if args.device.startswith('cuda') else 'RSS growth'}), "
          f"chunk {args.chunk}")
    print("  cache = K/V + recurrent state left after the prompt: grows with the context however it is fed;")
    print("  work = peak - cache. Chunked work is the chunk's activations plus one transient copy of the K/V")
    print("  (attention grows its cache by torch.cat, which holds the old and the new tensor at once)")
    print(f"  {'':<10}{'':<6}{f'{c1} tok':>12}{f'{c4} tok':>12}{'4x / 1x':>10}")
    for mode in ("chunked", "unchunked"):
        for what, pick in (("peak", lambda p: p[0]), ("cache", lambda p: p[1]), ("work", lambda p: p[0] - p[1])):
            a, b = pick(peaks[(mode, c1)]), pick(peaks[(mode, c4)])
            print(f"  {mode if what == 'peak' else '':<10}{what:<6}{a / mib:>8.1f} MiB{b / mib:>8.1f} MiB"
                  f"{b / a if a > 0 else float('nan'):>9.2f}x")
    u, c = peaks[("unchunked", c4)][0], peaks[("chunked", c4)][0]
    print(f"  peak unchunked / chunked at {c4} tokens: {u / max(c, 1):.2f}x")
    print(json.dumps({f"{m}@{n}": list(v) for (m, n), v in peaks.items()}))
    recall_batching(args)

    if args.e2e:
        end_to_end(args)


if __name__ == "__main__":
    main()
