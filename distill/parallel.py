"""Scale-out under torchrun: process group, model wrapping, and full (rank-0) state dicts.

    torchrun --nproc_per_node N -m distill.cli distill CONFIG [--set key=value ...]

One process per device (gloo on CPU, nccl on CUDA). `wrap` picks the data-parallel scheme:
  ddp   every rank holds the whole model, gradients are all-reduced (right for small students);
  fsdp  FSDP2 `fully_shard`: each decoder layer and then the root are sharded over the ranks, so
        parameters, gradients and optimizer state are 1/N per rank (for students that do not fit).
Both average gradients over ranks; the trainer scales each rank's loss so that the average is the
gradient of the mean over all ranks' tokens, i.e. what one process with the whole batch computes.

Checkpoints are written as full (unsharded) state dicts gathered on rank 0 through
torch.distributed.checkpoint's state-dict helpers, whatever the scheme: a checkpoint from N ranks
resumes on M ranks, or on one, and the optimizer state is keyed by parameter name.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from quasar_model.devices import resolve_device

MODES = ("ddp", "fsdp")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, x) -> torch.Tensor:
        """Sum of a number or tensor over ranks (fp64 on CPU for counts and logged losses)."""
        t = torch.as_tensor(x).detach().to(torch.float64).clone()
        if self.distributed:
            # gloo reduces CPU tensors; nccl wants them on the device
            t = t.to(self.device) if self.device.type == "cuda" else t
            dist.all_reduce(t)
        return t.cpu()


def init_distributed(device: str = "auto") -> DistEnv:
    """A DistEnv for this process: from torchrun's environment when there is one, else single."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(resolve_device(device, local_rank))
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, env: DistEnv, mode: str, layers: list[nn.Module] | None = None) -> nn.Module:
    """The module to call for a data-parallel step (the module itself on one process).

    For fsdp, `layers` are sharded one by one first (each gathers its parameters only while it
    runs), then the root takes the rest (embeddings, final norm, LM head).
    """
    if mode not in MODES:
        raise ValueError(f"parallel: unknown mode {mode!r}; expected one of {MODES}")
    if not env.distributed:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        # no buffer broadcast: it would overwrite each rank's MoE load counts with rank 0's before
        # every forward; MoE.update_bias all-reduces those counts, which keeps the biases in step
        return DDP(module, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # FSDP2 cannot shard 0-d parameters (the hybrid gates alpha, branch_gain): they stay whole on
    # every rank and `sync_replicated_grads` averages their gradients by hand
    scalars = [p for p in module.parameters() if p.ndim == 0]
    for layer in layers or []:
        fully_shard(layer, mesh=mesh, ignored_params=set(scalars))
    fully_shard(module, mesh=mesh, ignored_params=set(scalars))
    module._replicated_params = scalars
    return module


def sync_replicated_grads(wrapped: nn.Module, env: DistEnv) -> None:
    """Average over ranks the gradients of parameters the data-parallel wrapper does not manage."""
    params = [p for p in getattr(wrapped, "_replicated_params", []) if p.grad is not None]
    if not params or not env.distributed:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])          # one collective for all of them
    dist.all_reduce(flat)
    flat /= env.world_size
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


def grad_sync(wrapped: nn.Module, sync: bool):
    """Context for one micro-step: skip the gradient all-reduce on all but the last of a step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(wrapped, DDP) and not sync:
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):       # FSDP2 module
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_state_dicts(wrapped: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, unsharded, on CPU, keyed by parameter name; complete on rank 0
    (other ranks may get empty dicts). Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    model_sd, optim_sd = get_state_dict(wrapped, optimizer, options=opts)
    return model_sd, optim_sd


def full_model_state_dict(wrapped: nn.Module) -> dict:
    """The model part of full_state_dicts (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=dist.is_initialized()))


def load_full_state_dicts(wrapped: nn.Module, optimizer, model_sd: dict, optim_sd: dict | None) -> None:
    """Inverse of full_state_dicts, on every rank (each passes the full dicts; shards are cut locally)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(wrapped, model_sd, options=opts)
    if optim_sd is not None:
        set_optimizer_state_dict(wrapped, optimizer, optim_sd, options=opts)


def clip_grad_norm(params, max_norm: float) -> float:
    """Global L2 grad norm over every rank's shards; grads scaled by min(1, max_norm / norm) when max_norm > 0.

    Sharded (DTensor) and plain gradients are normed separately and combined, since FSDP2 leaves
    some parameters unsharded and one foreach kernel cannot take both kinds.
    """
    from torch.nn.utils import get_total_norm

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    plain = [g for g in grads if not hasattr(g, "full_tensor")]
    sq = torch.zeros((), dtype=torch.float64)
    if sharded:
        sq += get_total_norm(sharded).full_tensor().double().cpu() ** 2
    if plain:
        sq += get_total_norm(plain).double().cpu() ** 2
    norm = float(sq.sqrt())
    coef = max_norm / (norm + 1e-6)
    if max_norm > 0 and coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm
