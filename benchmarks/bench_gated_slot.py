"""Benchmark the gated-slot-attention op: chunked PyTorch vs the token loop (and Triton on CUDA).

    python benchmarks/bench_gated_slot.py --device cpu --lengths 512 1024 2048 4096 --threads 2

For every T it times the forward and forward+backward of
  loop     gated_slot_recurrent (one token at a time, the reference)
  chunked  gated_slot_chunked   (the 'torch' backend)
  triton   fla's chunk_gsa      (CUDA only)
and prints medians and the speed-up chunked/loop (and triton/chunked on CUDA). The variants are
timed in alternation, repeat after repeat, so that load from other processes on a shared machine
hits all of them alike. The project's goal is chunked >= 5x the loop at T=4096 on CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


from quasar_model.ops.gated_slot import (
    gated_slot_attention,
    gated_slot_chunked,
    gated_slot_recurrent,
)


def make_inputs(B, T, H, K, V, M, topk, device, dtype, requires_grad):
    """Inputs like the model's: RMS-normed q, k; top-k slot router; g = A * r; s = 1 - exp(g)."""
    q, k = torch.randn(B, T, H, K, device=device), torch.randn(B, T, H, K, device=device)
    q, k = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) for x in (q, k))
    v = torch.randn(B, T, H, V, device=device)
    router = torch.randn(B, T, H, M, device=device)
    top = router.topk(topk, dim=-1)
    r = torch.zeros_like(router).scatter(-1, top.indices, top.values.softmax(-1))
    A = -torch.randn(H, 1, device=device).exp() * F.softplus(torch.randn(B, T, H, 1, device=device))
    g = A * r
    s = 1 - g.exp()
    xs = [x.to(dtype) for x in (q, k, v, s, g)]
    return [x.requires_grad_(requires_grad) for x in xs]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(fn, xs, scale, backward, device):
    for x in xs:
        x.grad = None
    sync(device)
    t0 = time.perf_counter()
    o, _ = fn(*xs, scale)
    if backward:
        o.float().sum().backward()
    sync(device)
    return time.perf_counter() - t0


def bench(fns, xs, scale, backward, device, warmup, repeats):
    """{name: median seconds}; the variants alternate within every repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            run_once(fn, xs, scale, backward, device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(run_once(fn, xs, scale, backward, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64, help="K = V")
    ap.add_argument("--slots", type=int, default=64, help="M")
    ap.add_argument("--topk", type=int, default=8, help="slots the router writes per token")
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-backward", action="store_true", help="time the forward only")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    B, H, K, M = args.batch, args.heads, args.head_dim, args.slots
    scale = K ** -0.5
    print(f"device={device} threads={torch.get_num_threads()} B={B} H={H} K=V={K} M={M} "
          f"top-k={args.topk} chunk={args.chunk_size} torch={torch.__version__}")

    def chunked(*a):
        return gated_slot_chunked(*a, chunk_size=args.chunk_size)

    fns = {"loop": gated_slot_recurrent, "chunked": chunked}
    if device.type == "cuda":
        fns["triton"] = lambda *a: gated_slot_attention(*a, backend="triton")

    modes = [("fwd", False)] + ([] if args.no_backward else [("fwd+bwd", True)])
    cols = list(fns)
    header = f"{'T':>6} {'mode':>8} " + " ".join(f"{c + ' ms':>11}" for c in cols)
    header += f" {'chunk/loop':>11}" + (f" {'triton/chunk':>13}" if "triton" in fns else "")
    print(header)
    for T in args.lengths:
        for mode, backward in modes:
            xs = make_inputs(B, T, H, K, K, M, args.topk, device, torch.float32, backward)
            med = bench(fns, xs, scale, backward, device, args.warmup, args.repeats)
            line = f"{T:>6} {mode:>8} " + " ".join(f"{med[c] * 1e3:>11.1f}" for c in cols)
            line += f" {med['loop'] / med['chunked']:>10.1f}x"
            if "triton" in fns:
                line += f" {med['chunked'] / med['triton']:>12.1f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
