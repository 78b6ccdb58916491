"""Does a competition's evaluation fit its round? An estimate with its assumptions in plain sight.

    python scripts/size_budget.py [COMPETITION] [--submissions N] [--mfu F] [--call-ms MS] ...

Prints the per-submission plan (eval.budget) with FLOPs for a reference student at the
competition's active-parameter cap, the seconds that costs on the reference GPU under the stated
throughput assumptions, and whether a round (the teacher once, then every eligible submission)
fits the cadence. Nothing here is measured: the numbers are what the competition file's budget
and notes are sized from. Re-run it with measured MFU and per-call overhead when a GPU is at hand
(benchmarks/bench_eval.py measures evaluator tokens/s).

Assumptions (flags):
  --peak-tflops 989     H200 SXM dense bf16 peak (the H100's; the H200 differs in memory)
  --mfu 0.25            share of peak one batch-1 evaluation sustains (prefill matmuls, SDPA,
                        flash-linear-attention kernels; batch 1 keeps it well below training's)
  --call-ms 20          fixed cost of one model call (eager PyTorch, ~30 layers, MoE dispatch):
                        decode steps are memory- and launch-bound, not FLOP-bound
  --load-s 30           loading a checkpoint of up to 20B parameters (40 GB bf16, local NVMe) onto the GPU
  --submissions 10      distinct models scored per round (eligible submissions + the leader;
                        identical weights are scored once)
  --round-share 0.7     share of the cadence the evaluation phase may use (the rest: teacher,
                        fetches, scoring, weights, slack)
Reference student: a Quasar-Long of the preview preset's layout at the competition's vocabulary,
hidden 3072, 28 layers (24 hybrid), 24 heads x 128, 64 experts (top 4) of 1024: ~4.4B active,
under sn24's 4.5B cap (half of 9B).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.budget import ModelCost, format_plan, model_cost, plan  # noqa: E402
from eval.competition import load_competition  # noqa: E402
from quasar_model import QuasarLongConfig  # noqa: E402  (loads the model on first use, not here)


def reference_student(comp):
    if comp.student.vocab_size <= 4096:  # localnet: the tiny preset is what its miners train
        return QuasarLongConfig.preset("tiny", vocab_size=comp.student.vocab_size)
    return QuasarLongConfig.preset(
        "preview", vocab_size=comp.student.vocab_size, hidden_size=3072, num_hidden_layers=28,
        hybrid_attention_layers=list(range(4, 28)), num_attention_heads=24, num_key_value_heads=4,
        intermediate_size=8192, num_experts=64, n_group=8, topk_group=4, num_experts_per_tok=4,
        moe_intermediate_size=1024)


def teacher_cost(comp) -> ModelCost:
    """The teacher as a dense transformer of teacher.params with full attention (an upper bound:
    Qwen3.5's linear-attention layers cost less): 36 layers of width 4096 for a 9B."""
    p = comp.teacher.params
    return ModelCost(layer_params=p, head_params=0, loops=1, attention_width=36 * 4096 if p > 10**9 else 0,
                     recurrent=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("competition", nargs="?", default="sn24")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--mfu", type=float, default=0.25)
    ap.add_argument("--call-ms", type=float, default=20.0)
    ap.add_argument("--load-s", type=float, default=30.0)
    ap.add_argument("--submissions", type=int, default=10)
    ap.add_argument("--round-share", type=float, default=0.7)
    ap.add_argument("--block-s", type=float, default=12.0)
    a = ap.parse_args(argv)

    from quasar_model.report import parameter_counts  # after parsing: torch takes seconds, --help should not

    comp = load_competition(a.competition)
    config = reference_student(comp)
    counts = parameter_counts(config)
    cost = model_cost(config, counts)
    cap = comp.student.max_active_params(comp.teacher.params)
    print(f"reference student: {counts['active']:,} active of {counts['total']:,} parameters (cap {cap:,})")
    print(format_plan(comp, cost))
    rate = a.peak_tflops * 1e12 * a.mfu
    axes = plan(comp)
    flops = sum(cost.axis_flops(x) for x in axes)
    calls = sum(x.forwards for x in axes)
    sub_s = a.load_s + flops / rate + calls * a.call_ms / 1e3
    print(f"one submission: {a.load_s:g} s load + {flops / rate:,.0f} s compute ({flops:.3e} FLOPs at "
          f"{rate / 1e12:,.0f} TFLOP/s) + {calls * a.call_ms / 1e3:,.0f} s for {calls:,} model calls "
          f"= {sub_s:,.0f} s (budget.seconds {comp.budget.seconds:g})")
    h = comp.heldout
    teacher_s = teacher_cost(comp).flops(plan(comp)[0].passes[0]) / rate
    cadence_s = comp.schedule.cadence_blocks * a.block_s
    round_s = teacher_s + a.submissions * sub_s
    print(f"one round: teacher {teacher_s:,.0f} s on {h.documents * h.seq_len:,} held-out tokens + "
          f"{a.submissions} x {sub_s:,.0f} s = {round_s:,.0f} s; cadence {cadence_s:,.0f} s, "
          f"evaluation share {a.round_share:.0%} = {a.round_share * cadence_s:,.0f} s -> "
          + ("fits" if round_s <= a.round_share * cadence_s else "DOES NOT FIT"))
    worst = a.submissions * comp.budget.seconds + teacher_s
    print(f"worst case (every submission runs to budget.seconds): {worst:,.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
