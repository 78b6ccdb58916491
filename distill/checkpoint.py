"""Training checkpoints: output_dir/checkpoints/step-XXXXXXXX, and resuming from one.

Each is written to a temporary directory and renamed, so a killed run never leaves half of one;
`latest` names the newest. A checkpoint holds everything that moves: the student's weights
(model.safetensors, MoE balancing buffers included), optimizer.pt, trainer_state.pt (scheduler
state, step, tokens seen, the data loader's position), trainer_state.json (step, position and the
run's config, read by the resume check and by people) and every rank's RNG states
(rng_rank{N}.pt). Resuming from one continues the exact same run: the loss curve of an interrupted
run equals the uninterrupted one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from quasar_model.atomic import write_atomic

from . import parallel
from .kd_student import engine_state_dict, student_state_dict

# a checkpoint only continues the run it came from: these settings must not change on resume
RESUME_MUST_MATCH = ("student", "data.train_cache", "data.seq_len", "data.batch_size", "data.grad_accum",
                     "optim", "loss", "teacher", "recall", "steps", "seed")


def save_checkpoint(root: Path, *, step: int, tokens_seen: int, model, optimizer, scheduler, loader, cfg,
                    env: parallel.DistEnv) -> Path:
    """Write root/step-XXXXXXXX atomically (temp dir + rename), point `latest` at it, keep the newest
    cfg.keep_checkpoints. model is the (wrapped) KDStudent. Collective: every rank calls it."""
    from safetensors.torch import save_file

    model_sd, optim_sd = parallel.full_state_dicts(model, optimizer)   # collective
    name = f"step-{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    torch.save(rng_state(), tmp / f"rng_rank{env.rank}.pt")
    # every rank's file is written before rank 0 renames the directory: without this a slow
    # rank wrote into a .tmp- directory that had just become step-N (seen under load in CI)
    env.barrier()
    if env.is_main:
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in student_state_dict(model_sd).items()}
        save_file(weights, str(tmp / "model.safetensors"))
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(), "step": step, "tokens_seen": tokens_seen,
                    "data": loader.state_dict(), "world_size": env.world_size}, tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "data": loader.state_dict(), "world_size": env.world_size,
             "config": cfg.to_dict()}, indent=1))
        if final.exists():     # the same step again (after a resume): replace it
            old = root / f".old-{name}"
            os.rename(final, old)
            shutil.rmtree(old)
        os.rename(tmp, final)
        write_atomic(root / "latest", name)
        steps = sorted(p for p in root.glob("step-*") if p.is_dir())
        for p in steps[: max(0, len(steps) - cfg.keep_checkpoints)]:
            shutil.rmtree(p, ignore_errors=True)
    env.barrier()
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one, else None."""
    pointer = root / "latest"
    if pointer.exists():
        p = root / pointer.read_text().strip()
        if (p / "trainer_state.pt").exists():
            return p
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.pt").exists())
    return done[-1] if done else None


def check_resumable(ckpt: Path, cfg) -> None:
    """ValueError naming the first setting in RESUME_MUST_MATCH where cfg differs from the checkpoint's run."""
    saved = json.loads((ckpt / "trainer_state.json").read_text())["config"]
    # a checkpoint from before a config section existed ran with that section's defaults
    saved, now = _flat(_with_defaults(saved)), _flat(cfg.to_dict())
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a != b and any(key == m or key.startswith(m + ".") for m in RESUME_MUST_MATCH):
            raise ValueError(f"checkpoint {str(ckpt)!r} was trained with {key}={a!r}, the config now says "
                             f"{b!r}: resuming would not continue that run (use a new output_dir, or "
                             "resume=false to start over)")


def load_checkpoint(ckpt: Path, *, model, optimizer, scheduler, loader, env: parallel.DistEnv) -> tuple[int, int]:
    """Restore weights, optimizer, scheduler, data position and this rank's RNG; returns (step, tokens_seen)."""
    from safetensors.torch import load_file

    model_sd = engine_state_dict(load_file(str(ckpt / "model.safetensors")))
    optim_sd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    parallel.load_full_state_dicts(model, optimizer, model_sd, optim_sd)
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["data"])
    rng_file = ckpt / f"rng_rank{env.rank}.pt"
    if rng_file.exists():       # a different number of ranks keeps this rank's fresh RNG
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return int(state["step"]), int(state["tokens_seen"])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _with_defaults(saved: dict) -> dict:
    from .config import DistillConfig, _build

    try:
        return _build(DistillConfig, saved).to_dict()
    except (ValueError, TypeError):
        return saved        # a config this version cannot read: compare it as it is


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested dict -> {dotted.key: leaf value} (tuples and lists count as leaves)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out
