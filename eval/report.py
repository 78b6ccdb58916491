"""A submission's evaluation as files: a JSON report and two PNG figures.

    report.json       {"summary": ..., "result": SubmissionResult.to_dict()}; the result part loads
                      back with SubmissionResult.from_dict, so a report is also a replayable record
    recall.png        per task family, recall accuracy on a length x depth grid
    kl_hist.png       the held-out documents' KL (nats/token)

The summary is built from the result alone (item ids carry family, length and depth), so it can be
rebuilt for any stored round. Its composite is eval.scoring's, without gates: the degenerate gate is
reported beside it (it needs only this submission), the copy gates need the round's other models.
The JSON is written with sorted keys and fixed separators: the same result gives the same bytes.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

from eval.competition import Competition
from eval.gates import degenerate
from eval.results import AXES, SubmissionResult
from eval.scoring import axis_means, composite

_RECALL_ID = re.compile(r"recall/(?P<family>[a-z_]+)/L(?P<length>\d+)/d(?P<depth>\d+)/i\d+")


def recall_grid(result: SubmissionResult) -> dict[str, dict[int, dict[int, float]]]:
    """family -> length bin -> depth bin -> accuracy (mean over the cell's items)."""
    cells: dict = defaultdict(list)
    for it in result.items:
        if it.axis != "recall":
            continue
        m = _RECALL_ID.fullmatch(it.item_id)
        if m is None:
            raise ValueError(f"recall item id {it.item_id!r} is not 'recall/<family>/L<n>/d<n>/i<n>'")
        cells[(m["family"], int(m["length"]), int(m["depth"]))].append(it.value)
    grid: dict = defaultdict(lambda: defaultdict(dict))
    for (f, L, d), vals in sorted(cells.items()):
        grid[f][L][d] = sum(vals) / len(vals)
    return {f: {L: dict(ds) for L, ds in by_len.items()} for f, by_len in grid.items()}


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize(result: SubmissionResult, competition: Competition, seed: int) -> dict:
    """Everything a person reads first: composite, per-axis means, recall broken down, the gate."""
    raw = {a: _mean(it.value for it in result.items if it.axis == a) for a in AXES}
    tce = [it.teacher_ce for it in result.items if it.axis == "ce" and it.teacher_ce is not None]
    grid = recall_grid(result)
    by_length: dict = defaultdict(list)
    for by_len in grid.values():
        for L, ds in by_len.items():
            by_length[L].extend(ds.values())
    return dict(
        hotkey=result.hotkey, model_hash=result.model_hash, commit_block=result.commit_block,
        competition=competition.name, competition_digest=competition.digest, seed=seed,
        composite=composite(result.items, competition.score.weights) if result.items else None,
        utility=axis_means(result.items),    # per-axis mean utility in [0, 1], what the composite weighs
        mean={a: v for a, v in raw.items() if v is not None},  # raw means: KL, CE in nats/token; recall accuracy
        teacher_ce=_mean(tce),
        items={a: sum(it.axis == a for it in result.items) for a in AXES},
        degenerate=degenerate(result.continuations, competition.score.degenerate_max_repeat),
        recall=dict(
            by_family={f: _mean(v for ds in by_len.values() for v in ds.values()) for f, by_len in grid.items()},
            by_length={f"{L}x": _mean(v) for L, v in sorted(by_length.items())},
            # answers longer than max_answer_tokens, graded on their first tokens (eval.recall)
            truncated=sum(it.truncated for it in result.items if it.axis == "recall"),
            # JSON keys are strings: "L<length>" -> "d<depth>" -> accuracy
            grid={f: {f"L{L}": {f"d{d}": v for d, v in ds.items()} for L, ds in by_len.items()}
                  for f, by_len in grid.items()},
        ),
    )


def report_json(result: SubmissionResult, competition: Competition, seed: int) -> str:
    doc = dict(summary=summarize(result, competition, seed), result=result.to_dict())
    return json.dumps(doc, sort_keys=True, indent=1) + "\n"


# -----------------------------------------------------------------------------
# figures

def plot_recall(result: SubmissionResult, path: str | os.PathLike, depth_bins: int | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = recall_grid(result)
    if not grid:
        raise ValueError("no recall items in the result: nothing to plot")
    fams = list(grid)
    lengths = sorted({L for by_len in grid.values() for L in by_len})
    D = depth_bins or 1 + max(d for by_len in grid.values() for ds in by_len.values() for d in ds)
    # one panel per family, side by side: rows = context multiple, columns = needle depth
    fig, axes = plt.subplots(1, len(fams), figsize=(max(2.0, 0.3 * D) * len(fams) + 1.2, 0.45 * len(lengths) + 1.6),
                             squeeze=False, constrained_layout=True)
    for ax, f in zip(axes[0], fams):
        acc = np.full((len(lengths), D), np.nan)                      # [lengths, depth bins]
        for i, L in enumerate(lengths):
            for d, v in grid[f].get(L, {}).items():
                acc[i, d] = v
        im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"{f}\nmean {np.nanmean(acc):.2f}", fontsize=9)
        ax.set_yticks(range(len(lengths)), [f"{L}x" for L in lengths], fontsize=8)
        ax.set_xticks(range(D), [str(d) for d in range(D)], fontsize=7)
        ax.set_xlabel("depth bin", fontsize=8)
    axes[0, 0].set_ylabel("context length", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="exact match")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_kl(result: SubmissionResult, path: str | os.PathLike) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = [it.value for it in result.items if it.axis == "kl" and math.isfinite(it.value)]
    if not kl:
        raise ValueError("no finite KL items in the result: nothing to plot")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(kl, bins=min(30, max(5, len(kl) // 2)), color="tab:blue")
    ax.axvline(sum(kl) / len(kl), color="k", linestyle="--", label=f"mean {sum(kl) / len(kl):.3f}")
    ax.set_xlabel("KL(teacher || student), nats/token")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(result: SubmissionResult, competition: Competition, seed: int,
                 out_dir: str | os.PathLike) -> dict[str, Path]:
    """report.json, recall.png (when there are recall items), kl_hist.png (when there are KL items)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json"}
    paths["json"].write_text(report_json(result, competition, seed))
    if any(it.axis == "recall" for it in result.items):
        paths["recall"] = plot_recall(result, out / "recall.png", competition.recall.depth_bins)
    if any(it.axis == "kl" and math.isfinite(it.value) for it in result.items):
        paths["kl"] = plot_kl(result, out / "kl_hist.png")
    return paths


def format_summary(summary: dict) -> str:
    """A few lines for a terminal."""
    def f(x, p=4):
        return "-" if x is None else f"{x:.{p}f}"

    m, u = summary["mean"], summary["utility"]
    lines = [
        f"{summary['competition']} seed {summary['seed']}  model {summary['model_hash'][:16]}",
        f"composite {f(summary['composite'])}" + ("   DEGENERATE (gate: score 0)" if summary["degenerate"] else ""),
        f"  kl     {f(m.get('kl'))} nats/token   utility {f(u.get('kl'))}",
        f"  ce     {f(m.get('ce'))} nats/token   utility {f(u.get('ce'))}   teacher ce {f(summary['teacher_ce'])}",
        f"  recall {f(m.get('recall'))}              utility {f(u.get('recall'))}",
    ]
    r = summary["recall"]
    if r["by_family"]:
        lines.append("  recall by family: " + "  ".join(f"{k} {v:.2f}" for k, v in r["by_family"].items()))
        lines.append("  recall by length: " + "  ".join(f"{k} {v:.2f}" for k, v in r["by_length"].items()))
    if r.get("truncated"):
        lines.append(f"  recall answers truncated to max_answer_tokens: {r['truncated']}")
    return "\n".join(lines)


__all__ = ["recall_grid", "summarize", "report_json", "plot_recall", "plot_kl", "write_report", "format_summary"]
