"""Red team, issue 11 items 1b and 6 and the isolation rule: a submission's behaviour when it is
evaluated (non-finite outputs, run time, memory, killing the validator) is that submission's
recorded rejection, never a crash of the round; the validator, not the checkpoint, picks the
kernel backend. Real pieces throughout: the local chain, local storage, the validator, and the
evaluation child process (neurons.isolation)."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from neurons import adversaries
from neurons.isolation import EvalLimits, EvaluationFailed, evaluate_isolated, first_non_finite, save_round_inputs
from neurons.state import ValidatorState
from test_redteam_fetch import Net, rejection
from test_validator import _validator_cmd, plant, student


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {name: student(d / name, seed) for name, seed in [("honest", 1), ("other", 2)]}


def huge_weights(src: Path, dst: Path) -> Path:
    """Finite but enormous: an lm_head of +-3e38 passes every weight check, and its logits overflow
    (localnet's crasher publishes the same)."""
    return adversaries.crash(src, dst)


def with_config(src: Path, dst: Path, **fields) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("manifest.json"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(fields)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a live process, None once it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    state, ppid = text[text.rindex(")") + 2:].split()[:2]
    return None if state in "ZX" else (comm, state, int(ppid))


def isolation_children(parent: int | None = None) -> set[int]:
    """Pids of running evaluation children (named quasar-eval; descendants of `parent` only, when
    given: a CPU child's parent is the zygote, itself a child of the validator; other processes on
    the machine may run evaluations of their own)."""
    procs = {int(d): st for d in os.listdir("/proc") if d.isdigit() and (st := _stat(int(d)))}

    def descends(pid: int) -> bool:
        for _ in range(64):
            if pid == parent:
                return True
            if pid not in procs:
                return False
            pid = procs[pid][2]
        return False

    return {pid for pid, (comm, _, _) in procs.items() if comm == "quasar-eval" and (parent is None or descends(pid))}


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if (st := _stat(pid)) and st[0] == "quasar-eval"}


@pytest.mark.slow
def test_1b_huge_finite_weights_are_rejected_at_evaluate_and_the_round_goes_on(tmp_path, models):
    net = Net(tmp_path)
    honest = net.commit("honest", plant(net.hotkey("honest"), net.storage, models["honest"], "honest/ckpt"))
    attacker = net.commit("huge", plant(net.hotkey("huge"), net.storage, huge_weights(models["other"], tmp_path / "huge"), "huge/ckpt"))
    # the checkpoint asks for Triton kernels, which cannot run here: the validator's choice wins
    triton = net.commit("triton", plant(net.hotkey("triton"), net.storage, with_config(models["other"], tmp_path / "tri",
                                                                  kernel_backend="triton"), "tri/ckpt"))
    net.chain.advance(25)
    work = tmp_path / "v"
    assert net.validator_for(work).run(max_rounds=1) == 1
    state = ValidatorState(work / "validator.db")
    r = rejection(state, attacker)
    assert r.stage == "evaluate" and "non-finite" in r.reason, r.reason
    scored = {s["hotkey"]: s for s in state.scores(state.last_round().id)}
    assert attacker not in scored and triton in scored and honest in scored
    assert net.weight(attacker) == 0.0 and net.weight(honest) + net.weight(triton) == pytest.approx(1.0)
    # the next round (a restarted validator) neither retries the rejection nor crashes on it
    net.chain.advance(10)
    assert net.validator_for(work).run(max_rounds=1) == 1
    assert rejection(ValidatorState(work / "validator.db"), attacker).reason == r.reason


@pytest.fixture(scope="module")
def round_inputs(tmp_path_factory):
    from eval.evaluate import prepare_round

    net = Net(tmp_path_factory.mktemp("inputs"))
    return save_round_inputs(prepare_round(net.competition, 7), tmp_path_factory.mktemp("round") / "inputs.pt")


def test_an_evaluation_past_its_time_limit_is_killed_with_its_process_group(round_inputs, models):
    t0 = time.monotonic()
    with pytest.raises(EvaluationFailed, match="timed out: evaluation took longer than 1 s"):
        evaluate_isolated(models["honest"], round_inputs, "h" * 64, limits=EvalLimits(timeout=1.0))
    assert time.monotonic() - t0 < 10
    assert isolation_children(parent=os.getpid()) == set()  # killed and reaped, not left running


def test_an_evaluation_over_its_memory_cap_is_a_failure_not_a_crash(round_inputs, models):
    # 64 MiB of address space: far below what loading any model takes
    with pytest.raises(EvaluationFailed, match="out of memory"):
        evaluate_isolated(models["honest"], round_inputs, "h" * 64, limits=EvalLimits(memory_bytes=64 << 20))


def test_the_child_result_equals_the_in_process_evaluation(round_inputs, models):
    from eval.evaluate import load_student, score_model

    inputs = torch.load(round_inputs, weights_only=False)
    here = score_model(load_student(models["honest"], inputs.competition), inputs, model_hash="h" * 64).to_dict()
    forked = evaluate_isolated(models["honest"], round_inputs, "h" * 64)  # CPU: a fork of the zygote
    assert forked == json.loads(json.dumps(here))
    # the fresh interpreter CUDA validators use: same result
    assert evaluate_isolated(models["honest"], round_inputs, "h" * 64, fresh=True) == forked


def test_a_model_with_overflowing_logits_fails_before_the_whole_evaluation(tmp_path, round_inputs, models):
    # an honest model passes the check: test_the_child_result_equals_the_in_process_evaluation
    t0 = time.monotonic()
    with pytest.raises(EvaluationFailed, match="^non-finite output: the logit fingerprint is NaN or infinite$"):
        evaluate_isolated(huge_weights(models["other"], tmp_path / "huge"), round_inputs, "x" * 64)
    print(f"\nthe overflowing model's evaluation: {time.monotonic() - t0:.1f} s")


def test_non_finite_values_are_found_anywhere_in_a_result():
    assert first_non_finite({"items": [{"value": 1.0}, {"value": 2.0}], "fingerprint": [0.5]}) is None
    assert first_non_finite({"items": [{"value": 1.0}, {"value": float("nan")}]}) == "result.items.1.value"
    assert first_non_finite({"fingerprint": [0.0, float("-inf")]}) == "result.fingerprint.1"


@pytest.mark.slow
def test_a_submission_whose_evaluation_kills_the_validator_twice_is_rejected(tmp_path, models):
    net = Net(tmp_path)
    honest = net.commit("honest", plant(net.hotkey("honest"), net.storage, models["honest"], "honest/ckpt"))
    attacker = net.commit("killer", plant(net.hotkey("killer"), net.storage, models["other"], "killer/ckpt"))
    net.chain.advance(25)
    work = tmp_path / "v"
    db = work / "validator.db"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for kill in range(2):
        p = subprocess.Popen(_validator_cmd(net, work), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        children: set[int] = set()
        while time.monotonic() < deadline and p.poll() is None:  # kill it while the attacker is evaluated
            if db.exists():
                state = ValidatorState(db)
                sub = next((s for s in state.submissions("accepted") if s.hotkey == attacker), None)
                if sub is not None:
                    row = state._conn().execute("SELECT attempts FROM eval_attempts WHERE model_hash = ?",
                                                (sub.model_hash,)).fetchone()
                    children = isolation_children(parent=p.pid)
                    if row and row[0] == kill + 1 and children:
                        break
            time.sleep(0.05)
        assert p.poll() is None, "the validator finished before the attacker's evaluation could be cut short"
        assert children, "no evaluation child of the validator was seen running"
        p.send_signal(signal.SIGKILL)
        p.wait()
        for _ in range(100):  # the child dies with its parent (parent-death signal), no orphan
            if not alive(children):
                break
            time.sleep(0.05)
        assert alive(children) == set()
    p = subprocess.run(_validator_cmd(net, work), env=env, capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    state = ValidatorState(db)
    r = rejection(state, attacker)
    assert r.stage == "evaluate" and "died during its evaluation 2 times" in r.reason
    assert [s["hotkey"] for s in state.scores(state.last_round().id)] == [honest]
    assert net.weight(honest) == 1.0 and net.weight(attacker) == 0.0


def test_a_failure_preparing_the_round_is_the_validators_not_the_submissions(tmp_path, models, monkeypatch):
    """The teacher or the data failing to load stops the phase; it rejects nobody (the round is
    retried on the next start), unlike a submission whose own evaluation fails."""
    import eval.evaluate

    net = Net(tmp_path)
    honest = net.commit("honest", plant(net.hotkey("honest"), net.storage, models["honest"], "honest/ckpt"))
    net.chain.advance(25)

    def teacher_down(*args, **kwargs):
        raise OSError("the teacher could not be loaded")

    monkeypatch.setattr(eval.evaluate, "prepare_round", teacher_down)
    v = net.validator_for(tmp_path / "v")
    with pytest.raises(OSError, match="teacher could not be loaded"):
        v.run(max_rounds=1)
    state = ValidatorState(tmp_path / "v" / "validator.db")
    assert state.submissions("rejected") == [] and [s.hotkey for s in state.submissions("accepted")] == [honest]
    assert state.unfinished_round().phase == "evaluate"
    monkeypatch.undo()
    assert net.validator_for(tmp_path / "v").run(max_rounds=1) == 1   # the next start finishes the round
    assert net.weight(honest) == 1.0
