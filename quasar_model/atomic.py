"""Atomic file writes: a reader sees the old file or the new one, never half of either.

In quasar_model because every package writes this way (distill, eval and neurons all import
quasar_model, and quasar_model imports none of them).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[Path], object]) -> Path:
    """Write `data` (text as UTF-8, bytes, or a function writing to the path it is given, such as
    `lambda p: torch.save(obj, p)`) to a hidden temporary file beside `path`, then rename it over
    `path`. The temporary name carries the pid, so concurrent writers (validators sharing a cache)
    never write into each other's file; the last rename wins. On failure the temporary file is
    removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            data(tmp)
        os.replace(tmp, path)  # atomic within one filesystem, and tmp sits beside path
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
