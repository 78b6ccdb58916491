"""How much recall curriculum a student needs before it scores on the validator's recall items.

Trains a Quasar-Long student from scratch on distill/recall_curriculum.py documents alone (answer-span
cross-entropy, the length curriculum up to --seq-len) and, every --eval-every steps, grades it on the
validator's own items (eval.recall_tasks.generate_items at 1x of --context-len, eval.recall.run_recall)
two ways: exact match (the validator's grade) and teacher-forced accuracy on the answer's tokens after
its first, often a bare leading space (how much of the answer it would get right given the rest: shows
progress long before exact match moves). Step 0
is the untrained student, the baseline of the same run; the table prints each later value against it.

    python benchmarks/bench_recall_curriculum.py --steps 400 --eval-every 100          # CPU, minutes
    python benchmarks/bench_recall_curriculum.py --student recall --steps 420 --eval-every 60 --batch 16 \
        --lr 1e-2 --seq-len 192 --min-len 64 --context-len 192 --forms fixed,round  # ~1 CPU-minute of training
    python benchmarks/bench_recall_curriculum.py --device cuda --steps 20000 --batch 32  # what it takes

Writes recall_curriculum.png (both grades per family against steps) to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.recall_curriculum import FAMILIES, DocMaker, filler_units  # noqa: E402
from distill.recall_student import RECALL_STUDENT_FAMILIES, recall_student_config, train_recall  # noqa: E402
from eval.recall import run_recall  # noqa: E402
from eval.recall_tasks import FAMILIES as VALIDATOR_FAMILIES, generate_items  # noqa: E402
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM  # noqa: E402
from quasar_model.corpus import local_split  # noqa: E402
from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher  # noqa: E402
from quasar_model.tokenization import PlainTextTokenizer  # noqa: E402


@torch.no_grad()
def grade(model, items, device) -> dict[str, tuple[float, float]]:
    """family (with its forms) -> (exact-match rate, teacher-forced accuracy on the answer's tokens
    after the first: the first is often the bare leading space, right long before any digit is)."""
    model.eval()
    exact, tokens = defaultdict(list), defaultdict(list)
    names = [f"{it.family}/{it.meta.get('forms', {}).get('kind', 'fixed')}" for it in items]
    for name, o in zip(names, run_recall(model, items, prefill_chunk=512, max_answer_tokens=12, device=device)):
        exact[name].append(float(o.correct))
    for name, it in zip(names, items):
        ans = it.answer_ids[:12]
        ids = torch.tensor([it.prompt_ids + ans], device=device)
        pred = model(input_ids=ids, use_cache=False).logits[0, len(it.prompt_ids) - 1:-1].argmax(-1)
        tokens[name].append(float((pred == torch.tensor(ans, device=device)).float()[1:].mean()))
    model.train()
    return {f: (sum(exact[f]) / len(exact[f]), sum(tokens[f]) / len(tokens[f])) for f in exact}


def save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=256, help="row length and the curriculum's final document length")
    ap.add_argument("--min-len", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--context-len", type=int, default=256, help="validator items at 1x of this (>= 256 with the tiny tokenizer)")
    ap.add_argument("--families", default="passkey", help="validator families, comma-separated")
    ap.add_argument("--train-families", default=None, help="curriculum families, comma-separated, repeats weight "
                    "(default: all; with --student recall: distill.recall_student.RECALL_STUDENT_FAMILIES)")
    ap.add_argument("--forms", default="fixed", help="validator forms, comma-separated: fixed, round")
    ap.add_argument("--student", choices=("tiny", "recall"), default="tiny",
                    help="tiny: the tiny preset with --overrides, cosine lr; recall: distill.recall_student's "
                         "copy-ready student, constant lr")
    ap.add_argument("--overrides", default='{"num_loops": 1, "use_looped_injection": false}',
                    help="QuasarLongConfig fields over the tiny preset (JSON)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/bench_recall_curriculum")
    a = ap.parse_args(argv)
    fams = a.families.split(",")
    if any(f not in VALIDATOR_FAMILIES for f in fams):
        print(f"error: --families: choose from {list(VALIDATOR_FAMILIES)}", file=sys.stderr)
        return 2
    try:
        overrides = json.loads(a.overrides)
    except json.JSONDecodeError as e:
        print(f"error: --overrides: not JSON ({e})", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_teacher())
    train_fams = a.train_families.split(",") if a.train_families else \
        list(RECALL_STUDENT_FAMILIES if a.student == "recall" else FAMILIES)
    forms = a.forms.split(",")
    if any(f not in ("fixed", "round") for f in forms):
        print("error: --forms: choose from fixed, round", file=sys.stderr)
        return 2
    try:
        maker = DocMaker(tok, filler_units(tok, local_split("train")), families=train_fams)
        items = [it for f in forms for it in generate_items(1, PlainTextTokenizer(tok), a.context_len, families=fams,
                                                            lengths=(1,), depth_bins=4, items_per_cell=2, forms=f)]
        cfg = recall_student_config(len(tok)) if a.student == "recall" else \
            QuasarLongConfig.preset("tiny", vocab_size=len(tok), **overrides)
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = QuasarLongForCausalLM(cfg).to(a.device)
    print(f"student: {sum(p.numel() for p in model.parameters()):,} parameters; {len(items)} validator items "
          f"({', '.join(fams)}) at {a.context_len} tokens", flush=True)
    history = [(0, grade(model, items, a.device))]
    t0 = time.time()

    graded = [0.0]    # seconds spent grading, left out of the training time printed

    def report(step, loss):
        if step % a.eval_every == 0 or step == a.steps:
            g0 = time.time()
            history.append((step, grade(model, items, a.device)))
            graded[0] += time.time() - g0
            cells = "  ".join(f"{f} {e:.2f}/{t:.2f}" for f, (e, t) in history[-1][1].items())
            print(f"step {step:6d}  answer CE {loss:.3f}  {time.time() - t0 - graded[0]:7.1f}s training  "
                  f"exact/token-acc: {cells}", flush=True)

    # the rows of step s are the same for every model: a function of (seed 0, s)
    schedule = dict(ramp=0.3, warmup=50, decay="constant") if a.student == "recall" else \
        dict(ramp=0.5, warmup=20, decay="cosine")
    train_recall(model, maker, steps=a.steps, rows=a.batch, seq_len=a.seq_len, min_len=a.min_len, lr=a.lr,
                 device=a.device, after_step=report, **schedule)

    base = history[0][1]
    print(f"\n{'family':<18} {'exact (step 0 -> end)':>24} {'token acc (step 0 -> end, ratio)':>36}")
    for f, (e, t) in history[-1][1].items():
        e0, t0_ = base[f]
        ratio = f"{t / t0_:.1f}x" if t0_ > 0 else "untrained: 0"
        print(f"{f:<18} {e0:>10.3f} -> {e:<10.3f} {t0_:>12.3f} -> {t:.3f} ({ratio})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for f in history[0][1]:
        xs = [s for s, _ in history]
        ax.plot(xs, [h[f][0] for _, h in history], "o-", label=f"{f}: exact match")
        ax.plot(xs, [h[f][1] for _, h in history], "s--", label=f"{f}: answer-token accuracy (teacher-forced)")
    ax.set_xlabel("curriculum step")
    ax.set_ylabel("on the validator's items (1x)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, out / "recall_curriculum.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
