"""Does the Quasar-Long hybrid recall further than a plain transformer? Same data, steps and parameters.

Students of one size class, trained identically on the recall curriculum (distill/recall_student.py's
train_recall and families: the same rows at every step) at length L, then graded on the validator's
passkey items (eval.recall_tasks at 1x, 2x, 4x, 8x L, fixed and round forms; eval.recall.run_recall):

    recall        distill.recall_student's student: 3 attention layers, RoPE everywhere, an engram
                  layer at layer 0 (the configuration known to learn copying in a few hundred steps)
    hybrid        the same with the Quasar-Long pieces: recurrent branches beside attention in
                  layers 1-2 (quasar, raven) and RoPE up to position 16, NoPE after (the `tiny` preset's cutoff)
    no-branches   the hybrid without branches (attention alone), MLP widened to its parameter count
    rope-all      the hybrid with RoPE at every position
    dense         a plain transformer: RoPE everywhere, no branches, no engram; MLP widened to the
                  hybrid's parameter count (the baseline)

Two grades per cell: exact match (the validator's) and teacher-forced answer-token accuracy (the
answer's leading space left out). The table prints each variant's 8x/1x token-accuracy ratio and
its 4x token accuracy against the dense baseline of the same run.

    python benchmarks/bench_recall_arch.py                      # CPU: ~10 min on one thread
    python benchmarks/bench_recall_arch.py --device cuda --steps 5000 --seq-len 1024

Writes recall_arch.png (a heatmap: variant x forms rows, length columns) to --out.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_recall_curriculum import grade, save_png  # noqa: E402
from distill.recall_curriculum import DocMaker, filler_units  # noqa: E402
from distill.recall_student import RECALL_STUDENT_FAMILIES, recall_student_config, train_recall  # noqa: E402
from eval.recall_tasks import generate_items  # noqa: E402
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM  # noqa: E402
from quasar_model.corpus import local_split  # noqa: E402
from quasar_model.teacher_outputs.tiny_teacher import tiny_teacher  # noqa: E402
from quasar_model.tokenization import PlainTextTokenizer  # noqa: E402

BRANCHES = dict(hybrid_attention_layers=[1, 2], hybrid_alpha_init=0.0)
NOPE = dict(use_nope=True, long_context_mode="rope_short_nope_long", nope_after_position=16)
VARIANTS = {
    "recall": {},
    "hybrid": {**BRANCHES, **NOPE},
    "no-branches": NOPE,
    "rope-all": BRANCHES,
    "dense": dict(engram_layers=[]),
}
LENGTHS = (1, 2, 4, 8)


def n_params(cfg: QuasarLongConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in QuasarLongForCausalLM(cfg).parameters())


# the width each variant grows to reach the hybrid's parameter count (the others are at it already)
WIDEN = {"no-branches": "intermediate_size", "dense": "intermediate_size"}


def config(name: str, vocab: int) -> QuasarLongConfig:
    def make(**extra):
        return recall_student_config(vocab, **{**VARIANTS[name], **extra})

    if name not in WIDEN:
        return make()
    target, field = n_params(config("hybrid", vocab)), WIDEN[name]
    lo, hi = 1, 4096
    while lo < hi:      # the narrowest width with at least the hybrid's parameters
        mid = (lo + hi) // 2
        if n_params(make(**{field: mid})) < target:
            lo = mid + 1
        else:
            hi = mid
    return make(**{field: lo})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=420)
    ap.add_argument("--seq-len", type=int, default=192, help="L: training length, and the items' 1x")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--families", default="passkey", help="validator families that fit at 1x L (passkey >= ~180)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/bench_recall_arch")
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher())
    maker = DocMaker(tok, filler_units(tok, local_split("train")), families=RECALL_STUDENT_FAMILIES)
    fams = a.families.split(",")
    rows_of = [f"{f}/{k}" for f in fams for k in ("fixed", "round")]
    items = {}
    for n in LENGTHS:    # a family too long for L at 1x is left out at every length
        try:
            items[n] = [it for forms in ("fixed", "round")
                        for it in generate_items(1, PlainTextTokenizer(tok), a.seq_len, families=fams, lengths=(n,),
                                                 depth_bins=2, items_per_cell=2, forms=forms)]
        except ValueError as e:
            print(f"error: {e} (raise --seq-len or drop the family)", file=sys.stderr)
            return 2
    results = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        model = QuasarLongForCausalLM(config(name, len(tok))).to(a.device)
        t0 = time.time()
        train_recall(model, maker, steps=a.steps, rows=a.batch, seq_len=a.seq_len, lr=a.lr, seed=0, device=a.device)
        results[name] = {n: grade(model, items[n], a.device) for n in LENGTHS}
        print(f"{name:<12} {sum(p.numel() for p in model.parameters()):>9,} params  trained {a.steps} steps in "
              f"{time.time() - t0:.0f}s, graded at {', '.join(f'{n}x' for n in LENGTHS)} L (L={a.seq_len})",
              flush=True)

    print(f"\nexact match / teacher-forced answer-token accuracy on the validator's items ({a.steps} steps at L={a.seq_len})")
    print(f"{'variant':<12} {'family':<15} " + " ".join(f"{f'{n}x':>11}" for n in LENGTHS) + "  tok 8x/1x  tok vs dense 4x")
    rows, grid = [], []
    for name, by_len in results.items():
        for f in rows_of:
            cells = [by_len[n][f] for n in LENGTHS]
            one, eight = cells[0][1], cells[-1][1]
            dense4 = results["dense"][4][f][1]
            print(f"{name:<12} {f:<15} " + " ".join(f"{e:.2f}/{t:.2f}".rjust(11) for e, t in cells)
                  + f"  {eight / one if one else float('nan'):9.2f}  {cells[2][1] / dense4 if dense4 else float('nan'):14.2f}")
            rows.append(f"{name} / {f}")
            grid.append([t for _, t in cells])

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(LENGTHS)), [f"{n}x L" for n in LENGTHS])
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="answer-token accuracy (teacher-forced)")
    ax.set_title(f"recall by architecture: {a.steps} steps at L={a.seq_len}")
    save_png(fig, out / "recall_arch.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
