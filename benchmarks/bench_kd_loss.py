"""Benchmark the sparse KD loss: chunked LM head + loss vs the naive full-vocab logits, on CPU.

    python benchmarks/bench_kd_loss.py                     # V=157184, T=4096, D=256, k=128, fp32
    python benchmarks/bench_kd_loss.py --tokens 1024 --kind jsd --temperature 2 --ce-weight 0.1

Both paths start from the final hidden states [T, D] and the LM head [V, D] and compute the same
loss (naive: logits = hidden @ W.T in full, then naive_kd_loss), and take its gradient w.r.t. both.
Reports the median forward+backward time of --repeats runs after --warmup untimed ones, the peak
memory of each, both loss values, and the ratios.

Memory: each path runs in its own fresh subprocess. There, after the inputs are built and the
kernels warmed up on a 16-token problem, the process's peak resident size (VmHWM) is reset to the
current resident size (the baseline; see peak_rss.py), and read again after all runs: the
difference is the extra peak resident memory the loss needed, gradients included (dW is [V, D]).
The reset matters: building the inputs holds temporaries (`torch.randn(V, D) * s` is two [V, D]
tensors at once), and a high-water mark that still held them would hide the part of each path's
peak below them. The teacher is generated without ever making a [T, V] tensor. Caveat: it counts
resident pages, i.e. memory actually touched (the allocator hands large blocks back to the OS on
free, so freed blocks do not linger in it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from distill.losses import chunked_kd_loss, naive_kd_loss
from peak_rss import PeakRSS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(T, V, D, k, dtype, seed=0):
    """Student hidden [T, D] and head [V, D]; a top-k teacher [T, k] built without any [T, V] tensor."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * (2.0 / D ** 0.5)).to(dtype)   # logits ~ N(0, 4)
    # k distinct ids per row: base + j * stride (mod V) with j * stride < V never repeats
    base = torch.randint(0, V, (T, 1), generator=g)
    stride = torch.randint(1, V // k, (T, 1), generator=g)
    ids = (base + torch.arange(k) * stride) % V                                # [T, k]
    # a peaked teacher: sorted log-probs of top-k mass 0.90..0.99, the rest is the tail
    mass = 0.90 + 0.09 * torch.rand(T, 1, generator=g)
    lp = torch.log_softmax(torch.randn(T, k, generator=g) * 2.5, -1).sort(-1, descending=True).values
    lp = lp + mass.log()                                                      # [T, k]
    mask = torch.rand(T, generator=g) > 0.05                                   # a few padded positions
    labels = torch.where(mask, ids[:, 0], -100)                               # teacher's argmax as label
    return hidden, weight, ids, lp, mask, labels


def loss_fn(mode, args):
    kw = dict(kind=args.kind, beta=args.beta, temperature=args.temperature, ce_weight=args.ce_weight)

    def run(hidden, weight, ids, lp, mask, labels):
        lab = labels if args.ce_weight > 0 else None
        if mode == "naive":
            return naive_kd_loss(hidden @ weight.T, ids, lp, mask, lab, **kw)
        return chunked_kd_loss(hidden, weight, ids, lp, mask, lab, chunk_size=args.chunk_size, **kw)
    return run


def child(mode, args):
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    run = loss_fn(mode, args)
    hidden, weight, ids, lp, mask, labels = make_inputs(args.tokens, args.vocab, args.dim, args.k, dtype)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def step(n=None):
        sl = slice(0, n)
        loss = run(hidden[sl], weight, ids[sl], lp[sl], mask[sl], labels[sl])
        grads = torch.autograd.grad(loss, (hidden, weight))
        return loss.item(), grads

    step(16)                       # load kernels / thread pools at a negligible size
    rss = PeakRSS()
    base = rss.reset()
    times, value = [], None
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        value, grads = step()
        dt = time.perf_counter() - t0
        del grads
        if i >= args.warmup:
            times.append(dt)
    print(json.dumps(dict(mode=mode, time_s=statistics.median(times), times=times, base_mib=base,
                          peak_mib=rss.peak_over_baseline(), loss=value)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=157184)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--kind", default="fkl", choices=["fkl", "rkl", "jsd"])
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ce-weight", type=float, default=0.0)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["naive", "chunked"], help="run one path (skips the ratios)")
    ap.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args)

    T, V, D = args.tokens, args.vocab, args.dim
    print(f"sparse KD loss, CPU {args.dtype}, threads={args.threads}: T={T} tokens, V={V}, D={D}, "
          f"k={args.k}, kind={args.kind}" + (f"(beta={args.beta})" if args.kind == "jsd" else "")
          + f", temperature={args.temperature}, ce_weight={args.ce_weight}, chunk_size={args.chunk_size}")
    print(f"one [T, V] fp32 tensor = {T * V * 4 / 2**20:.0f} MiB; one [chunk, V] = "
          f"{min(args.chunk_size, T) * V * 4 / 2**20:.0f} MiB; [V, D] fp32 = {V * D * 4 / 2**20:.0f} MiB")
    print(f"forward+backward (grads w.r.t. hidden and lm_head weight): median of {args.repeats} after "
          f"{args.warmup} warmup; peak = peak RSS over the runs (VmHWM, reset after building the inputs) "
          "- RSS before the first full-size call, each path in a fresh subprocess\n")
    res = {}
    for mode in ([args.only] if args.only else ["naive", "chunked"]):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode}: failed (rc={out.returncode})\n{out.stderr[-3000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        res[mode] = r
        print(f"{mode:8s} time {r['time_s']:8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in r['times'])})"
              f"   peak +{r['peak_mib']:8.0f} MiB over baseline {r['base_mib']:.0f} MiB"
              f"   loss {r['loss']:.7f}")
    if len(res) == 2:
        n, c = res["naive"], res["chunked"]
        print(f"\nmemory naive/chunked : {n['peak_mib'] / c['peak_mib']:6.2f}x   (goal >= 10x)")
        print(f"time chunked/naive   : {c['time_s'] / n['time_s']:6.2f}    (goal <= 1.0)")
        print(f"loss |naive-chunked| : {abs(n['loss'] - c['loss']):.2e}  (relative "
              f"{abs(n['loss'] - c['loss']) / abs(n['loss']):.1e})")


if __name__ == "__main__":
    main()
