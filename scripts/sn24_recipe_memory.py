"""GPU memory of the sn24 recipe from Qwen3.5-9B-Base, from parameter counts (no download, no GPU).

    python scripts/sn24_recipe_memory.py [--gpus 1,2,4,8] [--chunk-size 1024] [--k 128]

The teacher is transformers' `Qwen3_5TextConfig()` built offline: its defaults are the published
Qwen3.5-9B text dimensions (hidden 4096, 32 layers 3:1 gated DeltaNet : gated attention, 16 query /
4 KV heads of 256, DeltaNet 16 key / 32 value heads of 128, FFN 12288, vocabulary 248,320, untied
embeddings; transformers documents them as "the Qwen3.5-9B style configuration"). The student is
what `quasar init-student --teacher Qwen/Qwen3.5-9B-Base --replace` builds from it (the
Quasar-10B swap: DeltaNet layers kept, attention layers -> GLA + NoPE). Both are counted on the
meta device. Per stage, the resident GPU memory on one rank:

  capture     teacher weights (bf16) + the capture block [2048, k + 32768] fp32
  stage A     MSE + KD: the live teacher (bf16, a whole replica on every rank) + the student's
              training state (fp32 weights, fp32 grads, AdamW's two fp32 moments: 16 B/param,
              sharded over the ranks by FSDP) + the sparse loss's buffers (bf16 LM head copy, its
              fp32 gradient accumulator and bf16 gradient: 8 B x V x D, and [chunk, V] blocks:
              4 B fp32 + 2 B bf16)
  stage B     KD alone: stage A without the teacher
  evaluation  what a validator holds while scoring: teacher and student in bf16, one [1024, V]
              fp32 block of logits and its log-softmax

Activations are not included: they scale with the tokens per micro-batch and with activation
checkpointing, not with the parameter counts (benchmarks/bench_distill_step.py measures a step).
Nor are bf16 autocast's casts of the student's weights, which live through a forward (up to
2 B/param unsharded).
The last lines check the student against sn24's caps (eval/competitions/sn24.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2 ** 30


def teacher_config():
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig()


def count(model_fn) -> int:
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in model_fn().parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="1,2,4,8", help="ranks the student's training state is sharded over (FSDP)")
    p.add_argument("--chunk-size", type=int, default=1024, help="loss.chunk_size (tokens per LM-head block)")
    p.add_argument("--k", type=int, default=128, help="teacher top-k stored per position")
    args = p.parse_args(argv)
    try:
        ranks = [int(x) for x in args.gpus.split(",")]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1 or args.chunk_size < 1 or args.k < 1:
        print("error: --gpus takes positive integers (e.g. 1,2,4,8); --chunk-size and --k must be >= 1",
              file=sys.stderr)
        return 2

    from transformers import Qwen3_5ForCausalLM

    from quasar_model.conversion import student_config
    from eval.competition import load_competition
    from quasar_model.report import parameter_counts

    tc = teacher_config()
    V, D = tc.vocab_size, tc.hidden_size
    p_teacher = count(lambda: Qwen3_5ForCausalLM(tc))
    sc = student_config(tc, replacement_mode="replace")
    counts = parameter_counts(sc)
    p_student = counts["total"]
    kinds = sorted({sc.branch_kind(i) for i in sc.hybrid_attention_layers})
    print(f"teacher  Qwen3.5-9B-Base (Qwen3_5TextConfig defaults): {p_teacher / 1e9:.3f} B parameters, "
          f"V={V}, D={D}, {tc.num_hidden_layers} layers")
    print(f"student  init-student --replace: {p_student / 1e9:.3f} B parameters ({counts['active'] / 1e9:.3f} B "
          f"active), branches {kinds} on layers {sc.hybrid_attention_layers}\n")

    teacher_bf16 = 2 * p_teacher
    capture = teacher_bf16 + 4 * 2048 * (args.k + 32768)
    loss = 8 * V * D + 6 * args.chunk_size * V
    evaluation = teacher_bf16 + 2 * p_student + 2 * 4 * 1024 * V
    print(f"{'stage':32s}" + "".join(f"{f'{n} GPU' + ('s' if n > 1 else ''):>10s}" for n in ranks) + "   (GiB per GPU)")

    def row(name, per_rank):
        print(f"{name:32s}" + "".join(f"{per_rank(n) / GiB:10.1f}" for n in ranks))

    row("teacher-cache capture", lambda n: capture)
    row("stage A: MSE + KD (live teacher)", lambda n: teacher_bf16 + 16 * p_student / n + loss)
    row("stage B: KD from the cache", lambda n: 16 * p_student / n + loss)
    row("evaluation (validator)", lambda n: evaluation)
    print("activations and autocast's bf16 weight casts come on top (see the docstring)")

    comp = load_competition("sn24")
    cap = comp.student.max_active_params(comp.teacher.params)
    verdict = "within" if counts["active"] <= cap else f"{counts['active'] / cap:.2f}x over"
    print(f"\nsn24 caps: {comp.student.max_total_params / 1e9:.0f} B total, {cap / 1e9:.1f} B active "
          f"({comp.student.max_active_params_vs_teacher} x the teacher's {comp.teacher.params / 1e9:.0f} B): "
          f"this student is {verdict} the active cap")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
