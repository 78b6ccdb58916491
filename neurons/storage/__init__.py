"""Storage kinds: a miner publishes a checkpoint, a validator fetches it back.

    stage(directory, kind, hotkey=...) -> Commitment  writes manifest.json, puts the files in
                                                    storage unreadable, says where (see below)
    release(commitment, directory, ...)             makes them readable, once the commitment landed
    fetch(commitment, dest_dir, limits=...) -> Path every byte streamed, capped, timed, hashed,
                                                    then `check_submission`; or SubmissionRejected

Kinds (the commitment's grammar is in `neurons.commitment`), one module each holding both its
publish and its fetch side, over the fetch core they share (`neurons.storage.core`):

    local  localnet: a copy under `<storage_root>/<location>/<token>/`
    http   the miner's own `CheckpointServer` (`neurons.serve`), signed requests
    hf     a Hugging Face Hub model repo, pinned at the commit sha the upload created

What the fetcher trusts: nothing from the miner. It reads the manifest first (size-capped), checks
it is the committed one, refuses a declared total over the cap, and only then downloads the files
the manifest lists, by the manifest's vetted names, each stopped the moment it runs past its
declared size and hashed on the way. Every request has a deadline and the whole fetch has one, so
a server trickling bytes forever fails on time. Files land under a temporary name in `dest_dir`
and are renamed once their sha256 matches; on any failure everything written is removed again.

Stages of a rejection: "commitment" (fields), "fetch" (transport, size, time), "manifest" (file
set, names, hashes), then those of `check_submission` (config, header, weights).
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from ..checks import check_submission
from ..commitment import Commitment, binding, encode_commitment
from ..manifest import SubmissionRejected, write_manifest
from . import hf, http, local
from .core import Destination, Fetched, FetchLimits, checked_commitment, fetch_into, reject

log = logging.getLogger(__name__)

KINDS = {"local": local, "http": http, "hf": hf}


# ================================================================================== publish
# A checkpoint reaches validators in two steps, so its commitment can land in between:
#   stage    manifest written, files put in storage where no validator can read them yet
#            (local: a hidden staging name; http: not registered; hf: a private repo)
#   release  made readable (renamed into place; registered; the repo made public)
# A miner commits after `stage` and releases once the commitment has landed, so nobody can read
# the weights before the block that owns them (see neurons.commitment: why that matters).
def stage(directory: str | os.PathLike, kind: str, *, hotkey: str, token: str | None = None,
          storage_root: str | os.PathLike | None = None, location: str | None = None,
          server=None, host: str | None = None, port: int | None = None,
          repo_id: str | None = None, hf_token: str | None = None, hf_endpoint: str | None = None) -> Commitment:
    """Write the manifest of `directory`, put the checkpoint in storage unreadable, return the
    commitment `hotkey` will make for it.

    local: `storage_root` and `location` (relative path); http: `server` (a started
    CheckpointServer) and the public `host`/`port` validators reach it at (default: its bind
    address); hf: `repo_id`, `hf_token`. `token` (local/http) defaults to the first 16 hex digits of
    the commitment's binding: the same checkpoint and hotkey name the same place, and the token
    reveals nothing the commitment does not.
    Raises SubmissionRejected for a checkpoint a validator would refuse, CommitmentRejected for
    a location the commitment grammar cannot carry, ValueError for missing arguments.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown storage kind {kind!r} (known: local, http, hf)")
    directory = Path(directory)
    manifest = write_manifest(directory)
    token = token or binding(manifest.model_hash, hotkey)[:16]
    commitment = KINDS[kind].stage(directory, manifest, hotkey=hotkey, token=token, storage_root=storage_root,
                                   location=location, server=server, host=host, port=port, repo_id=repo_id,
                                   hf_token=hf_token, hf_endpoint=hf_endpoint)
    encode_commitment(commitment)
    return commitment


def release(commitment: Commitment, directory: str | os.PathLike, *, storage_root: str | os.PathLike | None = None,
            server=None, hf_token: str | None = None, hf_endpoint: str | None = None) -> None:
    """Make a staged checkpoint readable by validators. Idempotent: a miner restarted between
    committing and releasing calls it again."""
    KINDS[commitment.kind].release(commitment, Path(directory), storage_root=storage_root, server=server,
                                   hf_token=hf_token, hf_endpoint=hf_endpoint)


def publish(directory: str | os.PathLike, kind: str, *, hotkey: str, **where) -> Commitment:
    """`stage` then `release` at once: for tools and tests, where nothing lands in between.
    A miner commits between the two (neurons.miner)."""
    commitment = stage(directory, kind, hotkey=hotkey, **where)
    release(commitment, directory, **{k: v for k, v in where.items()
                                      if k in ("storage_root", "server", "hf_token", "hf_endpoint")})
    return commitment


# ================================================================================== fetch
async def fetch_submission_async(commitment: Commitment | str, dest_dir: str | os.PathLike, *, limits: FetchLimits,
                                 miner_hotkey: str, keypair=None,
                                 storage_root: str | os.PathLike | None = None, localnet: bool = False,
                                 hf_endpoint: str | None = None, hf_token: str | None = None) -> Fetched:
    """Fetch and check a submission into `dest_dir` (absent or empty). See `fetch` for arguments."""
    if not isinstance(miner_hotkey, str) or not miner_hotkey:
        raise ValueError("fetching needs the committing hotkey: the commitment binds the model to it")
    commitment = checked_commitment(commitment, localnet)
    dest = Destination(dest_dir)
    try:
        manifest = await _download(commitment, dest, limits, keypair, miner_hotkey, storage_root, localnet,
                                   hf_endpoint, hf_token)
        submission = await asyncio.to_thread(check_submission, dest.path, limits.student, manifest=manifest,
                                             commitment=commitment, hotkey=miner_hotkey)
    except BaseException as e:
        dest.discard()
        if isinstance(e, SubmissionRejected):
            log.info("rejected %s: [%s] %s", encode_commitment(commitment), e.stage, e.reason)
        raise
    return Fetched(dest.path, submission)


async def _download(commitment, dest, limits, keypair, miner_hotkey, storage_root, localnet, hf_endpoint, hf_token):
    try:
        async with asyncio.timeout(limits.total_timeout):
            async with KINDS[commitment.kind].open_source(
                    commitment, limits, localnet=localnet, miner_hotkey=miner_hotkey, keypair=keypair,
                    storage_root=storage_root, hf_endpoint=hf_endpoint, hf_token=hf_token) as source:
                return await fetch_into(source, commitment, miner_hotkey, dest, limits)
    except TimeoutError:  # the per-request deadlines already became rejections; this is the total
        raise reject(f"fetch not complete after the total limit of {limits.total_timeout:g}s") from None


def fetch_submission(commitment: Commitment | str, dest_dir: str | os.PathLike, *, limits: FetchLimits,
                     **kwargs) -> Fetched:
    """`fetch`, also returning the checked submission (config, manifest, summary)."""
    return asyncio.run(fetch_submission_async(commitment, dest_dir, limits=limits, **kwargs))


def fetch(commitment: Commitment | str, dest_dir: str | os.PathLike, *, limits: FetchLimits, miner_hotkey: str,
          keypair=None, storage_root: str | os.PathLike | None = None, localnet: bool = False,
          hf_endpoint: str | None = None, hf_token: str | None = None) -> Path:
    """Download a committed checkpoint into `dest_dir` and run every check; the directory on success.

    `commitment` is a Commitment or the raw string read from chain (its grammar is checked here
    either way). `dest_dir` must be empty, or absent with an existing parent. `miner_hotkey` is
    the committing hotkey: the commitment binds the model to it, and http requests are signed for
    it as their receiver. http needs `keypair` (the validator's hotkey, signs the requests); local needs `storage_root`; hf takes `hf_endpoint` (default: HF_ENDPOINT
    or the public Hub) and `hf_token`. `localnet` allows local commitments and private http hosts.
    Raises SubmissionRejected(reason, stage), and leaves `dest_dir` as it found it. Not callable
    from a running event loop: use `fetch_submission_async` there.
    """
    return fetch_submission(commitment, dest_dir, limits=limits, keypair=keypair, miner_hotkey=miner_hotkey,
                            storage_root=storage_root, localnet=localnet, hf_endpoint=hf_endpoint,
                            hf_token=hf_token).directory
