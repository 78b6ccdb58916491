"""`--device` and a config's `device`: one spelling for every command, resolved by one function.

    auto      cuda when this machine has a CUDA device, else cpu (every command's default)
    cpu
    cuda      this process's GPU: LOCAL_RANK's under torchrun, else cuda:0
    cuda:N    GPU N, which must exist

A device this machine lacks is a ValueError naming it, raised before anything is loaded, so the
command line turns it into one `error:` line (exit status 2).
"""
from __future__ import annotations

import os
import re

AUTO = "auto"
HELP = "auto (cuda when available, else cpu) | cpu | cuda | cuda:N"
_SPELLING = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_spelling(name) -> None:
    """ValueError unless `name` is one of the spellings above (no torch: a config check uses it)."""
    if not isinstance(name, str) or not _SPELLING.fullmatch(name):
        raise ValueError(f"device {str(name)[:40]!r}: expected auto, cpu, cuda or cuda:N")


def resolve_device(name: str = AUTO, local_rank: int | None = None) -> str:
    """'cpu' or 'cuda:N' for a device spelling, checked against this machine.

    local_rank: the GPU that plain "cuda" means (default: $LOCAL_RANK, set by torchrun, else 0).
    """
    check_spelling(name)
    if name == "cpu":
        return "cpu"  # answered without torch
    import torch  # here: only a CUDA question needs it, and `--device cpu` should not pay for it

    if not torch.cuda.is_available():
        if name == AUTO:
            return "cpu"
        raise ValueError(f"device {name!r}: CUDA is not available on this machine (use auto or cpu)")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    index = int(name.partition(":")[2]) if ":" in name else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return f"cuda:{index}"
