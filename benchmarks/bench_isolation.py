"""Benchmark the validator's isolation: one submission scored in a child process
(neurons.isolation) vs in the validator's own process, on the same round inputs.

The child pays for a fresh interpreter, importing torch/transformers and loading the round's
inputs; the in-process baseline reuses everything. Runs alternate so background load skews both
alike; prints medians, the overhead per submission and whether the two results are identical.

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

    def child():
        return evaluate_isolated(ckpt, path, "x", device=args.device)

    def startup():  # the child's fixed cost: interpreter, imports, round inputs; it stops at the missing checkpoint
        try:
            evaluate_isolated(tmp / "missing", path, "x", device=args.device)
        except EvaluationFailed:
            pass

    in_process()  # warm-up: first-call costs belong to neither side
    starts = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        startup()
        starts.append(time.perf_counter() - t0)
    times = {"in-process": [], "child": []}
    same = True
    for _ in range(args.iters):
        results = {}
        for name, fn in (("in-process", in_process), ("child", child)):
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
        same &= results["in-process"] == results["child"]
    a, b = statistics.median(times["in-process"]), statistics.median(times["child"])
    print(f"competition {comp.name}, device {args.device}, {args.iters} runs each (median):")
    print(f"  in-process  {a:7.2f} s")
    print(f"  child       {b:7.2f} s   overhead {b - a:+.2f} s per submission ({b / a:.2f}x)")
    print(f"  child start-up alone (interpreter, imports, round inputs): {statistics.median(starts):.2f} s")
    print(f"  round inputs written once per round: {save_s:.2f} s, {path.stat().st_size / 1e6:.1f} MB")
    print(f"  identical results: {same}")


if __name__ == "__main__":
    main()
