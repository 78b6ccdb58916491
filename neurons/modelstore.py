"""The validator's checkpoints on disk: one directory per model hash, shared by every hotkey.

    <root>/<model_hash>/          an accepted checkpoint (manifest.json and its files)
    <root>/.staging-<uuid>/       a fetch in progress; renamed to its hash once accepted

Why content-addressed: a directory named from anything a miner chooses (hotkey, commitment
string) can be cleared or overwritten by that miner's next commitment. Here a commitment only
ever writes a new staging directory; an accepted hash's directory is never rewritten, only
evicted when no round needs it any more (`evict`). Two hotkeys committing the same weights
share one copy.

A directory is trusted only after `present` has hashed every file against its manifest (once per
process), so a file changed or truncated on disk is noticed before anything reads it.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from .manifest import SubmissionRejected, read_manifest, verify_manifest

log = logging.getLogger(__name__)

_HASH = re.compile(r"[0-9a-f]{64}")
STAGING_PREFIX = ".staging-"


class ModelStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._verified: set[str] = set()

    def path(self, model_hash: str) -> Path:
        if not _HASH.fullmatch(model_hash):
            raise ValueError(f"{model_hash!r} is not a 64-character lowercase hex model hash")
        return self.root / model_hash

    def hashes(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if _HASH.fullmatch(p.name) and p.is_dir())

    def staging(self) -> Path:
        """A fresh, absent path for a fetch to create and fill."""
        return self.root / f"{STAGING_PREFIX}{uuid.uuid4().hex}"

    def clean_staging(self) -> None:
        """Remove what fetches killed mid-way left behind (none run when this is called)."""
        for p in self.root.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)

    def present(self, model_hash: str) -> Path | None:
        """The directory of `model_hash` if every file matches its manifest; a damaged one is removed."""
        path = self.path(model_hash)
        if model_hash in self._verified and path.is_dir():
            return path
        if not path.is_dir():
            return None
        try:
            manifest = read_manifest(path)
            if manifest.model_hash != model_hash:
                raise SubmissionRejected(f"manifest names {manifest.model_hash[:16]}")
            verify_manifest(path, manifest)
        except SubmissionRejected as e:
            log.warning("stored checkpoint %s is damaged (%s): removed, fetched again when needed",
                        model_hash[:16], e.reason)
            shutil.rmtree(path, ignore_errors=True)
            return None
        self._verified.add(model_hash)
        return path

    def put(self, staging: Path, model_hash: str) -> Path:
        """Move a checked staging directory into place. If the hash arrived meanwhile (another
        hotkey's fetch of the same weights), the copy already there is kept and this one dropped."""
        target = self.path(model_hash)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)
        self._verified.add(model_hash)
        return target

    def size(self, model_hash: str) -> int:
        path = self.path(model_hash)
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0

    def evict(self, keep: set[str], budget_bytes: int | None) -> list[str]:
        """Remove directories whose hash is not in `keep`, least recently stored first, until the
        store fits `budget_bytes` (None: no budget, nothing removed). Returns the hashes removed.
        What is kept is never removed, even over budget: the caller's `keep` is what rounds need."""
        if budget_bytes is None:
            return []
        sizes = {h: self.size(h) for h in self.hashes()}
        total = sum(sizes.values())
        removed = []
        for h in sorted(set(sizes) - keep, key=lambda h: self.path(h).stat().st_mtime):
            if total <= budget_bytes:
                break
            shutil.rmtree(self.path(h), ignore_errors=True)
            self._verified.discard(h)
            total -= sizes[h]
            removed.append(h)
        if total > budget_bytes:
            log.warning("checkpoints needed by the current rounds take %d bytes, over the %d-byte budget",
                        total, budget_bytes)
        return removed
