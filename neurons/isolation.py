"""One submission's evaluation in a child process: whatever the model does, the validator goes on.

A miner controls its model's compute, memory and outputs, and through them how an evaluation
ends: it can run for hours, allocate until the OOM killer picks a process, or produce non-finite
numbers. So the validator never loads a submission into its own process. It saves the round's
inputs once (`save_round_inputs`: documents, teacher outputs, recall items, probes), then for each
submission starts a fresh interpreter (`python -m neurons.isolation`, not a fork: a forked child of
a process that has used CUDA cannot use it) that

    dies with the validator (Linux parent-death signal: no orphan keeps a GPU busy after a kill),
    caps its own memory (address space on CPU, its share of the GPU on CUDA),
    builds the model with the validator's kernel backend, never the checkpoint's,
    checks that its logits on the round's fingerprint probes are finite (a model with finite but
    huge weights fails here, in a fraction of a second, instead of after a whole evaluation),
    scores it and writes the result as JSON, or the error that stopped it.

The parent waits at most `timeout` seconds and then kills the child's whole process group. Every
way an evaluation can end other than a finite result is an `EvaluationFailed` whose reason the
validator records as the submission's rejection (stage "evaluate").
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MAX_REASON = 300  # reasons end up on the status page; a miner's exception text is not a channel


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
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(inputs, tmp)
    os.replace(tmp, path)
    return path


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
                      limits: EvalLimits = EvalLimits(), stop=None, python: str = sys.executable) -> dict:
    """The submission's result dict (eval.results.SubmissionResult.to_dict), or EvaluationFailed;
    EvaluationStopped when `stop` (a threading.Event) is set first."""
    with tempfile.TemporaryDirectory(prefix="quasar-eval-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({
            "checkpoint": str(checkpoint), "inputs": str(inputs_path), "model_hash": model_hash, "device": device,
            "memory_bytes": limits.memory_bytes, "gpu_memory_fraction": limits.gpu_memory_fraction,
            "kernel_backend": limits.kernel_backend, "out": str(out)}))
        log_path = Path(tmp) / "child.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([python, "-m", "neurons.isolation", str(job)], stdout=log_file,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + limits.timeout
            try:
                while (code := proc.poll()) is None:
                    if stop is not None and stop.is_set():
                        raise EvaluationStopped()
                    if time.monotonic() > deadline:
                        raise EvaluationFailed(f"timed out: evaluation took longer than {limits.timeout:g} s")
                    time.sleep(0.1)
            except BaseException:  # timed out, or the validator is stopping: take the child down with it
                _kill_group(proc)
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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ----------------------------------------------------------------------------- the child

def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the line above took effect
            os._exit(1)


def _child(job: dict) -> dict:
    import resource

    import torch

    from eval.evaluate import load_student, score_model
    from eval.gates import logit_fingerprint

    inputs = torch.load(job["inputs"], weights_only=False)  # written by this validator (save_round_inputs)
    device = job["device"]
    if device.startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(job["gpu_memory_fraction"])
    elif job["memory_bytes"]:
        # CUDA reserves far more address space than it uses, so this cap is for CPU evaluation only
        resource.setrlimit(resource.RLIMIT_AS, (job["memory_bytes"], job["memory_bytes"]))
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


def main(argv: list[str]) -> int:
    _die_with_parent()
    job = json.loads(Path(argv[0]).read_text())
    out = Path(job["out"])
    try:
        report = {"result": _child(job)}
    except BaseException as e:  # noqa: BLE001 - every way the model can fail is the submission's failure
        report = {"error": _describe(e)}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
