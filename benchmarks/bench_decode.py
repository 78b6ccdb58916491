"""Decode step time at a short vs a long context on `tiny`.

Branch states are fixed-size, so their per-step cost is flat in the context; attention reads a
K/V cache that grows with it. The script times one decode step after prefilling each context, for
the full model and for each mixer alone, and prints the long/short ratios.

    python benchmarks/bench_decode.py --contexts 128 4096
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from quasar_model import QuasarLongCache, QuasarLongConfig, QuasarLongForCausalLM


def prefill(model, ctx: int, vocab: int, chunk: int = 512) -> QuasarLongCache:
    cache = QuasarLongCache()
    ids = torch.randint(0, vocab, (1, ctx))
    for a in range(0, ctx, chunk):  # chunked prefill: memory stays flat in the context
        model(ids[:, a:a + chunk], cache=cache, use_cache=True, logits_to_keep=1)
    return cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 4096])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = QuasarLongConfig.preset(args.preset, max_position_embeddings=1 << 20)
    model = QuasarLongForCausalLM(cfg).eval()
    layers = model.model.layers
    # (name, a representative layer) per mixer kind
    probes = {"attention (dense layer)": next(i for i, l in enumerate(layers) if not l.is_hybrid)}
    for i, l in enumerate(layers):
        if l.is_hybrid:
            probes.setdefault(f"{l.mixer.kind} branch", i)
    # Build one step function per (component, context), then time them interleaved so that load
    # drifting on a shared machine biases no context.
    fns: dict[str, dict[int, callable]] = {}
    with torch.no_grad():
        for ctx in args.contexts:
            cache = prefill(model, ctx, cfg.vocab_size)
            tok = torch.randint(0, cfg.vocab_size, (1, 1))
            snapshot = {k: dict(v) for k, v in cache.entries.items()}

            def step(cache=cache, snapshot=snapshot, ctx=ctx, tok=tok):
                cache.entries = {k: dict(v) for k, v in snapshot.items()}  # every step from the same context
                cache.seen_tokens = ctx
                model(tok, cache=cache, use_cache=True)

            fns.setdefault("full model step", {})[ctx] = step
            x = torch.randn(1, 1, cfg.hidden_size)
            rope = model.model._context(None, None, None, ctx, 1, 1, x.device, None).rope
            for name, i in probes.items():
                mixer, st = layers[i].mixer, snapshot[(0, i)]
                if name.startswith("attention"):
                    fn = lambda mixer=mixer, st=st, rope=rope: mixer(x, rope, None, dict(st))
                else:
                    fn = lambda mixer=mixer, st=st, rope=rope: mixer.branch(x, state=st["branch"], rope=rope)
                fns.setdefault(name, {})[ctx] = fn
        times = {name: {c: [] for c in by_ctx} for name, by_ctx in fns.items()}
        for name, by_ctx in fns.items():
            for fn in by_ctx.values():
                for _ in range(3):
                    fn()
            for _ in range(args.steps):
                for c, fn in by_ctx.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name][c].append(time.perf_counter() - t0)
    rows = {name: {c: statistics.median(ts) for c, ts in by_ctx.items()} for name, by_ctx in times.items()}
    lo, hi = min(args.contexts), max(args.contexts)
    print(f"decode step time, preset {args.preset}, {args.threads} thread(s), median of {args.steps}")
    print(f"{'component':<26}" + "".join(f"{f'ctx {c}':>14}" for c in args.contexts) + f"{f'{hi}/{lo}':>10}")
    for name, by_ctx in rows.items():
        print(f"{name:<26}" + "".join(f"{by_ctx[c] * 1e3:>11.3f} ms" for c in args.contexts)
              + f"{by_ctx[hi] / by_ctx[lo]:>9.2f}x")


if __name__ == "__main__":
    main()
