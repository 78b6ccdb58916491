"""Benchmark the Quasar delta-rule op: chunked PyTorch vs the token-loop recurrence (and, on CUDA,
fla's Triton kernels vs the chunked PyTorch path).

    python benchmarks/bench_delta_rule.py --device cpu --threads 2
    python benchmarks/bench_delta_rule.py --device cuda --dtype bf16 --lengths 1024 4096 16384

Times are the median over --repeats runs after --warmup runs, in milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


from quasar_model.ops.delta_rule import delta_rule, delta_rule_chunked, delta_rule_recurrent


def make_inputs(B, T, H, K, V, device, dtype, requires_grad):
    # realistic inputs: the caller L2-normalises q and k and squashes beta into (0, 1)
    q = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, device=device).to(dtype)
    beta = torch.rand(B, T, H, device=device).sigmoid().to(dtype)
    h0 = torch.randn(B, H, K, V, device=device) * 0.1
    xs = [q, k, v, beta, h0]
    for x in xs:
        x.requires_grad_(requires_grad)
    return xs


def time_fn(fn, device, warmup, repeats):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(label_fn, args, T, backward):
    q, k, v, beta, h0 = make_inputs(args.batch, T, args.heads, args.dk, args.dv, args.device, args.dtype, backward)
    scale = args.dk**-0.5

    def run():
        o, s = label_fn(q, k, v, beta, scale, h0, True)
        if backward:
            (o.float().square().mean() + s.square().mean()).backward()

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-backward", action="store_true", help="skip the fwd+bwd timings")
    args = p.parse_args()
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def chunked(*a):
        return delta_rule_chunked(*a, chunk_size=args.chunk_size)

    def triton(*a):
        return delta_rule(*a, backend="triton")

    modes = [("fwd", False)] + ([] if args.no_backward else [("fwd+bwd", True)])
    print(
        f"delta rule  device={args.device} threads={args.threads} B={args.batch} H={args.heads} "
        f"K={args.dk} V={args.dv} chunk={args.chunk_size} dtype={str(args.dtype).split('.')[-1]} "
        f"(median of {args.repeats}, ms)"
    )
    header = f"{'mode':<8} {'T':>6} {'recurrent':>11} {'chunked':>10} {'speed-up':>9}"
    if args.device == "cuda":
        header += f" {'triton':>9} {'torch/triton':>13}"
    print(header)
    print("-" * len(header))
    for mode, backward in modes:
        for T in args.lengths:
            t_rec = time_fn(bench(delta_rule_recurrent, args, T, backward), args.device, args.warmup, args.repeats)
            t_chk = time_fn(bench(chunked, args, T, backward), args.device, args.warmup, args.repeats)
            line = f"{mode:<8} {T:>6} {t_rec:>11.2f} {t_chk:>10.2f} {t_rec / t_chk:>8.1f}x"
            if args.device == "cuda":
                t_tri = time_fn(bench(triton, args, T, backward), args.device, args.warmup, args.repeats)
                line += f" {t_tri:>9.2f} {t_chk / t_tri:>12.1f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
