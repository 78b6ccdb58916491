"""loss_curve.png: a run's metrics.jsonl drawn (training loss per step, held-out KL points)."""
from __future__ import annotations

from pathlib import Path

from .metrics_log import read_metrics


def plot_loss_curve(metrics_path: Path, out: Path, loss_kind: str) -> Path | None:
    """metrics_path -> the PNG `out` (None when there are no metrics yet); loss_kind labels the loss line."""
    if not metrics_path.exists():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    held = [(r["step"], r["heldout_kl"]) for r in recs if "heldout_kl" in r]
    mse = [(r["step"], r["hidden_mse"]) for r in recs if "hidden_mse" in r]
    rce = [(r["step"], r["recall_ce"]) for r in recs if "recall_ce" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=1, label=f"train loss ({loss_kind}" + (" + hidden MSE" if mse else "") + ")")
    if mse:
        ax.plot(*zip(*mse), lw=1, label="hidden-state MSE (teacher-normalised, train)")
    if rce:
        ax.plot(*zip(*rce), lw=1, label="recall curriculum: answer-span CE")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out KL(teacher || student)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
