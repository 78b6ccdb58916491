"""How much recall curriculum a student needs before it scores on the validator's recall items.

Trains a Quasar-Long student from scratch on distill/recall_curriculum.py documents alone (answer-span
cross-entropy, the length curriculum up to --seq-len) and, every --eval-every steps, grades it on the
validator's own items (eval.recall_tasks.generate_items at 1x of --context-len, eval.recall.run_recall)
two ways: exact match (the validator's grade) and teacher-forced answer-token accuracy (how much of
the answer it would get right given the rest: shows progress long before exact match moves). Step 0
is the untrained student, the baseline of the same run; the table prints each later value against it.

    python benchmarks/bench_recall_curriculum.py --steps 400 --eval-every 100          # CPU, minutes
    python benchmarks/bench_recall_curriculum.py --device cuda --steps 20000 --batch 32  # what it takes

Writes recall_curriculum.png (both grades per family against steps) to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.recall_curriculum import FAMILIES, DocMaker, curriculum_length, filler_units, recall_batch  # noqa: E402
from eval.recall import run_recall  # noqa: E402
from eval.recall_tasks import FAMILIES as VALIDATOR_FAMILIES, generate_items  # noqa: E402
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM  # noqa: E402
from quasar_model.corpus import local_split  # noqa: E402
from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher  # noqa: E402
from quasar_model.tokenization import PlainTextTokenizer  # noqa: E402


@torch.no_grad()
def grade(model, items, device) -> dict[str, tuple[float, float]]:
    """family -> (exact-match rate, teacher-forced answer-token accuracy)."""
    model.eval()
    exact, tokens = defaultdict(list), defaultdict(list)
    for o in run_recall(model, items, prefill_chunk=512, max_answer_tokens=12, device=device):
        exact[o.family].append(float(o.correct))
    for it in items:
        ans = it.answer_ids[:12]
        ids = torch.tensor([it.prompt_ids + ans], device=device)
        pred = model(input_ids=ids, use_cache=False).logits[0, len(it.prompt_ids) - 1:-1].argmax(-1)
        tokens[it.family].append(float((pred == torch.tensor(ans, device=device)).float().mean()))
    model.train()
    return {f: (sum(exact[f]) / len(exact[f]), sum(tokens[f]) / len(tokens[f])) for f in exact}


def save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def train(model, maker: DocMaker, *, steps: int, seq_len: int, min_len: int, batch: int, lr: float, device,
          after_step=None) -> None:
    """AdamW on answer-span CE of curriculum rows (warmup, cosine to a tenth); the rows of step s are
    the same for every model: a function of (seed 0, s)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        b = recall_batch(maker, rows=batch, seq_len=seq_len, seed=0, step=step,
                         length=curriculum_length(step, steps, min_len, seq_len, 0.5))
        logits = model(input_ids=b["input_ids"].to(device), position_ids=b["position_ids"].to(device),
                       use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].to(device).flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if after_step is not None:
            after_step(step + 1, loss.item())


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
    ap.add_argument("--train-families", default=",".join(FAMILIES))
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
    maker = DocMaker(tok, filler_units(tok, local_split("train")), families=a.train_families.split(","))
    items = generate_items(1, PlainTextTokenizer(tok), a.context_len, families=fams, lengths=(1,), depth_bins=4,
                           items_per_cell=2)
    try:
        cfg = QuasarLongConfig.preset("tiny", vocab_size=len(tok), **overrides)
    except (TypeError, ValueError) as e:
        print(f"error: --overrides: {e}", file=sys.stderr)
        return 2
    model = QuasarLongForCausalLM(cfg).to(a.device)
    print(f"student: {sum(p.numel() for p in model.parameters()):,} parameters; {len(items)} validator items "
          f"({', '.join(fams)}) at {a.context_len} tokens", flush=True)
    history = [(0, grade(model, items, a.device))]
    t0 = time.time()

    def report(step, loss):
        if step % a.eval_every == 0 or step == a.steps:
            history.append((step, grade(model, items, a.device)))
            cells = "  ".join(f"{f} {e:.2f}/{t:.2f}" for f, (e, t) in history[-1][1].items())
            print(f"step {step:6d}  answer CE {loss:.3f}  {time.time() - t0:7.1f}s  "
                  f"exact/token-acc: {cells}", flush=True)

    train(model, maker, steps=a.steps, seq_len=a.seq_len, min_len=a.min_len, batch=a.batch, lr=a.lr,
          device=a.device, after_step=report)

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
    for f in fams:
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
