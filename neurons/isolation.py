"""One submission's evaluation in a child process: whatever the model does, the validator goes on.

A miner controls its model's compute, memory and outputs, and through them how an evaluation
ends: it can run for hours, allocate until the OOM killer picks a process, or produce non-finite
numbers. So the validator never loads a submission into its own process. It saves the round's
inputs once (`save_round_inputs`: documents, teacher outputs, recall items, probes), then for each
submission starts a child that

    dies with the validator (no orphan keeps a GPU busy after a kill: see _watch_validator),
    caps its own memory (address space on CPU, its share of the GPU on CUDA),
    builds the model with the validator's kernel backend, never the checkpoint's,
    checks that its logits on the round's fingerprint probes are finite (a model with finite but
    huge weights fails here, in a fraction of a second, instead of after a whole evaluation),
    scores it and writes the result as JSON, or the error that stopped it.

Where the child comes from depends on the device. On CUDA it is a fresh interpreter
(`python -m neurons.isolation`): a forked child of a process that has initialised CUDA cannot use
it, and importing the kernel libraries can initialise it. On CPU it is forked from a zygote, a
clean interpreter started once (multiprocessing's forkserver, never the validator itself, so no
state of the validator or of an earlier submission leaks in) that has already imported torch,
transformers and the evaluation code: each evaluation then skips seconds of imports
(benchmarks/bench_isolation.py measures both). The zygote dies with the validator, and its
children with it.

The parent waits at most `timeout` seconds and then kills the child's whole process group. Every
way an evaluation can end other than a finite result is an `EvaluationFailed` whose reason the
validator records as the submission's rejection (stage "evaluate").
"""
from __future__ import annotations

import ctypes
import json
import math
import multiprocessing
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing import forkserver
from pathlib import Path

from quasar_model.atomic import write_atomic

MAX_REASON = 300  # reasons end up on the status page; a miner's exception text is not a channel
PROCESS_NAME = b"quasar-eval"  # the child's /proc/PID/comm: how operators (and tests) find it
# what the zygote imports once; none of it touches CUDA or runs a parallel op (fork-safe)
ZYGOTE_PRELOAD = ["torch", "transformers", "quasar_model.modeling_quasar_long", "eval.evaluate", "eval.gates",
                  "neurons.isolation"]


class EvaluationStopped(Exception):
    """The validator is stopping (SIGTERM): the evaluation was cut short through no fault of the model."""


class EvaluationFailed(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason[:MAX_REASON]


@dataclass(frozen=True)
class EvalLimits:
    timeout: float = 3600.0             # wall-clock seconds for one submission (load + score)
    memory_bytes: int | None = None     # CPU: address-space cap of the child; None = no cap
    gpu_memory_fraction: float = 0.9    # CUDA: the child's share of the device
    kernel_backend: str = "auto"        # the validator's choice; "auto": Triton on CUDA, PyTorch on CPU


def save_round_inputs(inputs, path: Path) -> Path:
    """Write the round's inputs (eval.evaluate.RoundInputs) for the children, atomically."""
    import torch  # here, as everywhere in this module: the validator process must not load torch for us

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: torch.save(inputs, tmp))


def first_non_finite(value, where: str = "result") -> str | None:
    """The path of the first NaN/Inf number in a JSON-like result, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, sub in items:
        found = first_non_finite(sub, f"{where}.{key}")
        if found:
            return found
    return None


def evaluate_isolated(checkpoint: Path, inputs_path: Path, model_hash: str, *, device: str = "cpu",
                      limits: EvalLimits = EvalLimits(), stop=None, fresh: bool | None = None) -> dict:
    """The submission's result dict (eval.results.SubmissionResult.to_dict), or EvaluationFailed;
    EvaluationStopped when `stop` (a threading.Event) is set first. `fresh`: a fresh interpreter
    (True) or a fork of the zygote (False); by default `forks_from_zygote(device)` decides."""
    if fresh is None:
        fresh = not forks_from_zygote(device)
    with tempfile.TemporaryDirectory(prefix="quasar-eval-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({
            "checkpoint": str(checkpoint), "inputs": str(inputs_path), "model_hash": model_hash, "device": device,
            "memory_bytes": limits.memory_bytes, "gpu_memory_fraction": limits.gpu_memory_fraction,
            "kernel_backend": limits.kernel_backend, "out": str(out)}))
        child = (_FreshChild if fresh else _ZygoteChild)(job, Path(tmp) / "child.log")
        deadline = time.monotonic() + limits.timeout
        try:
            while (code := child.poll()) is None:
                if stop is not None and stop.is_set():
                    raise EvaluationStopped()
                if time.monotonic() > deadline:
                    raise EvaluationFailed(f"timed out: evaluation took longer than {limits.timeout:g} s")
                time.sleep(0.05)
        except BaseException:  # timed out, or the validator is stopping: take the child down with it
            child.kill()
            raise
        report = json.loads(out.read_text()) if out.exists() else None
    if report is not None and "error" in report:
        raise EvaluationFailed(report["error"])
    if code != 0 or report is None:
        if code < 0:
            why = "out of memory?" if -code == signal.SIGKILL else "crashed"
            raise EvaluationFailed(f"the evaluation process was killed by signal {-code} ({why})")
        raise EvaluationFailed(f"the evaluation process exited with status {code} and no result")
    result = report["result"]
    bad = first_non_finite(result)
    if bad:
        raise EvaluationFailed(f"non-finite output: {bad} is NaN or infinite")
    return result


def forks_from_zygote(device: str) -> bool:
    """CPU evaluations fork from the zygote; CUDA ones need a fresh interpreter (module docstring)."""
    return not device.startswith("cuda")


class _FreshChild:
    """`python -m neurons.isolation JOB` in a session of its own."""

    def __init__(self, job: Path, log: Path):
        with open(log, "wb") as log_file:
            self.proc = subprocess.Popen([sys.executable, "-m", "neurons.isolation", str(job)], stdout=log_file,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        _kill_group(self.proc.pid)
        self.proc.wait()


_zygote_context = None


def _zygote():
    global _zygote_context
    if _zygote_context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(ZYGOTE_PRELOAD)
        _zygote_context = ctx
    return _zygote_context


def start_zygote() -> None:
    """Start the zygote now, if it is not running: its imports then overlap with whatever the
    validator does before its first evaluation (fetching), instead of delaying that evaluation."""
    _zygote()
    forkserver.ensure_running()


class _ZygoteChild:
    """A fork of the zygote running `_forked_main(JOB, LOG, VALIDATOR_PID)` (which starts a session of its own)."""

    def __init__(self, job: Path, log: Path):
        self.proc = _zygote().Process(target=_forked_main, args=(str(job), str(log), os.getpid()), name="quasar-eval")
        self.proc.start()

    def poll(self) -> int | None:
        return self.proc.exitcode

    def kill(self) -> None:
        _kill_group(self.proc.pid)
        self.proc.join()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # not yet in a session of its own (a forked child's first instant)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- the child

def _die_with_parent() -> None:
    """The parent: the validator for a fresh child, the zygote (which dies with the validator) for a fork."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the line above took effect
            os._exit(1)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(PROCESS_NAME))


def _child(job: dict) -> dict:
    import torch  # the child's imports: preloaded in the zygote (ZYGOTE_PRELOAD), fresh in a CUDA child

    from eval.evaluate import load_student, score_model
    from eval.gates import logit_fingerprint

    inputs = torch.load(job["inputs"], weights_only=False)  # written by this validator (save_round_inputs)
    device = job["device"]
    if device.startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(job["gpu_memory_fraction"])
    elif job["memory_bytes"]:
        # CUDA reserves far more address space than it uses, so this cap is for CPU evaluation only
        # the soft limit only: the child's own error path lifts it to write the report (no code of
        # the miner's runs here, only its weights and config through our library)
        resource.setrlimit(resource.RLIMIT_AS, (job["memory_bytes"], resource.getrlimit(resource.RLIMIT_AS)[1]))
    model = load_student(job["checkpoint"], inputs.competition, device, kernel_backend=job["kernel_backend"])
    with torch.no_grad():
        # the fingerprint probes first (a fraction of a second): a model whose logits overflow
        # (finite but huge weights) fails here, not after a whole evaluation
        if not torch.isfinite(logit_fingerprint(model, inputs.probes, inputs.fp_ids)).all():
            raise NonFiniteOutput("non-finite output: the logit fingerprint is NaN or infinite")
        return score_model(model, inputs, model_hash=job["model_hash"], device=device).to_dict()


class NonFiniteOutput(Exception):
    """The model's outputs are NaN or infinite (the message says where)."""


def _describe(e: BaseException) -> str:
    if isinstance(e, NonFiniteOutput):
        return str(e)
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text:
        return f"out of memory ({text[:200]})"
    return text


def _lift_memory_cap() -> None:
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def main(argv: list[str]) -> int:
    _die_with_parent()
    job = json.loads(Path(argv[0]).read_text())
    out = Path(job["out"])
    try:
        report = {"result": _child(job)}
    except BaseException as e:  # noqa: BLE001 - every way the model can fail is the submission's failure
        _lift_memory_cap()  # a model over its cap must still get its reason written
        report = {"error": _describe(e)}
    write_atomic(out, json.dumps(report))
    return 0


def _watch_validator(pid: int) -> None:
    """A fork's parent is the zygote, which lives on while any fork holds its liveness pipe (each
    does): so a fork watches the validator itself and exits the moment it is gone."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)

    def watch():
        select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-validator").start()


def _forked_main(job: str, log: str, validator_pid: int) -> None:
    os.setsid()  # a process group of its own: a timeout kills it and anything it started
    _watch_validator(validator_pid)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.exit(main([job]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
