"""The README's main job, end to end: `quasar localnet` as a user runs it (about 4 CPU-minutes on a
quiet 2-core box): honest miners and adversaries (copier, near-copier, crasher, teacher-submitter)."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_localnet_best_honest_miner_wins_and_every_adversary_gets_nothing(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "neurons.cli", "localnet", "--out", str(out), "--timeout", "900"],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    assert all(report["checks"].values()), report["checks"]
    assert len(report["rounds"]) >= 2
    miners = {m["name"]: m for m in report["miners"]}
    roles = {n: m["role"] for n, m in miners.items()}
    assert roles == {"miner-long": "honest", "miner-short": "honest", "miner-copier": "copier",
                     "miner-nearcopy": "near-copier", "miner-crasher": "crasher",
                     "miner-teacher": "teacher-submitter"}
    # the best honest miner holds the most weight; every adversary none
    assert miners["miner-long"]["weight"] > max(m["weight"] for n, m in miners.items() if n != "miner-long")
    for n, m in miners.items():
        if m["role"] != "honest":
            assert m["weight"] == 0.0 and not m["led_rounds"], (n, m["outcome"])
    # both honest miners scored ungated above 0 every round, in the order of their training
    for long, short in zip(miners["miner-long"]["rounds"], miners["miner-short"]["rounds"], strict=True):
        assert long["gate"] is None and short["gate"] is None, (long["gate"], short["gate"])
        assert long["composite"] > short["composite"] > 0
    # each attack met the defence meant for it
    assert all(r["gate"] == "exact_copy" for r in miners["miner-copier"]["rounds"])
    near = [r["gate"] for r in miners["miner-nearcopy"]["rounds"]]
    assert "functional_copy" in near and set(near) <= {"functional_copy", None}, near
    crash = miners["miner-crasher"]
    assert not crash["rounds"] and [r["stage"] for r in crash["rejected"]] == ["evaluate"]
    assert "non-finite" in crash["rejected"][0]["reason"], crash["rejected"]
    teacher = miners["miner-teacher"]
    assert not teacher["rounds"] and [r["stage"] for r in teacher["rejected"]] == ["config"]
    assert "active parameters" in teacher["rejected"][0]["reason"], teacher["rejected"]
    # the validator: one process, one start, a normal exit, whatever the crasher did
    assert report["validator"]["exit_status"] == 0 and report["validator"]["starts"] == 1
    for n, m in miners.items():
        assert n in p.stdout and m["role"] in p.stdout
    for png in report["pngs"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in p.stdout and "FAIL" not in p.stdout
    # every neuron's log (its stdout and stderr, not a terminal) is JSON lines only: no bars, no
    # library's plain-text warnings (transformers' past_key_values deprecation among them); and each
    # logs the library versions it evaluates with (localnet pins none: no mismatch)
    for name in ["validator", *miners]:
        text = (out / "logs" / f"{name}.log").read_text()
        assert "past_key_values" not in text, name
        events = [json.loads(line) for line in text.splitlines()]
        stack = [e for e in events if e.get("event") == "stack"]
        assert len(stack) == 1 and stack[0]["pinned"] is False and stack[0]["mismatch"] == [], (name, stack)
        assert stack[0]["installed"]["torch"] and stack[0]["installed"]["transformers"]


def _report(**change) -> dict:
    """A localnet report as build_report writes it, every check passing; `change` edits one miner."""
    def miner(name, role, weight, composites, led=()):
        return {"name": name, "role": role, "weight": weight, "led_rounds": list(led),
                "rounds": [{"round": i + 1, "composite": c, "gate": None} for i, c in enumerate(composites)]}

    miners = {"miner-long": miner("miner-long", "honest", 1.0, [0.55, 0.54], led=(1, 2)),
              "miner-short": miner("miner-short", "honest", 0.0, [0.38, 0.38]),
              "miner-copier": miner("miner-copier", "copier", 0.0, [0.0, 0.0]),
              "miner-crasher": miner("miner-crasher", "crasher", 0.0, [])}
    for name, fields in change.items():
        miners[name.replace("_", "-")].update(fields)
    return {"rounds": [{"id": 1}, {"id": 2}], "miners": list(miners.values()),
            "validator": {"pid": 1, "exit_status": 0, "starts": 1}}


def test_pass_checks_fail_on_each_condition_of_issue_11():
    from neurons.localnet import pass_checks

    assert all(pass_checks(_report(), 2).values())
    failing = {
        "adversary weighted": _report(miner_crasher={"weight": 0.1}),
        "adversary led": _report(miner_copier={"led_rounds": [2]}),
        "best not the most weight": _report(miner_short={"weight": 1.0}),
        "honest out of order": _report(miner_short={"rounds": [{"round": 2, "composite": 0.6, "gate": None}]}),
        "honest gated": _report(miner_short={"rounds": [{"round": 2, "composite": 0.0, "gate": "degenerate"}]}),
    }
    for why, report in failing.items():
        assert not all(pass_checks(report, 2).values()), why
    restarted = _report()
    restarted["validator"]["starts"] = 2
    assert not all(pass_checks(restarted, 2).values())
    assert not all(pass_checks(_report(), 3).values())  # fewer rounds than asked for
