"""Benchmark MoE expert dispatch: grouped (sorted + grouped matmul) vs per-expert loop.

Times the whole MoE layer (router + experts + combine, no shared expert) with
each dispatch strategy on the same weights and inputs; forward alone and
forward+backward. Reports the median (and min) over `--iters` after `--warmup`
runs; variants are interleaved so background load skews them equally. Before any timing, every
variant's output and gradients (input and weights) are checked against the first one's: a
variant that computes something else stops the benchmark.

    python benchmarks/bench_moe.py                      # CPU defaults
    python benchmarks/bench_moe.py --device cuda --dtype bfloat16 --tokens 65536 --hidden 2048
"""

import argparse
import statistics
import time

import torch

from quasar_model.layers.moe import MoE, _grouped_mm_ok


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fns, device, warmup, iters, clock=time.perf_counter):
    """Median and min seconds per call of each fn in `fns` (name -> fn).

    The fns run round-robin, one call each per round, so background load on a
    shared machine hits every variant alike instead of whichever ran last.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check_same(moe, x, modes, tol):
    """Each dispatch mode's output and gradients against the first mode's; exits if any differs."""
    results = {}
    for mode in modes:
        moe.dispatch = mode
        moe.zero_grad(set_to_none=True)
        xg = x.detach().clone().requires_grad_()
        y = moe(xg)
        y.float().square().mean().backward()
        results[mode] = [("output", y.detach())] + [("d_input", xg.grad)] + [
            (f"d_{n}", p.grad) for n, p in moe.named_parameters() if p.grad is not None]
    ref_mode, ref = modes[0], results[modes[0]]
    for mode in modes[1:]:
        errs = {name: rel_err(got, want) for (name, got), (_, want) in zip(results[mode], ref, strict=True)}
        worst = max(errs, key=errs.get)
        print(f"{mode} vs {ref_mode}: worst relative error {errs[worst]:.1e} ({worst})")
        if not errs[worst] < tol:
            raise SystemExit(f"{mode} and {ref_mode} compute different things: {worst} differs by "
                             f"{errs[worst]:.2e} (tolerance {tol:g}); not timing")
    moe.zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--inter", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu = this process's CPU time (steadier on a shared box; CPU device only)",
    )
    p.add_argument("--modes", default="grouped_mm,padded,loop", help="comma list of dispatch modes")
    args = p.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    moe = MoE(args.hidden, args.inter, args.experts, args.topk, 0, 1, 1, 1.0).to(device, dtype)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype)
    xg = x.clone().requires_grad_()
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} tokens={args.tokens} "
        f"hidden={args.hidden} experts={args.experts} top_k={args.topk} inter={args.inter} clock={args.clock}"
    )
    print(f"grouped_mm usable here: {_grouped_mm_ok(device, dtype, args.hidden, args.inter)}")

    modes = [m for m in args.modes.split(",") if m]
    if "grouped_mm" in modes and not _grouped_mm_ok(device, dtype, args.hidden, args.inter):
        modes.remove("grouped_mm")
    # summation order only in fp32; bf16 rounds the expert outputs at different points
    check_same(moe, x, modes, tol=1e-5 if dtype == torch.float32 else 2e-2)

    def fwd(mode):
        def run():
            moe.dispatch = mode
            with torch.no_grad():
                moe(x)

        return run

    def fwd_bwd(mode):
        def run():
            moe.dispatch = mode
            moe.zero_grad(set_to_none=True)
            xg.grad = None
            moe(xg).float().square().mean().backward()

        return run

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t_fwd = bench({m: fwd(m) for m in modes}, device, args.warmup, args.iters, clock)
    t_bwd = bench({m: fwd_bwd(m) for m in modes}, device, args.warmup, args.iters, clock)
    results = {}
    for mode in modes:
        results[mode] = (t_fwd[mode][0], t_bwd[mode][0])
        print(
            f"{mode:>11}: fwd {t_fwd[mode][0] * 1e3:8.2f} ms (min {t_fwd[mode][1] * 1e3:7.2f})   "
            f"fwd+bwd {t_bwd[mode][0] * 1e3:8.2f} ms (min {t_bwd[mode][1] * 1e3:7.2f})"
        )

    if "loop" in results:
        lf, lb = results["loop"]
        for mode, (f, b) in results.items():
            if mode != "loop":
                print(f"loop / {mode} (median): fwd x{lf / f:.2f}   fwd+bwd x{lb / b:.2f}")


if __name__ == "__main__":
    main()
