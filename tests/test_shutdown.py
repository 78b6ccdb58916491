"""Stopping within seconds (issue 12, item 4).

neurons.shutdown in a process of its own: the first signal sets the stop event (and raises
`Interrupted` in abandonable work), a second one exits at once with status 128 + signal. And a real
`quasar miner` (slow): SIGTERM mid-training exits within 10 s with a checkpoint at the step it
reached, and the next start resumes at exactly that step.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_metrics import scrape

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))

SCRIPT = textwrap.dedent("""
    import sys, threading, time
    from neurons import logs
    from neurons.shutdown import Interrupted, stop_on_signals

    log = logs.setup("test")
    stop, abandonable = threading.Event(), threading.Event()
    stop_on_signals(stop, log, abandonable=abandonable)
    if sys.argv[1] == "abandonable":
        abandonable.set()
        try:
            print("ready", flush=True)
            time.sleep(60)
        except Interrupted as e:
            print(f"abandoned on {e}", flush=True)
            sys.exit(0)
    else:  # stuck: work that never looks at the stop event
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
""")


def start(mode: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV, cwd=REPO)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_a_second_signal_exits_at_once():
    p = start("stuck")
    p.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert p.poll() is None  # the first asks; stuck work goes on
    t0 = time.perf_counter()
    p.send_signal(signal.SIGINT)
    rc = p.wait(10)
    assert rc == 128 + signal.SIGINT and time.perf_counter() - t0 < 3
    events = [json.loads(line)["event"] for line in p.stderr.read().splitlines()]
    assert events == ["shutdown requested", "second signal: exiting now"]


def test_the_first_signal_abandons_abandonable_work():
    p = start("abandonable")
    t0 = time.perf_counter()
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0 and time.perf_counter() - t0 < 3
    assert p.stdout.read().strip() == "abandoned on SIGTERM"


# ---- the miner -------------------------------------------------------------------------------

def _metrics(work: Path) -> list[dict]:
    path = work / "train" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_until(cmd: list[str], work: Path, past_step: int, timeout: float = 240,
               before_signal=None) -> tuple[int, float, str, int]:
    """Start the miner, SIGTERM it once its metrics show a step past `past_step` (after calling
    `before_signal()`); (rc, seconds from the signal to its exit, stderr, the step it had logged)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        while True:
            steps = [r["step"] for r in _metrics(work) if "loss" in r]
            if steps and steps[-1] > past_step:
                break
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "the miner never trained"
            time.sleep(0.2)
        if before_signal is not None:
            before_signal()
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(30)
        return rc, time.monotonic() - t0, p.stderr.read(), steps[-1]
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.slow
def test_sigterm_stops_the_miner_within_seconds_and_it_resumes_at_that_step(tmp_path):
    from neurons.keys import local_keypair
    from neurons.localchain import LocalChain

    train_cache = _train_cache()
    chain = LocalChain(tmp_path / "chain.db")
    keys = tmp_path / "keys"
    chain.register(local_keypair("m-default", keys), local_keypair("cold", keys).ss58_address)
    work = tmp_path / "m"
    cmd = [sys.executable, "-m", "neurons.cli", "miner", "--network", "localnet", "--chain.path", str(chain.path),
           "--wallet.path", str(keys), "--wallet.name", "m", "--out", str(work), "--min-free-gb", "0.01",
           "--config", str(REPO / "configs" / "distill_localnet.json"), "--set", f"data.train_cache={train_cache}",
           "--set", "data.heldout_cache=none", "--set", "log_every=1", "--set", "steps=100000",
           "--steps-per-cycle", "50000", "--storage", "local", "--storage-root", str(tmp_path / "storage"),
           "--exit-after-training", "--quiet", "--metrics-port", str(_free_port())]
    scraped = []
    rc, took, err, logged = _run_until(cmd, work, past_step=3,
                                       before_signal=lambda: scraped.append(scrape(f"http://127.0.0.1:{cmd[-1]}")))
    assert rc == 0 and took < 10, (rc, took, err[-2000:])
    events = [json.loads(line) for line in err.splitlines()]  # stderr piped: JSON lines only
    # /metrics while it trained: the step it had reached (at least the logged one) and its loss
    step_seen = scraped[0]["quasar_miner_step"]["samples"][("quasar_miner_step", ())]
    assert step_seen >= logged and scraped[0]["quasar_miner_loss"]["samples"][("quasar_miner_loss", ())] > 0
    stopped = [e for e in events if e["event"] == "stopped training"]
    assert len(stopped) == 1 and "Traceback" not in err
    step = stopped[0]["step"]
    assert step >= logged
    print(f"miner exited {took:.2f} s after SIGTERM, checkpoint at step {step}")
    latest = (work / "train" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{step:08d}"
    assert not (work / "exports").exists() or not any((work / "exports").iterdir())  # no self-evaluation started
    # the next start continues from that very step: the metrics go on without a gap or a repeat
    rc, took, err, _ = _run_until(cmd, work, past_step=step + 2)
    assert rc == 0 and took < 10, (rc, took, err[-2000:])
    print(f"resumed miner exited {took:.2f} s after SIGTERM")
    steps = [r["step"] for r in _metrics(work) if "loss" in r]
    assert steps == list(range(1, steps[-1] + 1)), steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cache() -> Path:
    """The tiny teacher's cache of the local corpus, as tests/test_distill_train.py builds it (shared)."""
    from distill.cli import teacher_cache_main
    from quasar_model.paths import cache_root

    return teacher_cache_main("tiny-teacher", "corpus:train", cache_root() / "test-teacher-caches" / "train",
                              k=16, seq_len=128, batch_size=64, progress=False)


# ---- localnet's children ---------------------------------------------------------------------

PARENT = textwrap.dedent("""
    import signal, subprocess, sys, time
    from neurons.shutdown import die_with_parent

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                             preexec_fn=die_with_parent(signal.SIGTERM))
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) is gone for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_a_sigkilled_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()  # SIGKILL: no handler, no finally
    parent.wait(10)
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_localnet_spawns_its_neurons_to_die_with_it(tmp_path, monkeypatch):
    import neurons.localnet as localnet

    seen = {}
    monkeypatch.setattr(localnet.subprocess, "Popen", lambda argv, **kw: seen.update(kw) or "proc")
    assert localnet._spawn("miner-x", ["miner"], tmp_path, {}) == "proc"
    assert seen["start_new_session"] and seen["preexec_fn"].__qualname__.startswith("die_with_parent")


def test_a_self_evaluation_a_signal_abandons_is_redone_on_the_next_start(tmp_path, monkeypatch):
    from eval.competition import load_competition
    from neurons.miner import Miner, MinerSettings
    from neurons.shutdown import Interrupted

    class Trainer:
        step = 50

        def export(self, path: Path) -> Path:
            path.mkdir(parents=True)
            return path

    def interrupted(self, export):
        raise Interrupted("SIGTERM")

    m = Miner(None, None, load_competition("localnet"), MinerSettings(work_dir=tmp_path / "m"))
    monkeypatch.setattr(Miner, "self_score", interrupted)
    assert m._score_and_publish(Trainer()) is False
    assert not (tmp_path / "m" / "exports" / "step-0000050").exists() and "scored_step" not in m.state
    assert not m._abandonable.is_set()
    published = []
    monkeypatch.setattr(Miner, "self_score", lambda self, export: 0.25)
    monkeypatch.setattr(Miner, "publish", lambda self, export, score: published.append(score) or True)
    assert m._score_and_publish(Trainer()) is True
    assert published == [0.25] and m.state["scored_step"] == 50
