"""The README's main job, end to end: `quasar localnet` as a user runs it (about 2 CPU-minutes)."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_localnet_best_honest_miner_wins_and_the_copier_gets_nothing(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "neurons.cli", "localnet", "--dir", str(out), "--timeout", "600"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    assert all(report["checks"].values()), report["checks"]
    miners = {m["name"]: m for m in report["miners"]}
    assert miners["miner-long"]["weight"] > miners["miner-short"]["weight"]
    assert miners["miner-copier"]["weight"] == 0.0
    assert all(r["gate"] == "exact_copy" for r in miners["miner-copier"]["rounds"])
    assert len(report["rounds"]) >= 2
    for png in report["pngs"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in p.stdout and "FAIL" not in p.stdout
    # every neuron logs the library versions it evaluates with (localnet pins none: no mismatch)
    for name in ["validator", *miners]:
        events = [json.loads(line) for line in (out / "logs" / f"{name}.log").read_text().splitlines()
                  if line.startswith("{")]
        stack = [e for e in events if e.get("event") == "stack"]
        assert len(stack) == 1 and stack[0]["pinned"] is False and stack[0]["mismatch"] == [], (name, stack)
        assert stack[0]["installed"]["torch"] and stack[0]["installed"]["transformers"]
