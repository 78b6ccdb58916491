"""Logs (issue 12): stderr of a neuron whose stderr is not a terminal is JSON lines only, whatever
writes to it (our events, Python warnings, transformers' logger, progress), and `--log-level` /
bittensor's `--logging.*` flags choose what appears. Real processes, stderr piped."""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from neurons import logs
from neurons.keys import local_keypair
from neurons.localchain import LocalChain
from test_metrics import scrape

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))


def json_lines(stderr: str) -> list[dict]:
    """Every line of `stderr` as a JSON object (the assertion names the first one that is not)."""
    out = []
    for line in stderr.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"stderr line is not JSON: {line!r}\n--- stderr ---\n{stderr[-3000:]}")
    return out


@pytest.fixture
def local_validator(tmp_path):
    chain = LocalChain(tmp_path / "chain.db")
    keys = tmp_path / "keys"
    chain.register(local_keypair("v-default", keys), local_keypair("cold", keys).ss58_address, stake=100.0)
    return ["validator", "--network", "localnet", "--chain.path", str(chain.path), "--wallet.path", str(keys),
            "--wallet.name", "v", "--min-free-gb", "0.01", "--poll-seconds", "0.2"]


def run_validator(argv: list[str], work: Path, scrape_metrics: bool = False) -> tuple[list[dict], dict | None]:
    """Start `quasar validator`, wait for its status server, scrape /metrics, SIGTERM it; (stderr
    lines parsed, metrics)."""
    p = subprocess.Popen([sys.executable, "-m", "neurons.cli", *argv, "--out", str(work)], env=ENV, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = None
    try:
        deadline = time.monotonic() + 60
        while not (work / "status.url").exists():
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "the validator never started its status server"
            time.sleep(0.1)
        time.sleep(0.5)  # a few polls of the chain
        if scrape_metrics:
            metrics = scrape((work / "status.url").read_text())
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        return json_lines(p.stderr.read()), metrics
    finally:
        if p.poll() is None:
            p.kill()


def test_validator_stderr_is_json_and_the_level_flags_choose_what_appears(tmp_path, local_validator):
    events, metrics = run_validator([*local_validator, "--logging.debug"], tmp_path / "debug", scrape_metrics=True)
    levels = {e["level"] for e in events}
    names = [e["event"] for e in events]
    assert "debug" in levels and "waiting for the next round" in names and "eval_timeout" in names, names
    # other libraries' debug lines need --logging.trace
    assert all(e.get("logger", "").split(".")[0] in ("", "neurons", "py") for e in events if e["level"] == "debug"), events
    # the real validator's /metrics: the state's families and its own durations, before any round
    assert metrics["quasar_validator_round"]["samples"] == {("quasar_validator_round", ()): 0}
    assert metrics["quasar_validator_round_in_progress"]["samples"] == {("quasar_validator_round_in_progress", ()): 0}
    assert metrics["quasar_validator_fetch_seconds"]["type"] == "histogram"
    assert metrics["quasar_validator_chain_errors"]["samples"] == {("quasar_validator_chain_errors_total", ()): 0}

    events, _ = run_validator([*local_validator, "--log-level", "warning"], tmp_path / "warning")
    assert all(e["level"] in ("warning", "error") for e in events), events



LIBRARIES = textwrap.dedent("""
    import logging, sys, warnings
    from neurons import logs
    logs.setup("test", sys.argv[1])
    warnings.warn("a python warning")
    from transformers.utils import logging as hf_logging
    hf_logging.get_logger("transformers.modeling_utils").warning("a transformers warning")
    hf_logging.get_logger("transformers.modeling_utils").info("a transformers info line")
    for bar in [hf_logging.tqdm(range(3), desc="transformers bar")]:
        list(bar)
    from quasar_model.progress import progress_bar
    for _ in progress_bar(range(3), desc="our work", enabled=True):
        pass
    logging.getLogger("neurons.example").debug("our debug line")
    logging.getLogger("urllib3.connectionpool").debug("a library's debug line")
""")


def test_warnings_transformers_and_progress_become_json_lines():
    p = subprocess.run([sys.executable, "-c", LIBRARIES, "info"], env=ENV, cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    lines = json_lines(p.stderr)
    events = {e["event"]: e for e in lines}
    assert any(e.get("logger") == "py.warnings" and "a python warning" in e["event"] for e in lines), lines
    assert events["a transformers warning"]["logger"] == "transformers.modeling_utils"
    # off a terminal: transformers' bars are off, ours report one `progress` event at the end
    assert events["progress"]["desc"] == "our work" and (events["progress"]["n"], events["progress"]["total"]) == (3, 3)
    assert "transformers bar" not in p.stderr
    assert {"a transformers info line", "our debug line", "a library's debug line"}.isdisjoint(events)


@pytest.fixture
def restored_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in logs.OURS}
    hooks = sys.meta_path[:]
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)
    sys.meta_path[:] = hooks


@pytest.mark.parametrize("level, shown", [("info", set()), ("debug", {"ours"}), ("trace", {"ours", "theirs"})])
def test_debug_lines_of_other_libraries_need_trace(restored_logging, level, shown):
    out = io.StringIO()
    logs.setup("test", level, stream=out)
    logging.getLogger("neurons.example").debug("ours")
    logging.getLogger("urllib3.connectionpool").debug("theirs")
    assert {e["event"] for e in json_lines(out.getvalue())} == shown
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        logs.setup("test", "loud", stream=out)
