"""The operator files in scripts/ (systemd units, pm2 ecosystem) start commands this CLI accepts,
with the canonical flags, and stop them the way the neurons expect (SIGTERM/SIGINT, time to
checkpoint). Parsing only."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from neurons import cli

REPO = Path(__file__).resolve().parents[1]


def unit(name: str) -> dict[str, str]:
    text = (REPO / "scripts" / "systemd" / name).read_text().replace("\\\n", " ")
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def accepts(argv: list[str]):
    args = cli.build_parser().parse_args(argv)
    assert not getattr(args, "deprecations", None), args.deprecations
    return args


@pytest.mark.parametrize("role, stop_seconds", [("miner", 600), ("validator", 60)])
def test_systemd_units(role, stop_seconds):
    u = unit(f"quasar-{role}.service")
    argv = shlex.split(u["ExecStart"])
    assert argv[0].endswith("/.venv/bin/quasar")
    args = accepts(argv[1:])
    assert (args.command, args.network) == (role, "finney")
    assert (u["Restart"], u["KillSignal"], u["KillMode"], int(u["TimeoutStopSec"])) == \
           ("always", "SIGTERM", "mixed", stop_seconds)


def test_pm2_ecosystem():
    text = (REPO / "scripts" / "pm2" / "ecosystem.config.js").read_text()
    apps = re.findall(r'neuron\("(quasar-\w+)", \[(.*?)\], (\d+)\)', text, re.S)
    assert [name for name, _, _ in apps] == ["quasar-miner", "quasar-validator"]
    for name, args, kill_ms in apps:
        argv = json.loads(f"[{args.strip().rstrip(',')}]")
        assert accepts(argv).command == name.split("-")[1]
        assert int(kill_ms) >= 60_000  # pm2's default 1.6 s would SIGKILL a miner mid-checkpoint
