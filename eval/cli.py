"""`quasar eval`: score a checkpoint exactly as a validator would, and write the report.

    quasar eval CHECKPOINT [--competition localnet|FILE] [--seed N] [--out DIR] [--device auto|cpu|cuda|cuda:N]
    quasar eval --replay ROUND [--validator-dir DIR] [--competition ...] [--out DIR]   (from `quasar` only)

Before evaluating it prints the plan (eval.budget): per axis the most tokens the evaluation runs and
a FLOP estimate for this checkpoint's config, against the competition's budget.
Writes OUT/report.json, OUT/recall.png and OUT/kl_hist.png (eval.report) and prints a summary. The
teacher cache lives under --cache-root (default $QUASAR_CACHE/eval), so scoring a second checkpoint
on the same seed reuses the teacher's top-k. `neurons.cli` registers this command through
`add_commands`; `python -m eval.cli eval ...` runs it alone.
"""
from __future__ import annotations

import argparse
import sys
import time

import quasar_model
from eval.budget import format_plan, model_cost
from eval.checkpoint_layout import check_checkpoint_files
from eval.competition import load_competition
from quasar_model.devices import AUTO, resolve_device
from quasar_model.devices import HELP as DEVICE_HELP


def cmd_eval(args) -> int:
    comp = load_competition(args.competition)
    check_checkpoint_files(args.checkpoint)  # before torch: a wrong path fails in a second, in one line
    args.device = resolve_device(args.device)
    # here: they load torch (seconds), and `quasar --help` or a bad path must not wait for it
    from eval.evaluate import evaluate_checkpoint
    from eval.report import format_summary, summarize, write_report

    print_plan(comp, args.checkpoint)
    t0 = time.perf_counter()
    result = evaluate_checkpoint(args.checkpoint, comp, args.seed, cache_root=args.cache_root, device=args.device,
                                 progress=not args.quiet, hotkey=args.hotkey)
    paths = write_report(result, comp, args.seed, args.out)
    print(format_summary(summarize(result, comp, args.seed)))
    print(f"evaluated in {time.perf_counter() - t0:.1f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def print_plan(comp, checkpoint) -> None:
    """The competition's per-submission plan, with FLOPs for the checkpoint's config when it reads."""
    cost = None
    try:
        from transformers import AutoConfig  # torch, as above

        quasar_model.register()
        cost = model_cost(AutoConfig.from_pretrained(checkpoint))
    except Exception as e:  # noqa: BLE001 - only the estimate is lost; the evaluation reports the real error
        print(f"(no FLOP estimate for {checkpoint}: {type(e).__name__}: {str(e)[:200]})")
    print(format_plan(comp, cost), flush=True)


def add_commands(subparsers, replay=None) -> None:
    """Register `eval`. `replay(args) -> int`, when given, adds `--replay ROUND` (and `--validator-dir`):
    the caller owns the validator's state, which this package must not import."""
    p = subparsers.add_parser("eval", help="score a checkpoint as a validator does (held-out KL/CE, recall)")
    p.add_argument("checkpoint", nargs="?" if replay else None, help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--competition", default="localnet", help="shipped competition name or a JSON/YAML file")
    p.add_argument("--seed", type=int, default=0, help="round seed: picks documents and recall items")
    p.add_argument("--out", default="eval-report", help="directory for report.json and the PNGs")
    p.add_argument("--device", default=AUTO, help=DEVICE_HELP)
    p.add_argument("--cache-root", default=None, help="teacher cache root (default: $QUASAR_CACHE/eval)")
    p.add_argument("--hotkey", default="local", help="hotkey recorded in the result")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
    if replay is None:
        return
    p.add_argument("--replay", type=int, default=None, metavar="ROUND",
                   help="re-evaluate a stored validator round (its seed; --seed is ignored) and compare")
    p.add_argument("--validator-dir", default="validator", help="the validator's --out directory (with --replay)")

    def run(args):
        if (args.checkpoint is None) == (args.replay is None):
            p.error("give exactly one of CHECKPOINT (score a checkpoint) or --replay ROUND (replay a stored round)")
        return replay(args) if args.replay is not None else cmd_eval(args)
    p.set_defaults(func=run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="quasar", description="SN24 evaluation")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # a bad checkpoint, competition or flag: the message names it
        print(f"quasar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
