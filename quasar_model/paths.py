"""Where the project keeps what it downloads, trains and captures (tiny teacher, teacher caches,
held-out data): $QUASAR_CACHE, else ~/.cache/quasar."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("QUASAR_CACHE", Path.home() / ".cache" / "quasar"))
