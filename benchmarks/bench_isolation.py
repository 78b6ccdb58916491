"""Benchmark the validator's isolation: one submission scored in a child process
(neurons.isolation) vs in the validator's own process, on the same round inputs.

Two kinds of child: a fresh interpreter (CUDA validators: it imports torch/transformers and loads
the round's inputs) and a fork of the zygote (CPU validators: imports already done). The
in-process baseline reuses everything. Runs alternate so background load skews all alike; prints
medians, the overhead per submission and whether the results are identical.

    python benchmarks/bench_isolation.py                          # localnet competition, CPU
    python benchmarks/bench_isolation.py --competition sn24 --device cuda --checkpoint DIR
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from eval.competition import load_competition
from eval.evaluate import load_student, prepare_round, score_model
from neurons.isolation import EvaluationFailed, evaluate_isolated, save_round_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--competition", default="localnet")
    ap.add_argument("--checkpoint", default=None, help="a student checkpoint (default: a random tiny one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--startup-only", action="store_true", help="only the children's fixed cost, fresh vs zygote")
    args = ap.parse_args()

    comp = load_competition(args.competition)
    tmp = Path(tempfile.mkdtemp(prefix="bench-isolation-"))
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is None:
        from quasar_model import QuasarLongConfig, QuasarLongForCausalLM

        torch.manual_seed(0)
        ckpt = tmp / "student"
        QuasarLongForCausalLM(QuasarLongConfig.preset("tiny", vocab_size=comp.student.vocab_size)).save_pretrained(ckpt)
    inputs = prepare_round(comp, args.seed, device=args.device)
    t0 = time.perf_counter()
    path = save_round_inputs(inputs, tmp / "inputs.pt")
    save_s = time.perf_counter() - t0

    def in_process():
        model = load_student(ckpt, comp, args.device)
        with torch.no_grad():
            return json.loads(json.dumps(score_model(model, inputs, model_hash="x", device=args.device).to_dict()))

    def child(fresh):
        return evaluate_isolated(ckpt, path, "x", device=args.device, fresh=fresh)

    def startup(fresh):  # the child's fixed cost: interpreter, imports, round inputs; it stops at the missing checkpoint
        try:
            evaluate_isolated(tmp / "missing", path, "x", device=args.device, fresh=fresh)
        except EvaluationFailed:
            pass

    if not args.startup_only:
        in_process()  # warm-up: first-call costs belong to neither side
    startup(False)  # starts the zygote (once per validator)
    kinds = {"fresh": True, "zygote": False}
    starts = {kind: [] for kind in kinds}
    for _ in range(args.iters):
        for kind, fresh in kinds.items():
            t0 = time.perf_counter()
            startup(fresh)
            starts[kind].append(time.perf_counter() - t0)
    f, z = statistics.median(starts["fresh"]), statistics.median(starts["zygote"])
    startup_line = f"  child start-up alone (to a missing checkpoint): fresh {f:.2f} s, zygote {z:.2f} s ({f / z:.1f}x faster)"
    if args.startup_only:
        print(f"{args.iters} runs each (median):")
        print(startup_line)
        return
    times = {"in-process": [], **{f"child ({kind})": [] for kind in kinds}}
    runs = {"in-process": in_process, **{f"child ({kind})": (lambda f=fresh: child(f)) for kind, fresh in kinds.items()}}
    same = True
    for _ in range(args.iters):
        results = {}
        for name, fn in runs.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
        same &= all(r == results["in-process"] for r in results.values())
    a = statistics.median(times["in-process"])
    print(f"competition {comp.name}, device {args.device}, {args.iters} runs each (median):")
    print(f"  in-process      {a:7.2f} s")
    for name in runs:
        if name != "in-process":
            b = statistics.median(times[name])
            print(f"  {name:14s}  {b:7.2f} s   overhead {b - a:+.2f} s per submission ({b / a:.2f}x)")
    print(startup_line)
    print(f"  round inputs written once per round: {save_s:.2f} s, {path.stat().st_size / 1e6:.1f} MB")
    print(f"  identical results: {same}")


if __name__ == "__main__":
    main()
