"""metrics.jsonl, a run's log: one JSON record per line, for each logged step (step, loss, lr, ...)
and each held-out evaluation (step, heldout_kl)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def append_record(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (atomically): a run resumed there logs the later steps again."""
    from quasar_model.atomic import write_atomic

    keep = [r for r in read_metrics(path) if r["step"] <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
