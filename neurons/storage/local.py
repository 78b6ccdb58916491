"""Storage kind `local` (localnet): a copy under `<storage_root>/<location>/<token>/` on this machine."""
from __future__ import annotations

import asyncio
import os
import shutil
import stat
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from ..commitment import Commitment, encode_commitment
from ..manifest import (
    MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ManifestEntry, _list_checkpoint, read_manifest, read_small_file,
    verify_manifest,
)
from .core import CHUNK, Budget, FetchLimits, Sink, reject


# ================================================================================== publish
def stage(directory: Path, manifest: Manifest, *, hotkey: str, token: str, storage_root=None, location=None,
          **_other_kinds) -> Commitment:
    if storage_root is None or location is None:
        raise ValueError("publishing 'local' needs storage_root and location")
    commitment = Commitment.for_model("local", location, token, manifest.model_hash, hotkey)
    encode_commitment(commitment)  # refuse a bad path or token before copying anything
    _stage_local(directory, manifest, Path(storage_root), location, token)
    return commitment


def release(commitment: Commitment, directory: Path, *, storage_root=None, **_other_kinds) -> None:
    if storage_root is None:
        raise ValueError("releasing 'local' needs storage_root")
    _release_local(directory, Path(storage_root), commitment.location, commitment.revision)


def _local_parent(root: Path, location: str) -> Path:
    root = root.resolve()
    parent = (root / location).resolve()
    if not parent.is_relative_to(root):  # checked before mkdir, which would follow a planted symlink
        raise ValueError(f"{root / location} leaves the storage root {root} (symlink?)")
    return parent


def _stage_local(directory: Path, manifest: Manifest, root: Path, location: str, token: str) -> None:
    """Copy to `<root>/<location>/.unreleased-<token>` (no token starts with '.', so no commitment
    names it), via a staging directory renamed into place."""
    parent = _local_parent(root, location)
    parent.mkdir(parents=True, exist_ok=True)
    for target in (parent / token, parent / f".unreleased-{token}"):
        if target.exists():
            if read_manifest(target).model_hash != manifest.model_hash:
                raise FileExistsError(f"{target} already holds a different checkpoint; publish under another token")
            verify_manifest(target, manifest)  # same model already staged or published: nothing to do if intact
            return
    staging = parent / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for name in (*manifest.names, MANIFEST_NAME):
            shutil.copyfile(directory / name, staging / name, follow_symlinks=False)
        verify_manifest(staging, manifest)  # the copy, not the source, is what validators read
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _release_local(directory: Path, root: Path, location: str, token: str) -> None:
    parent = _local_parent(root, location)
    target, staged = parent / token, parent / f".unreleased-{token}"
    if staged.exists() and not target.exists():
        os.rename(staged, target)
    if not target.exists():
        raise FileNotFoundError(f"nothing staged or released at {target}; stage the checkpoint first")
    if read_manifest(target).model_hash != read_manifest(directory).model_hash:
        raise FileExistsError(f"{target} holds a different checkpoint than {directory}")


# ================================================================================== fetch
class LocalSource:
    """`<storage_root>/<location>/<token>` on this machine (localnet)."""

    def __init__(self, commitment: Commitment, storage_root: str | os.PathLike | None):
        if storage_root is None:
            raise ValueError("fetching a 'local' commitment needs storage_root")
        root = Path(storage_root).resolve()
        source = (root / commitment.location / commitment.revision).resolve()
        shown = f"{commitment.location}/{commitment.revision}"
        if not source.is_relative_to(root):  # a symlink planted in the root must not lead out of it
            raise reject(f"local checkpoint {shown} leads outside the storage root")
        if not source.is_dir():
            raise reject(f"local checkpoint {shown} does not exist")
        self.directory = source

    async def manifest(self, budget: Budget) -> bytes:
        raw = read_small_file(self.directory / MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest.json", "fetch")
        budget.spend(len(raw))
        return raw

    def check_listing(self, manifest: Manifest) -> None:
        listed = set(manifest.names)
        for name in _list_checkpoint(self.directory):  # refuses unsafe names, pickles, code, symlinks
            if name != MANIFEST_NAME and name not in listed:
                raise reject(f"file {name!r} is not listed in the manifest", "manifest")

    async def download(self, entry: ManifestEntry, sink: Sink) -> None:
        path = self.directory / entry.name
        try:  # O_NONBLOCK: a FIFO swapped in after the listing must not hang the open
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            raise reject(f"{entry.name!r} cannot be opened: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise reject(f"{entry.name!r} is not a regular file", "manifest")
            while block := f.read(CHUNK):
                sink(block)
                await asyncio.sleep(0)  # let the total deadline fire between blocks


@asynccontextmanager
async def open_source(commitment: Commitment, limits: FetchLimits, *, localnet: bool, storage_root=None,
                      **_other_kinds):
    yield LocalSource(commitment, storage_root)
