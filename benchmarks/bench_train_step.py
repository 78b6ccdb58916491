"""Forward+backward throughput and peak memory of a preset, Triton kernels vs the PyTorch path.

On the GPU machine (bf16, `small`, 4K context):
    python benchmarks/bench_train_step.py --device cuda --preset small --seq 4096 --batch 1
A CPU smoke run of the same harness:
    python benchmarks/bench_train_step.py --device cpu --preset tiny --seq 256 --dtype float32

Each backend is measured in the same run; the printed ratio is triton / torch tokens per second.
Writes a JSON of the results with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from quasar_model import QuasarLongConfig, QuasarLongForCausalLM


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, ids, steps, warmup, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    t = statistics.median(times)
    return {"step_s": t, "tokens_per_s": ids.numel() / t, "peak_mem_gib": peak, "loss": loss.item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backends", nargs="+", default=None, help="default: triton and torch on CUDA, torch on CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    backends = args.backends or (["triton", "torch"] if device.type == "cuda" else ["torch"])
    results = {}
    for backend in backends:
        os.environ["QUASAR_KERNEL_BACKEND"] = backend
        torch.manual_seed(0)
        cfg = QuasarLongConfig.preset(args.preset)
        model = QuasarLongForCausalLM(cfg).to(device=device, dtype=getattr(torch, args.dtype)).train()
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
        results[backend] = measure(model, ids, args.steps, args.warmup, device)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{args.preset} fwd+bwd+AdamW, {args.batch}x{args.seq} tokens, {args.dtype}, {device}")
    for b, r in results.items():
        print(f"  {b:<7} {r['tokens_per_s']:>12,.0f} tok/s  step {r['step_s'] * 1e3:8.1f} ms  peak {r['peak_mem_gib']:.2f} GiB")
    if "triton" in results and "torch" in results:
        print(f"  triton/torch throughput ratio: {results['triton']['tokens_per_s'] / results['torch']['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
