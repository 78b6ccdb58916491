"""`quasar`: one command, a subcommand per job. Each subcommand's code lives in its own package."""
from __future__ import annotations

import argparse
import sys
import time


def cmd_params(args) -> int:
    from quasar_model import PRESETS, QuasarLongConfig
    from quasar_model.report import branch_layout, parameter_counts

    names = args.preset or list(PRESETS)
    print(f"{'preset':<8} {'total':>14} {'active':>14}  hybrid layers")
    for name in names:
        cfg = QuasarLongConfig.preset(name)
        c = parameter_counts(cfg)
        layout = " ".join(f"{i}:{k[0]}" for i, k in branch_layout(cfg).items()) or "-"
        print(f"{name:<8} {c['total']:>14,} {c['active']:>14,}  {layout}")
    return 0


def cmd_demo(args) -> int:
    """Build a model from a preset, check cached decoding against the full forward, and generate."""
    import torch

    from quasar_model import QuasarLongConfig, QuasarLongForCausalLM

    torch.manual_seed(args.seed)
    cfg = QuasarLongConfig.preset(args.preset)
    model = QuasarLongForCausalLM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len))
    with torch.no_grad():
        t0 = time.perf_counter()
        cached = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, use_cache=True)
        t1 = time.perf_counter()
        uncached = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, use_cache=False)
        t2 = time.perf_counter()
    same = torch.equal(cached, uncached)
    print(f"preset {args.preset}: generated {args.new_tokens} tokens after a {args.prompt_len}-token prompt")
    print(f"  with cache    {args.new_tokens / (t1 - t0):8.1f} tok/s   {cached[0, args.prompt_len:].tolist()}")
    print(f"  without cache {args.new_tokens / (t2 - t1):8.1f} tok/s   identical: {same}")
    return 0 if same else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="quasar", description="SN24 Quasar miner/validator toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="total and active parameter counts of the presets (meta device)")
    p.add_argument("--preset", action="append", help="preset name (repeatable; default: all)")
    p.set_defaults(func=cmd_params)
    p = sub.add_parser("demo", help="build a preset, check cached decoding, generate a few tokens")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
