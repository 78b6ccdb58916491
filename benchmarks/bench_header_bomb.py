"""How long and how much memory a validator spends refusing a safetensors header bloated to
~100 MB (issue 11, attack 7): a valid `tiny` checkpoint whose model.safetensors header also
declares ~1M empty tensors, fetched from `local` storage and checked like any submission.

    python benchmarks/bench_header_bomb.py [--mb 100]

Prints the rejection, the seconds from fetch start to rejection and the peak resident memory
(VmHWM) of this process before and after the fetch, so the difference is the fetch's.
"""
import argparse
import json
import shutil
import subprocess
import sys
import struct
import tempfile
import time
from pathlib import Path

import torch

import neurons
from neurons.checks import StudentLimits
from neurons.commitment import Commitment
from neurons.manifest import SubmissionRejected, write_manifest
from neurons.storage import fetch
from neurons.storage.core import FetchLimits
from quasar_model import QuasarLongConfig, QuasarLongForCausalLM


def bloat(path: Path, target_bytes: int) -> None:
    """Rewrite `path` with its real tensors plus empty ones until the header is `target_bytes`."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    end = len(data)
    entry = len(json.dumps({"x.0000000": {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}}))
    for i in range(target_bytes // entry):
        header[f"x.{i:07d}"] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(root: Path) -> None:
    """In a fresh process (the bomb's construction must not count): fetch, check, report."""
    torch.set_num_threads(1)
    info = json.loads((root / "bomb.json").read_text())
    limits = StudentLimits(max_total_params=50_000_000, vocab_size=info["vocab_size"], max_layers=8, max_hidden=512)
    hotkey = "5Bomb"  # any committing hotkey: the binding only has to match the one fetching names
    commitment = Commitment.for_model("local", "bomb", "t1", info["model_hash"], hotkey)
    print(f"code: {Path(neurons.__file__).parent}")
    before = rss_mb()
    t0 = time.perf_counter()
    try:
        fetch(commitment, root / "dest", limits=FetchLimits(limits), miner_hotkey=hotkey, storage_root=root / "storage",
              localnet=True)
        outcome = "ACCEPTED"
    except SubmissionRejected as e:
        outcome = f"rejected [{e.stage}] {e.reason[:160]}"
    seconds = time.perf_counter() - t0
    print(outcome)
    print(f"seconds to rejection: {seconds:.2f}")
    print(f"peak RSS before fetch: {before:.0f} MiB, after: {rss_mb():.0f} MiB (+{rss_mb() - before:.0f} MiB)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(args.measure)
    root = Path(tempfile.mkdtemp())
    src = root / "storage" / "bomb" / "t1"
    config = QuasarLongConfig.preset("tiny")
    QuasarLongForCausalLM(config).save_pretrained(src)
    bloat(src / "model.safetensors", args.mb << 20)
    manifest = write_manifest(src)
    (root / "bomb.json").write_text(json.dumps({"vocab_size": config.vocab_size, "model_hash": manifest.model_hash}))
    print(f"model.safetensors: {(src / 'model.safetensors').stat().st_size / 2**20:.1f} MiB")
    subprocess.run([sys.executable, __file__, "--measure", str(root)], check=True)
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
