"""Structural distillation vs a fresh student: held-out KL after the same number of steps.

    python benchmarks/bench_structural.py                 # CPU, the project's tiny teacher, ~2 min
    python benchmarks/bench_structural.py --steps 320

Every variant trains with configs/structural_tiny.json's optimiser and data (the tiny teacher's
corpus caches, 4 x 128-token rows per step) and reports held-out KL(teacher || student) before and
after. The baseline is the same student architecture with random weights (a fresh init of the
structural student's config), trained on KD alone; `fresh tiny preset` is configs/distill_tiny.json's
student and recipe at the same step count, for reference. The structural variants are students
built from the teacher by `quasar init-student` with layers 1-3 swapped for branches alone
(replacement mode "replace"):

  swap+mse        branches copied from the attention, KD + hidden-state MSE (the recipe)
  swap            the same student, KD only
  swap-fresh+mse  branches at their fresh init, KD + hidden-state MSE
  swap+mse/branch only the branches train (the trunk stays the teacher's)

Ratios are baseline KL / variant KL after training: how many times closer to the teacher.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def heldout_run(cfg_path, overrides, out):
    from distill.config import load_config
    from distill.trainer import Trainer

    cfg = load_config(cfg_path, [*overrides, f"output_dir={out}", "progress=false", "eval_every=0",
                                 "checkpoint_every=100000"])
    t0 = time.perf_counter()
    recs = Trainer(cfg).train()
    kl = [r["heldout_kl"] for r in recs if "heldout_kl" in r]
    return kl[0], kl[-1], time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from distill.cli import main as cli_main
    from distill.cli import teacher_cache_main
    from quasar_model.paths import cache_root

    root = cache_root() / "test-teacher-caches"
    kw = dict(k=16, seq_len=128, batch_size=64, progress=False)
    train = teacher_cache_main("tiny-teacher", "corpus:train", root / "train", **kw)
    held = teacher_cache_main("tiny-teacher", "corpus:heldout", root / "heldout", **kw)
    data = [f"data.train_cache={train}", f"data.heldout_cache={held}", f"steps={args.steps}"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        students = {}
        for name, extra in (("attention", []), ("fresh", ["--fresh-branches"])):
            students[name] = tmp / f"student-{name}"
            with contextlib.redirect_stdout(io.StringIO()):
                cli_main(["init-student", "--teacher", "tiny-teacher", "--replace", "--hybrid-layers", "1-3",
                          "--cycle", "quasar,raven,gla", "--out", str(students[name]), *extra])
        from quasar_model import QuasarLongConfig, QuasarLongForCausalLM
        torch.manual_seed(0)
        config = QuasarLongConfig.from_pretrained(students["attention"])
        QuasarLongForCausalLM(config).save_pretrained(tmp / "student-random")
        runs = {
            "baseline (random init, KD)": (ROOT / "configs/structural_tiny.json",
                                           [*data, f"student.init_from={tmp / 'student-random'}",
                                            "loss.hidden_mse_weight=0"]),
            "fresh tiny preset, KD": (ROOT / "configs/distill_tiny.json", data),
            "swap+mse": (ROOT / "configs/structural_tiny.json", [*data, f"student.init_from={students['attention']}"]),
            "swap": (ROOT / "configs/structural_tiny.json", [*data, f"student.init_from={students['attention']}",
                                                             "loss.hidden_mse_weight=0"]),
            "swap-fresh+mse": (ROOT / "configs/structural_tiny.json", [*data, f"student.init_from={students['fresh']}"]),
            "swap+mse/branch": (ROOT / "configs/structural_tiny.json", [*data, f"student.init_from={students['attention']}",
                                                                       "student.trainable=branches"]),
        }
        for name, (cfg, over) in runs.items():
            start, end, secs = heldout_run(cfg, over, tmp / name.split()[0])
            results[name] = {"kl_start": start, "kl_end": end, "seconds": secs}
            print(f"{name:28s} held-out KL {start:.4f} -> {end:.4f}   ({secs:.1f} s)", flush=True)
    base = results["baseline (random init, KD)"]["kl_end"]
    print(f"\nafter {args.steps} steps, KL ratio baseline / variant (higher = closer to the teacher):")
    for name, r in results.items():
        r["ratio_vs_baseline"] = base / r["kl_end"]
        print(f"  {name:28s} {r['ratio_vs_baseline']:7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
