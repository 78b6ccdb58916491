"""Benchmark the GLA branch op: chunked PyTorch path vs the token loop (and Triton vs torch on CUDA).

    python benchmarks/bench_gla.py --device cpu --lengths 512 1024 2048 4096 --threads 1
    python benchmarks/bench_gla.py --device cuda

(On a CPU shared with other jobs, --threads 1 gives steadier numbers: with more threads the token
loop's many small ops stall on busy cores.)

B=1, H=4, K=V=64, fp32 on CPU (bf16 on CUDA), both gate kinds: a fixed per-head decay from the
model's rule ("head") and a data-dependent per-key gate logsigmoid(x)/16 ("key"). Reports the
median of at least --repeats timed runs (more for fast calls) after --warmup untimed ones, for
the forward (no_grad) and forward+backward; "x" is the speed-up of the second column over the
first.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from quasar_model.ops.gla import gated_linear_attention, gla_chunked, gla_recurrent


def make_inputs(T, gate, device, dtype, B=1, H=4, K=64, V=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.rms_norm(torch.randn(B, T, H, K, generator=gen), (K,))
    k = F.rms_norm(torch.randn(B, T, H, K, generator=gen), (K,))
    v = torch.randn(B, T, H, V, generator=gen)
    if gate == "head":  # the model's fixed per-head decay (layer 1 of 12)
        rate = -(2.0 ** (-0.5 * (torch.arange(H) + 1.0))) * (1.0 + 1e-5)
        g = rate.expand(B, T, H).clone()
    else:               # data-dependent per-key-channel gate
        g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen)) / 16
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [g.to(device)], K ** -0.5


def timeit(fn, warmup, repeats, device, min_total=0.5, max_repeats=50):
    """Median wall time of fn() after `warmup` untimed calls. Fast calls are repeated until
    min_total seconds have been timed (up to max_repeats), so one hiccup cannot set the median."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    while len(times) < repeats or (sum(times) < min_total and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd(op, inputs, scale, **kw):
    def run():
        with torch.no_grad():
            op(*inputs, scale, **kw)
    return run


def fwd_bwd(op, inputs, scale, **kw):
    leaves = [x.detach().requires_grad_() for x in inputs]

    def run():
        o, _ = op(*leaves, scale, **kw)
        o.float().square().mean().backward()
        for x in leaves:
            x.grad = None
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=64)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    cuda = dev.startswith("cuda")
    print(f"device={dev} threads={torch.get_num_threads()} torch={torch.__version__} B=1 H=4 K=V=64")

    hdr = f"{'gate':>4} {'T':>5} | {'loop fwd':>9} {'chunk fwd':>9} {'x':>6} | {'loop f+b':>9} {'chunk f+b':>9} {'x':>6}"
    print("\n[torch, fp32] token loop vs chunked, median seconds")
    print(hdr)
    for gate in ("head", "key"):
        for T in args.lengths:
            inputs, scale = make_inputs(T, gate, dev, torch.float32)
            row = []
            for mode in (fwd, fwd_bwd):
                t_loop = timeit(mode(gla_recurrent, inputs, scale), args.warmup, args.repeats, dev)
                t_chunk = timeit(mode(gla_chunked, inputs, scale, chunk_size=args.chunk_size),
                                 args.warmup, args.repeats, dev)
                row += [t_loop, t_chunk, t_loop / t_chunk]
            print(f"{gate:>4} {T:>5} | {row[0]:9.4f} {row[1]:9.4f} {row[2]:5.1f}x | "
                  f"{row[3]:9.4f} {row[4]:9.4f} {row[5]:5.1f}x", flush=True)

    if cuda:
        print("\n[cuda, bf16] torch (chunked) vs triton (fla), median seconds")
        print(f"{'gate':>4} {'T':>5} | {'torch fwd':>9} {'triton fwd':>10} {'x':>6} | "
              f"{'torch f+b':>9} {'triton f+b':>10} {'x':>6}")
        for gate in ("head", "key"):
            for T in args.lengths:
                inputs, scale = make_inputs(T, gate, dev, torch.bfloat16)
                row = []
                for mode in (fwd, fwd_bwd):
                    t_torch = timeit(mode(gated_linear_attention, inputs, scale, backend="torch"),
                                     args.warmup, args.repeats, dev)
                    t_tri = timeit(mode(gated_linear_attention, inputs, scale, backend="triton"),
                                   args.warmup + 2, args.repeats, dev)
                    row += [t_torch, t_tri, t_torch / t_tri]
                print(f"{gate:>4} {T:>5} | {row[0]:9.5f} {row[1]:10.5f} {row[2]:5.1f}x | "
                      f"{row[3]:9.5f} {row[4]:10.5f} {row[5]:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
