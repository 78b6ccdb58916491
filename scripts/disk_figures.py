"""Disk and time an operator plans for: bytes per token and per parameter measured on the tiny path,
then the same rates at a competition's sizes (default sn24).

    python scripts/disk_figures.py [COMPETITION] [--run LOCALNET_DIR] [--cache TEACHER_CACHE_DIR]
                                   [--tokens 1e8,1e9]

Measured (when the files are there; else the stored-format formula alone is printed):
  teacher cache  shard bytes / tokens of a cache on disk (default: the localnet train cache under
                 $QUASAR_CACHE), next to its format's 8 + k x (4 + log-prob bytes) per token
  checkpoints    bytes / parameter of a localnet run's exported student (model.safetensors) and of
                 its training checkpoint (weights + optimizer state), `quasar localnet --out DIR`
  round time     the validator's `round` -> `round done` log events of that run
Computed for the competition: the teacher's bf16 weights, the student's export and training
checkpoint at the parameter cap and at scripts/size_budget.py's reference student, teacher caches
at a few token counts, k and dtypes, the validator's held-out cache and submission store.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.config import DistillConfig  # noqa: E402
from eval.competition import load_competition  # noqa: E402
from quasar_model.paths import cache_root  # noqa: E402
from quasar_model.teacher_outputs.tiny_teacher import recipe_id  # noqa: E402
from scripts.size_budget import reference_student  # noqa: E402

GB = 1e9
LOGPROB_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def cache_bytes_per_token(k: int, logprob_dtype: str = "float32") -> int:
    """quasar_model/teacher_outputs/cache.py's layout: int32 input id, k int32 ids, k log-probs, fp32 tail mass."""
    return 4 + 4 * k + LOGPROB_BYTES[logprob_dtype] * k + 4


def safetensors_params(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(_numel(f.get_slice(name).get_shape()) for name in f.keys())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def measure_cache(cache: Path | None) -> dict | None:
    if cache is None:
        index = cache_root() / f"localnet-train-cache-{recipe_id()}.txt"
        cache = Path(index.read_text().strip()) if index.exists() else None
    if cache is None or not (cache / "manifest.json").exists():
        return None
    m = json.loads((cache / "manifest.json").read_text())
    size = sum(s["bytes"] for s in m["shards"])
    meta = m["meta"]
    return dict(path=cache, bytes=size, tokens=meta["num_tokens"], k=meta["k"], dtype=meta["logprob_dtype"])


def measure_run(run: Path | None) -> dict | None:
    if run is None or not (run / "miner-long" / "train" / "checkpoints").is_dir():
        return None
    ckpt = sorted((run / "miner-long" / "train" / "checkpoints").glob("step-*"))[-1]
    export = next((run / "miner-long").glob("published/*/model.safetensors"))
    params = safetensors_params(export)
    rounds, t0 = [], None
    log = run / "logs" / "validator.log"
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("event") == "round":
            t0 = r["t"]
        elif r.get("event") == "round done" and t0 is not None:
            rounds.append(r["t"] - t0)
    return dict(params=params, export=export.stat().st_size,
                train=sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()), rounds=rounds, run=run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("competition", nargs="?", default="sn24")
    ap.add_argument("--run", type=Path, default=None, help="a finished `quasar localnet --out` directory")
    ap.add_argument("--cache", type=Path, default=None, help="a teacher cache directory (OUT/<id>)")
    ap.add_argument("--tokens", default="1e8,1e9", help="teacher-cache token counts to size (comma-separated)")
    a = ap.parse_args(argv)

    from quasar_model.report import parameter_counts  # after parsing: torch takes seconds, --help should not

    comp = load_competition(a.competition)
    print("measured on the tiny path")
    cache = measure_cache(a.cache)
    if cache:
        print(f"  teacher cache   {cache['bytes'] / cache['tokens']:.1f} B/token at k={cache['k']} {cache['dtype']} "
              f"(format: {cache_bytes_per_token(cache['k'], cache['dtype'])} + per-sequence offsets; "
              f"{cache['tokens']:,} tokens, {cache['bytes']:,} B, {cache['path']})")
    run = measure_run(a.run)
    export_bpp, train_bpp = 4.0, 12.0  # fp32 export; fp32 weights + AdamW's two fp32 moments
    if run:
        export_bpp, train_bpp = run["export"] / run["params"], run["train"] / run["params"]
        print(f"  export          {export_bpp:.2f} B/parameter ({run['params']:,} parameters, {run['export']:,} B)")
        print(f"  train ckpt      {train_bpp:.2f} B/parameter (weights + optimizer + RNG/state, {run['train']:,} B)")
        if run["rounds"]:
            print("  localnet round  " + ", ".join(f"{s:.0f} s" for s in run["rounds"])
                  + f" (validator.log of {run['run']})")
    else:
        print(f"  (no --run: export {export_bpp:g} and training checkpoint {train_bpp:g} B/parameter assumed)")

    keep = DistillConfig.__dataclass_fields__["keep_checkpoints"].default
    print(f"\n{comp.name}: computed")
    print(f"  teacher {comp.teacher.id} weights ({comp.teacher.dtype}): {2 * comp.teacher.params / GB:.1f} GB")
    ref = parameter_counts(reference_student(comp))["total"]
    for what, n in ((f"student at the cap ({comp.student.max_total_params / 1e9:g}B total)", comp.student.max_total_params),
                    (f"reference student ({ref / 1e9:.1f}B total)", ref)):
        print(f"  {what}: export {export_bpp * n / GB:.0f} GB, training checkpoint {train_bpp * n / GB:.0f} GB "
              f"(up to {keep} kept + 1 being written: {(keep + 1) * train_bpp * n / GB:.0f} GB)")
    tokens = [int(float(t)) for t in a.tokens.split(",")]
    print("  teacher cache (GB)    " + "".join(f"{t / 1e6:>10,.0f}M tok" for t in tokens))
    for k in (32, 64, 128):
        for dtype in ("float32", "bfloat16"):
            row = "".join(f"{cache_bytes_per_token(k, dtype) * t / GB:>14,.1f}" for t in tokens)
            print(f"    k={k:<3} {dtype:<9}  {row}")
    h = comp.heldout
    print(f"  validator held-out cache: {h.documents} docs x {h.seq_len} tokens at top-{h.topk} fp32: "
          f"{cache_bytes_per_token(h.topk) * h.documents * h.seq_len / GB:.2f} GB per seed")
    cap = 4 * comp.student.max_total_params  # neurons/storage/core.py FetchLimits: 4 bytes a parameter
    print(f"  validator submissions: up to {cap / GB:.0f} GB each (fetch cap), evicted beyond --disk-budget-gb "
          f"(500 GB: {int(500 * GB // cap)} at the cap)")
    print(f"  round: cadence {comp.schedule.cadence_blocks} blocks x 12 s = {comp.schedule.cadence_blocks * 12} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
