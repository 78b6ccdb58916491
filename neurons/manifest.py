"""Checkpoint packaging: which files a submission may hold, and the manifest that pins them.

A checkpoint directory is flat and holds only weights (`*.safetensors`, plus the shard index),
`config.json`, `generation_config.json`, tokenizer files and `manifest.json`. Nothing that can
carry code or a pickle is allowed, so the validator never has to decide whether a file is safe to
open: the allow-list decides, by name alone, before any byte is read.

`manifest.json` lists every other file with its size and sha256, and the `model_hash` over them
(see `compute_model_hash`). The on-chain commitment carries a prefix of `model_hash`, so a
verified manifest ties every byte of the checkpoint to the commitment.

Hostile input is the normal case here: every refusal raises `SubmissionRejected` with a reason
that names the file and the problem.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from eval import checkpoint_layout
from quasar_model.atomic import write_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

# Exact names a checkpoint may hold besides its safetensors shards.
CONFIG_FILES = frozenset({"config.json", "generation_config.json"})
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja",
})
INDEX_NAME = "model.safetensors.index.json"
ALLOWED_EXACT_NAMES = CONFIG_FILES | TOKENIZER_FILES | {INDEX_NAME}
# Shards: `model.safetensors`, `model-00001-of-00002.safetensors`, ... A plain ASCII stem
# starting with an alphanumeric, so no shard name can be hidden, relative or odd.
SAFETENSORS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}\.safetensors")

# Extensions worth a sharper reason than "not allowed": they are how code gets in.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".sh", ".ipynb", ".exe", ".jar")

MAX_NAME_LENGTH = 128
MAX_FILES = 256  # a real checkpoint has < 20 files; the cap bounds the work a directory can ask for
MAX_MANIFEST_BYTES = 1 << 20  # ~4 KiB per file at most; a larger manifest is an attack, not a model
HASH_BLOCK = 1 << 20  # stream files in 1 MiB blocks: memory stays flat for multi-GB shards
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class SubmissionRejected(Exception):
    """A submission failed a check. `reason` says what is wrong, `stage` which check said so.

    Defined here, the lowest layer of the submission checks, so `checks` and any fetcher can
    raise the same type without import cycles.
    """

    def __init__(self, reason: str, stage: str = "manifest"):
        super().__init__(f"[{stage}] {reason}")
        self.reason = reason
        self.stage = stage


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Files sorted by name, and the model hash over them."""
    files: tuple[ManifestEntry, ...]
    model_hash: str
    version: int = MANIFEST_VERSION

    def entry(self, name: str) -> ManifestEntry | None:
        return next((e for e in self.files if e.name == name), None)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.files]

    def to_json(self) -> str:
        body = {
            "version": self.version,
            "model_hash": self.model_hash,
            "files": [{"name": e.name, "size": e.size, "sha256": e.sha256} for e in self.files],
        }
        return json.dumps(body, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------- names
def name_problem(name: object) -> str | None:
    """Why `name` may not appear in a checkpoint, or None when it may.

    Checked in order of how dangerous the name is, so the reason names the worst problem:
    anything that could leave the directory first, then hidden/odd names, then file types.
    """
    if not isinstance(name, str) or not name:
        return f"file name {name!r} is not a non-empty string"
    shown = repr(name[:80])
    if len(name) > MAX_NAME_LENGTH:
        return f"file name {shown}... is longer than {MAX_NAME_LENGTH} characters"
    if "/" in name or "\\" in name or name.startswith("~") or os.path.isabs(name):
        return f"file name {shown} contains a path separator or is absolute (path traversal)"
    if ".." in name:
        return f"file name {shown} contains '..' (path traversal)"
    if not name.isascii() or not name.isprintable() or name != name.strip():
        return f"file name {shown} has non-ASCII, control or surrounding whitespace characters"
    if name.startswith("."):
        return f"file name {shown} is hidden (starts with '.')"
    if name == MANIFEST_NAME or name in ALLOWED_EXACT_NAMES or SAFETENSORS_NAME.fullmatch(name):
        return None
    lower = name.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        return f"file {shown} is a pickle-capable format; only safetensors weights are accepted"
    if lower.endswith(CODE_SUFFIXES):
        return f"file {shown} is code; submissions may not contain code"
    return f"file {shown} is not an allowed checkpoint file (config, safetensors, tokenizer, manifest)"


def _check_name(name: object) -> str:
    problem = name_problem(name)
    if problem:
        raise SubmissionRejected(problem)
    return name  # type: ignore[return-value]


# ---------------------------------------------------------------------------------- hashing
def compute_model_hash(entries) -> str:
    """The model hash: one sha256 that commits to every file of the checkpoint.

    Definition (v1): take the (name, sha256) pair of every file except `manifest.json`, sort the
    pairs by name (Python string order; names are ASCII, so this is byte order), and hash the
    concatenation of `name + "\\0" + sha256_hex + "\\n"` encoded as ASCII, for each pair in that
    order. Result: 64 lowercase hex characters.

    Sorting makes it independent of listing order; only names and content digests enter, so it
    does not depend on mtimes, permissions or the directory it lives in. Names can hold neither
    NUL nor newline and the digest is fixed-width, so the byte string determines the pairs
    (no two different file sets hash the same input). Sizes are left out on purpose: a file's
    sha256 already fixes its size.
    """
    h = hashlib.sha256()
    for name, digest in sorted((e.name, e.sha256) for e in entries):
        if name == MANIFEST_NAME:
            continue
        h.update(name.encode("ascii") + b"\0" + digest.encode("ascii") + b"\n")
    return h.hexdigest()


def _open_no_follow(path: Path) -> int:
    # O_NOFOLLOW: a symlink swapped in after the listing must not make us read outside the dir.
    return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))


def file_sha256(path: Path, expected_size: int | None = None) -> tuple[int, str]:
    """(size, sha256 hex) of a file, streamed in 1 MiB blocks.

    With `expected_size`, stops reading once the file proves longer, so a file that grows (or
    lies in its stat) cannot make us hash without end.
    """
    h, size = hashlib.sha256(), 0
    fd = _open_no_follow(path)
    with os.fdopen(fd, "rb") as f:
        while block := f.read(HASH_BLOCK):
            size += len(block)
            if expected_size is not None and size > expected_size:
                break
            h.update(block)
    return size, h.hexdigest()


# ---------------------------------------------------------------------------------- listing
def _list_checkpoint(directory: Path) -> list[str]:
    """Names of the regular files in a checkpoint directory; refuses anything else it finds."""
    if not directory.is_dir():
        raise SubmissionRejected(f"checkpoint directory {str(directory)!r} does not exist")
    names = []
    with os.scandir(directory) as it:
        for entry in it:
            if len(names) >= MAX_FILES:
                raise SubmissionRejected(f"checkpoint holds more than {MAX_FILES} files")
            _check_name(entry.name)
            # Symlinks could point anywhere on the validator's disk; subdirectories are not part
            # of the format. Both are refused rather than skipped, so nothing goes unexamined.
            if entry.is_symlink():
                raise SubmissionRejected(f"file {entry.name!r} is a symbolic link")
            if not entry.is_file(follow_symlinks=False):
                raise SubmissionRejected(f"{entry.name!r} is not a regular file")
            names.append(entry.name)
    return sorted(names)


# ---------------------------------------------------------------------------------- write
def build_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of a checkpoint directory as it is now (nothing written)."""
    directory = Path(directory)
    entries = []
    for name in _list_checkpoint(directory):
        if name == MANIFEST_NAME:
            continue  # a stale manifest is replaced, never listed in itself
        size, digest = file_sha256(directory / name)
        entries.append(ManifestEntry(name, size, digest))
    if not entries:
        raise SubmissionRejected(f"checkpoint directory {str(directory)!r} holds no files")
    return Manifest(tuple(entries), compute_model_hash(entries))


def write_manifest(directory: str | os.PathLike) -> Manifest:
    """Hash every file of `directory` and write `manifest.json` there (miner side).

    Raises SubmissionRejected for a file a validator would refuse, so a miner learns of it
    before publishing, not from a rejection. The write is atomic (temp file + rename), so a crash
    never leaves a half-written manifest behind.
    """
    directory = Path(directory)
    manifest = build_manifest(directory)
    write_atomic(directory / MANIFEST_NAME, manifest.to_json())
    return manifest


# ---------------------------------------------------------------------------------- read
def strict_json_loads(raw: bytes, what: str, stage: str = "manifest"):
    """eval.checkpoint_layout.strict_json_loads, refusing at `stage`."""
    try:
        return checkpoint_layout.strict_json_loads(raw, what)
    except checkpoint_layout.LayoutError as e:
        raise SubmissionRejected(str(e), stage) from None


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and validate manifest bytes: exact schema, safe allowed names, self-consistent hash."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise SubmissionRejected(f"manifest.json is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES}-byte cap")
    body = strict_json_loads(raw, "manifest.json")
    if not isinstance(body, dict):
        raise SubmissionRejected("manifest.json is not a JSON object")
    if set(body) != {"version", "model_hash", "files"}:
        raise SubmissionRejected(f"manifest.json must have exactly the keys files, model_hash, version; got {sorted(body)}")
    if type(body["version"]) is not int or body["version"] != MANIFEST_VERSION:
        raise SubmissionRejected(f"manifest.json version {body['version']!r} is not supported (expected {MANIFEST_VERSION})")
    files = body["files"]
    if not isinstance(files, list) or not files:
        raise SubmissionRejected("manifest.json 'files' must be a non-empty list")
    if len(files) > MAX_FILES:
        raise SubmissionRejected(f"manifest.json lists {len(files)} files, over the cap of {MAX_FILES}")
    entries, seen = [], set()
    for item in files:
        if not isinstance(item, dict) or set(item) != {"name", "size", "sha256"}:
            raise SubmissionRejected(f"manifest.json file entry {str(item)[:120]} must have exactly name, size, sha256")
        name, size, digest = item["name"], item["size"], item["sha256"]
        _check_name(name)
        if name == MANIFEST_NAME:
            raise SubmissionRejected("manifest.json lists itself")
        if name in seen:
            raise SubmissionRejected(f"manifest.json lists {name!r} twice")
        seen.add(name)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise SubmissionRejected(f"manifest.json size of {name!r} is not a non-negative integer: {size!r}")
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise SubmissionRejected(f"manifest.json sha256 of {name!r} is not 64 lowercase hex characters")
        entries.append(ManifestEntry(name, size, digest))
    entries.sort(key=lambda e: e.name)
    model_hash = body["model_hash"]
    if not isinstance(model_hash, str) or not _SHA256_HEX.fullmatch(model_hash):
        raise SubmissionRejected("manifest.json model_hash is not 64 lowercase hex characters")
    expected = compute_model_hash(entries)
    if model_hash != expected:
        raise SubmissionRejected(f"manifest.json model_hash {model_hash[:16]}... does not match "
                                 f"its file list ({expected[:16]}...)")
    return Manifest(tuple(entries), model_hash)


def read_small_file(path: Path, cap: int, what: str, stage: str = "manifest") -> bytes:
    """The bytes of a small metadata file, refusing it unread when it is over `cap`."""
    try:
        if path.is_symlink() or not path.is_file():
            raise SubmissionRejected(f"{what} is missing or not a regular file", stage)
        size = path.stat().st_size
        if size > cap:
            raise SubmissionRejected(f"{what} is {size} bytes, over the {cap}-byte cap", stage)
        with os.fdopen(_open_no_follow(path), "rb") as f:
            raw = f.read(cap + 1)  # bounded even if the file grew after the stat
    except OSError as e:
        raise SubmissionRejected(f"{what} cannot be read: {e.strerror}", stage) from None
    if len(raw) > cap:
        raise SubmissionRejected(f"{what} is over the {cap}-byte cap", stage)
    return raw


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and validate `manifest.json` from a checkpoint directory (size-capped before reading)."""
    return parse_manifest(read_small_file(Path(directory) / MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest.json"))


# ---------------------------------------------------------------------------------- verify
def verify_manifest(directory: str | os.PathLike, manifest: Manifest) -> None:
    """The directory holds exactly the manifest's files, byte for byte.

    Order: the manifest's own names (so a traversal name is refused before touching the disk),
    then the directory listing (forbidden, unlisted, odd files), then per file presence, size
    (cheap) and sha256 (streamed). Raises SubmissionRejected(stage="manifest").
    """
    directory = Path(directory)
    for entry in manifest.files:
        _check_name(entry.name)
        if entry.name == MANIFEST_NAME:
            raise SubmissionRejected("manifest lists manifest.json itself")
    if compute_model_hash(manifest.files) != manifest.model_hash:
        raise SubmissionRejected("manifest model_hash does not match its file list")
    listed = set(manifest.names)
    present = _list_checkpoint(directory)
    for name in present:
        if name != MANIFEST_NAME and name not in listed:
            raise SubmissionRejected(f"file {name!r} is not listed in the manifest")
    present_set = set(present)
    for entry in manifest.files:
        if entry.name not in present_set:
            raise SubmissionRejected(f"file {entry.name!r} listed in the manifest is missing")
        path = directory / entry.name
        try:
            actual_size = path.stat(follow_symlinks=False).st_size
            if actual_size != entry.size:
                raise SubmissionRejected(f"file {entry.name!r} is {actual_size} bytes, the manifest says {entry.size}")
            size, digest = file_sha256(path, expected_size=entry.size)
        except OSError as e:  # removed or swapped while we looked: still a rejection, not a crash
            raise SubmissionRejected(f"file {entry.name!r} cannot be read: {e.strerror}") from None
        if size != entry.size:
            raise SubmissionRejected(f"file {entry.name!r} changed size while being hashed")
        if digest != entry.sha256:
            raise SubmissionRejected(
                f"file {entry.name!r} sha256 mismatch: manifest {entry.sha256[:16]}..., file {digest[:16]}...")
