"""Storage kinds: a miner publishes a checkpoint, a validator fetches it back.

    stage(directory, kind, hotkey=...) -> Commitment  writes manifest.json, puts the files in
                                                    storage unreadable, says where (see below)
    release(commitment, directory, ...)             makes them readable, once the commitment landed
    fetch(commitment, dest_dir, limits=...) -> Path every byte streamed, capped, timed, hashed,
                                                    then `check_submission`; or SubmissionRejected

Kinds (the commitment's grammar is in `neurons.commitment`):

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
import hashlib
import ipaddress
import logging
import os
import shutil
import socket
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yarl

from .addresses import PublicResolver, RefusedAddress, address_problem
from .checks import CheckedSubmission, StudentLimits, check_submission
from .commitment import Commitment, CommitmentRejected, binding, encode_commitment, parse_commitment, unbound_reason
from .manifest import (
    MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ManifestEntry, SubmissionRejected, _list_checkpoint,
    name_problem, parse_manifest, read_manifest, read_small_file, verify_manifest, write_manifest,
)

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Files every Hub repo may carry that are not part of the checkpoint; listed, never downloaded.
HUB_BOILERPLATE = frozenset({".gitattributes", "README.md"})
# Weights at fp32 are 4 bytes a parameter; the slack covers headers, configs and tokenizer files.
SIZE_SLACK = 256 << 20


@dataclass(frozen=True)
class FetchLimits:
    """How much a fetch may download and for how long. Timeouts are in seconds.

    read_timeout: longest silence mid-response; request_timeout: one whole file (or metadata
    call); total_timeout: the whole fetch. A trickle defeats the first, never the other two.
    """
    student: StudentLimits
    max_total_bytes: int | None = None  # None: derived from the student's parameter cap
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    request_timeout: float = 1800.0
    total_timeout: float = 3600.0
    max_redirects: int = 5  # hf only: the Hub redirects file downloads to its CDN
    # The rate floor: after `rate_grace` seconds a fetch must have averaged `min_rate` bytes/s
    # (0: no floor). 256 KiB/s is 2 Mbit/s, far below any host fit to serve checkpoints.
    min_rate: float = 256 << 10
    rate_grace: float = 15.0

    @property
    def total_bytes(self) -> int:
        if self.max_total_bytes is not None:
            return self.max_total_bytes
        return self.student.max_total_params * 4 + SIZE_SLACK


@dataclass(frozen=True)
class Fetched:
    directory: Path
    submission: CheckedSubmission


class SourceUnavailable(SubmissionRejected):
    """The storage could not be reached at all. Callers may try again later instead of recording a
    rejection: a miner's server restarting must not cost it its commitment."""


def _reject(reason: str, stage: str = "fetch") -> SubmissionRejected:
    return SubmissionRejected(reason, stage)


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
    if kind not in ("local", "http", "hf"):
        raise ValueError(f"unknown storage kind {kind!r} (known: local, http, hf)")
    directory = Path(directory)
    manifest = write_manifest(directory)
    token = token or binding(manifest.model_hash, hotkey)[:16]
    if kind == "local":
        if storage_root is None or location is None:
            raise ValueError("publishing 'local' needs storage_root and location")
        commitment = Commitment.for_model("local", location, token, manifest.model_hash, hotkey)
        encode_commitment(commitment)  # refuse a bad path or token before copying anything
        _stage_local(directory, manifest, Path(storage_root), location, token)
    elif kind == "http":
        if server is None:
            raise ValueError("publishing 'http' needs the miner's CheckpointServer")
        host, port = host or server.host, port or server.port
        if host in ("0.0.0.0", "") or not port:
            raise ValueError(f"give the public host and port validators reach the server at (not {host!r}:{port})")
        commitment = Commitment.for_model("http", f"{host}:{port}", token, manifest.model_hash, hotkey)
    else:
        if repo_id is None:
            raise ValueError("publishing 'hf' needs repo_id")
        encode_commitment(Commitment.for_model("hf", repo_id, "0" * 40, manifest.model_hash, hotkey))  # id fits
        sha = _stage_hf(directory, manifest, repo_id, hf_token, hf_endpoint)
        commitment = Commitment.for_model("hf", repo_id, sha, manifest.model_hash, hotkey)
    encode_commitment(commitment)
    return commitment


def release(commitment: Commitment, directory: str | os.PathLike, *, storage_root: str | os.PathLike | None = None,
            server=None, hf_token: str | None = None, hf_endpoint: str | None = None) -> None:
    """Make a staged checkpoint readable by validators. Idempotent: a miner restarted between
    committing and releasing calls it again."""
    if commitment.kind == "local":
        if storage_root is None:
            raise ValueError("releasing 'local' needs storage_root")
        _release_local(Path(directory), Path(storage_root), commitment.location, commitment.revision)
    elif commitment.kind == "http":
        if server is None:
            raise ValueError("releasing 'http' needs the miner's CheckpointServer")
        server.register(commitment.revision, directory)
    else:
        from huggingface_hub import HfApi

        HfApi(endpoint=_hf_endpoint(hf_endpoint), token=hf_token).update_repo_settings(
            commitment.location, private=False)


def publish(directory: str | os.PathLike, kind: str, *, hotkey: str, **where) -> Commitment:
    """`stage` then `release` at once: for tools and tests, where nothing lands in between.
    A miner commits between the two (neurons.miner)."""
    commitment = stage(directory, kind, hotkey=hotkey, **where)
    release(commitment, directory, **{k: v for k, v in where.items()
                                      if k in ("storage_root", "server", "hf_token", "hf_endpoint")})
    return commitment


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


def _hf_endpoint(endpoint: str | None) -> str | None:
    # huggingface_hub reads HF_ENDPOINT once, at import; reading it per call lets it change later.
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def _stage_hf(directory: Path, manifest: Manifest, repo_id: str, token: str | None, endpoint: str | None) -> str:
    """Upload exactly the manifest's files in one commit to the repo, made private first; the
    commit's sha pins the revision. While private, a validator that has not fetched the repo's
    previous checkpoint cannot; the commitment landing next replaces that one anyway."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(endpoint=_hf_endpoint(endpoint), token=token)
    api.create_repo(repo_id, exist_ok=True, private=True)  # a new repo is private from the start
    api.update_repo_settings(repo_id, private=True)        # an existing one may not be
    keep = {*manifest.names, MANIFEST_NAME}
    current = api.model_info(repo_id, revision="main").siblings or []
    # Files left from an earlier checkpoint would be in the new revision too, and a validator
    # refuses a revision holding files its manifest does not list.
    stale = [s.rfilename for s in current if s.rfilename not in keep and s.rfilename not in HUB_BOILERPLATE]
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name)) for name in sorted(keep)]
    operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
    info = api.create_commit(repo_id, operations, commit_message="checkpoint")
    return info.oid


# ================================================================================== fetch: plumbing
class _Budget:
    """Bytes left for the whole fetch; spent as they arrive, so the cap holds mid-stream."""

    def __init__(self, total: int):
        self.total, self.left = total, total

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise _reject(f"download exceeds the total cap of {self.total} bytes")


class _Sink:
    """One file on its way in: size-capped, hashed, counted against the budget, kept or written."""

    def __init__(self, what: str, cap: int, budget: _Budget, file=None):
        self.what, self.cap, self.budget, self.file = what, cap, budget, file
        self.size, self.sha = 0, hashlib.sha256()
        self.parts: list[bytes] = []

    def declared(self, length: int | None) -> None:
        """A Content-Length over the cap is refused before a byte of the body is read."""
        if length is not None and length > self.cap:
            raise _reject(f"{self.what} is announced as {length} bytes, over its {self.cap}-byte limit")

    def __call__(self, block: bytes) -> None:
        self.size += len(block)
        if self.size > self.cap:
            raise _reject(f"{self.what} runs past its {self.cap}-byte limit (stopped at {self.size} bytes)")
        self.budget.spend(len(block))
        self.sha.update(block)
        if self.file is None:
            self.parts.append(block)
        else:
            self.file.write(block)

    def content(self) -> bytes:
        return b"".join(self.parts)


class _Destination:
    """`dest_dir`, empty when the fetch starts; `discard()` removes everything written since."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_symlink():
            raise ValueError(f"destination {self.path} is a symbolic link")
        self.created = not self.path.exists()
        self.path.mkdir(exist_ok=True)  # not parents: nothing may be left outside dest_dir
        if any(self.path.iterdir()):
            raise ValueError(f"destination {self.path} is not empty")
        self.written: list[Path] = []

    def create(self, name: str):
        """A new file `.{name}.part` (the name was vetted by `parse_manifest`); never follows links."""
        path = self.path / f".{name}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        self.written.append(path)
        return os.fdopen(fd, "wb")

    def keep(self, name: str) -> None:
        final = self.path / name
        os.rename(self.path / f".{name}.part", final)
        self.written.append(final)

    def write(self, name: str, data: bytes) -> None:
        with self.create(name) as f:
            f.write(data)
        self.keep(name)

    def discard(self) -> None:
        for path in self.written:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if self.created:
            try:
                self.path.rmdir()
            except OSError:  # something we did not write appeared: leave it for the caller to see
                pass


class _Pace:
    """The transfer-rate floor of one fetch: after `grace` seconds, at least `min_rate` bytes a
    second on average. A trickle that is never silent for `read_timeout` is cut off at the moment
    it falls behind, not at the end of the per-request or total limit."""

    def __init__(self, limits: FetchLimits):
        self.min_rate, self.grace = limits.min_rate, limits.rate_grace
        self.start = asyncio.get_running_loop().time()
        self.received = 0

    def deadline(self) -> float | None:
        if not self.min_rate:
            return None
        return self.start + self.grace + self.received / self.min_rate

    def refusal(self, what: str) -> SubmissionRejected:
        return _reject(f"{what}: transfer rate fell below the minimum of {self.min_rate:g} bytes/s "
                       f"({self.received} bytes in {asyncio.get_running_loop().time() - self.start:.1f}s)")


class _Hops:
    """Where a request may go. `trusted` is the origin the validator chose (the Hub endpoint in
    its settings, or the address `_http_base` checked); any other origin a redirect names must be
    public (names are checked by the session's PublicResolver, literals here). `follow`: whether
    redirects are followed at all (never for a miner's own server)."""

    def __init__(self, trusted: yarl.URL, localnet: bool, follow: bool):
        self.trusted, self.localnet, self.follow = trusted.origin(), localnet, follow

    def check(self, url: yarl.URL, what: str) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise _reject(f"{what}: a redirect leads to a URL that is not http(s)")
        if url.origin() == self.trusted or self.localnet:
            return
        try:
            ipaddress.ip_address(url.host)
        except ValueError:
            return  # a name: the session's resolver refuses a non-public answer
        problem = address_problem(url.host)
        if problem:
            raise _reject(f"{what}: refused a redirect: {problem}")


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def _open(session: aiohttp.ClientSession, url: yarl.URL, headers: dict[str, str], limits: FetchLimits,
                hops: _Hops, what: str) -> aiohttp.ClientResponse:
    """The 200 response for `url`, following redirects here (aiohttp's own following would not
    check where each hop goes). Reasons name the status only: the server's bytes (body, reason
    phrase, Location) are never repeated, since reasons are stored and shown."""
    for _ in range(limits.max_redirects + 1):
        hops.check(url, what)
        response = await session.get(url, headers=headers, allow_redirects=False)
        if response.status == 200:
            return response
        location = response.headers.get("Location")
        response.release()
        if response.status not in _REDIRECTS:
            raise _reject(f"{what}: the server answered HTTP {response.status}")
        if not hops.follow:
            raise _reject(f"{what}: the server answered with a redirect ({response.status}), which is refused")
        try:
            following = url.join(yarl.URL(location or ""))
        except (ValueError, TypeError):
            raise _reject(f"{what}: the server answered a redirect to an invalid location") from None
        if not location:
            raise _reject(f"{what}: the server answered a redirect without a location")
        if following.origin() != url.origin():  # a credential for the Hub is not for its CDN
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        url = following
    raise _reject(f"{what}: more than {limits.max_redirects} redirects")


@dataclass(frozen=True)
class _Net:
    """What every request of one fetch shares: the session, limits, rate floor and hop policy."""
    session: aiohttp.ClientSession
    limits: FetchLimits
    pace: _Pace
    hops: _Hops

    def get(self, url: str, headers: dict[str, str], sink: _Sink):
        return _stream(self.session, url, headers, sink, self.limits, self.pace, self.hops)


async def _stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str], sink: _Sink,
                  limits: FetchLimits, pace: _Pace, hops: _Hops) -> None:
    """GET `url` into `sink` within `request_timeout` and the rate floor; every failure names the
    file and the cause."""
    what = sink.what
    floor = None
    try:
        async with asyncio.timeout(limits.request_timeout):
            async with asyncio.timeout_at(pace.deadline()) as floor:
                async with await _open(session, yarl.URL(url, encoded=True), headers, limits, hops, what) as response:
                    sink.declared(response.content_length)
                    async for block in response.content.iter_chunked(CHUNK):
                        pace.received += len(block)
                        sink(block)
                        floor.reschedule(pace.deadline())
    except SubmissionRejected:
        raise
    except aiohttp.ServerTimeoutError:  # before plain TimeoutError: it is one too
        raise _reject(f"{what}: timed out connecting or waiting {limits.read_timeout:g}s for data") from None
    except TimeoutError:
        if floor is not None and floor.expired():
            raise pace.refusal(what) from None
        raise _reject(f"{what}: not complete after the per-request limit of {limits.request_timeout:g}s") from None
    except aiohttp.ClientConnectorError as e:
        if isinstance(e.os_error, RefusedAddress):
            raise _reject(f"{what}: {e.os_error}") from None
        # nothing answered: maybe down for a minute, not hostile
        raise SourceUnavailable(f"{what}: cannot connect ({type(e.os_error).__name__})", "fetch") from None
    except (aiohttp.ClientError, OSError) as e:
        # the type only: aiohttp's messages can quote the server's status line or headers
        raise _reject(f"{what}: download failed ({type(e).__name__})") from None


# ================================================================================== fetch: sources
class _LocalSource:
    """`<storage_root>/<location>/<token>` on this machine (localnet)."""

    def __init__(self, commitment: Commitment, storage_root: str | os.PathLike | None):
        if storage_root is None:
            raise ValueError("fetching a 'local' commitment needs storage_root")
        root = Path(storage_root).resolve()
        source = (root / commitment.location / commitment.revision).resolve()
        shown = f"{commitment.location}/{commitment.revision}"
        if not source.is_relative_to(root):  # a symlink planted in the root must not lead out of it
            raise _reject(f"local checkpoint {shown} leads outside the storage root")
        if not source.is_dir():
            raise _reject(f"local checkpoint {shown} does not exist")
        self.directory = source

    async def manifest(self, budget: _Budget) -> bytes:
        raw = read_small_file(self.directory / MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest.json", "fetch")
        budget.spend(len(raw))
        return raw

    def check_listing(self, manifest: Manifest) -> None:
        listed = set(manifest.names)
        for name in _list_checkpoint(self.directory):  # refuses unsafe names, pickles, code, symlinks
            if name != MANIFEST_NAME and name not in listed:
                raise _reject(f"file {name!r} is not listed in the manifest", "manifest")

    async def download(self, entry: ManifestEntry, sink: _Sink) -> None:
        path = self.directory / entry.name
        try:  # O_NONBLOCK: a FIFO swapped in after the listing must not hang the open
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            raise _reject(f"{entry.name!r} cannot be opened: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise _reject(f"{entry.name!r} is not a regular file", "manifest")
            while block := f.read(CHUNK):
                sink(block)
                await asyncio.sleep(0)  # let the total deadline fire between blocks


class _HttpSource:
    """The miner's CheckpointServer; every request signed for the miner's hotkey."""

    def __init__(self, net: _Net, commitment: Commitment, keypair, miner_hotkey: str | None, base: str):
        if keypair is None or not miner_hotkey:
            raise ValueError("fetching an 'http' commitment needs the validator's keypair and the miner's hotkey")
        self.net, self.keypair, self.miner_hotkey = net, keypair, miner_hotkey
        self.base, self.host = base, commitment.location
        self.prefix = f"/checkpoint/{commitment.revision}/"  # token and names are grammar-checked ASCII

    def _get(self, name: str, sink: _Sink):
        from bittensor import http_auth

        path = self.prefix + name
        headers = http_auth.sign(self.keypair, method="GET", path=path, receiver_ss58=self.miner_hotkey)
        headers.update({"Host": self.host, "Accept-Encoding": "identity"})
        return self.net.get(self.base + path, headers, sink)

    async def manifest(self, budget: _Budget) -> bytes:
        sink = _Sink("manifest.json", MAX_MANIFEST_BYTES, budget)
        await self._get(MANIFEST_NAME, sink)
        return sink.content()

    def check_listing(self, manifest: Manifest) -> None:
        pass  # the server has no listing: only the manifest's names are ever asked for

    async def download(self, entry: ManifestEntry, sink: _Sink) -> None:
        await self._get(entry.name, sink)


class _HfSource:
    """A Hub model repo at a pinned commit: metadata through huggingface_hub, bytes streamed here."""

    def __init__(self, net: _Net, commitment: Commitment, endpoint: str | None, token: str | None):
        from huggingface_hub import HfApi

        self.net, self.commitment, self.limits = net, commitment, net.limits
        self.api = HfApi(endpoint=_hf_endpoint(endpoint), token=token)
        self.headers = {"Accept-Encoding": "identity"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"  # `_open` drops it on a redirect elsewhere
        self.sizes: dict[str, int | None] = {}
        self.lfs_sha: dict[str, str] = {}

    async def load_listing(self) -> None:
        repo, sha = self.commitment.location, self.commitment.revision
        try:
            async with asyncio.timeout(self.limits.request_timeout):
                info = await asyncio.to_thread(self.api.model_info, repo, revision=sha, files_metadata=True,
                                               timeout=self.limits.request_timeout)
        except TimeoutError:
            raise _reject(f"hf repo {repo}: metadata not received within {self.limits.request_timeout:g}s") from None
        except Exception as e:  # not found, gated, network: whatever the Hub client raises
            # the type and status only: the Hub client's messages quote the server's response
            status = getattr(getattr(e, "response", None), "status_code", None)
            raise _reject(f"hf repo {repo} at {sha[:12]}: metadata request failed: {type(e).__name__}"
                          + (f" (HTTP {status})" if isinstance(status, int) else "")) from None
        if info.sha != sha:
            raise _reject(f"hf repo {repo}: the Hub resolved revision {sha[:12]} to {str(info.sha)[:12]}")
        for sibling in info.siblings or []:
            name = sibling.rfilename
            if name in HUB_BOILERPLATE:
                continue
            problem = name_problem(name)
            if problem:
                raise _reject(f"hf repo {repo}: {problem}", "manifest")
            self.sizes[name] = sibling.size
            if sibling.lfs is not None:
                self.lfs_sha[name] = sibling.lfs.sha256

    def _url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.commitment.location, name, revision=self.commitment.revision, endpoint=self.api.endpoint)

    async def manifest(self, budget: _Budget) -> bytes:
        if MANIFEST_NAME not in self.sizes:
            raise _reject(f"hf repo {self.commitment.location} has no manifest.json at this revision", "manifest")
        sink = _Sink("manifest.json", MAX_MANIFEST_BYTES, budget)
        await self.net.get(self._url(MANIFEST_NAME), self.headers, sink)
        return sink.content()

    def check_listing(self, manifest: Manifest) -> None:
        """The revision holds exactly the manifest's files; sizes and LFS hashes agree up front."""
        for name in self.sizes:
            if name != MANIFEST_NAME and manifest.entry(name) is None:
                raise _reject(f"hf repo file {name!r} is not listed in the manifest", "manifest")
        for entry in manifest.files:
            if entry.name not in self.sizes:
                raise _reject(f"file {entry.name!r} listed in the manifest is missing from the hf repo", "manifest")
            size = self.sizes[entry.name]
            if size is not None and size != entry.size:
                raise _reject(f"hf repo file {entry.name!r} is {size} bytes, the manifest says {entry.size}",
                              "manifest")
            lfs = self.lfs_sha.get(entry.name)
            if lfs is not None and lfs != entry.sha256:
                raise _reject(f"hf repo file {entry.name!r} sha256 mismatch: manifest {entry.sha256[:16]}..., "
                              f"hub {str(lfs)[:16]}...", "manifest")

    async def download(self, entry: ManifestEntry, sink: _Sink) -> None:
        await self.net.get(self._url(entry.name), self.headers, sink)


async def _http_base(commitment: Commitment, localnet: bool, limits: FetchLimits) -> str:
    """`http://ip:port` to connect to. Off localnet, every address the name resolves to must be
    public, and the connection goes to the checked address (no second lookup to rebind)."""
    host, port = commitment.host, commitment.port
    if localnet:
        return f"http://{host}:{port}"
    try:
        async with asyncio.timeout(limits.connect_timeout):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as e:
        raise _reject(f"http host {host!r} cannot be resolved ({type(e).__name__})") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        problem = address_problem(address)
        if problem:
            raise _reject(f"http host {host!r} resolves to a refused address: {problem}")
    if not addresses:
        raise _reject(f"http host {host!r} resolves to no address")
    first = sorted(addresses, key=lambda a: ":" in a)[0]  # IPv4 first
    return f"http://[{first}]:{port}" if ":" in first else f"http://{first}:{port}"


# ================================================================================== fetch
async def _fetch_into(source, commitment: Commitment, hotkey: str, dest: _Destination,
                      limits: FetchLimits) -> Manifest:
    budget = _Budget(limits.total_bytes)
    raw = await source.manifest(budget)
    manifest = parse_manifest(raw)
    if not commitment.matches(manifest.model_hash, hotkey):  # before a byte of weights is downloaded
        raise _reject(unbound_reason(manifest.model_hash, commitment, hotkey), "manifest")
    declared = len(raw) + sum(e.size for e in manifest.files)
    if declared > limits.total_bytes:
        raise _reject(f"manifest declares {declared} bytes, over the total cap of {limits.total_bytes}")
    source.check_listing(manifest)
    for entry in manifest.files:
        with dest.create(entry.name) as f:
            sink = _Sink(repr(entry.name), entry.size, budget, f)
            await source.download(entry, sink)
        if sink.size != entry.size:
            raise _reject(f"{entry.name!r} ended after {sink.size} of its {entry.size} bytes (truncated)")
        if sink.sha.hexdigest() != entry.sha256:
            raise _reject(f"file {entry.name!r} sha256 mismatch: manifest {entry.sha256[:16]}..., "
                          f"received {sink.sha.hexdigest()[:16]}...", "manifest")
        dest.keep(entry.name)
    dest.write(MANIFEST_NAME, raw)
    return manifest


def _checked_commitment(commitment: Commitment | str | bytes, localnet: bool) -> Commitment:
    """The grammar (again), on this network: a Commitment built by hand gets no free pass."""
    try:
        if isinstance(commitment, (str, bytes)):  # as read from chain
            return parse_commitment(commitment, localnet=localnet)
        if not isinstance(commitment, Commitment):
            raise CommitmentRejected(f"expected a Commitment or its string, got {type(commitment).__name__}")
        return parse_commitment(encode_commitment(commitment), localnet=localnet)
    except CommitmentRejected as e:
        raise _reject(e.reason, "commitment") from None


async def fetch_submission_async(commitment: Commitment | str, dest_dir: str | os.PathLike, *, limits: FetchLimits,
                                 miner_hotkey: str, keypair=None,
                                 storage_root: str | os.PathLike | None = None, localnet: bool = False,
                                 hf_endpoint: str | None = None, hf_token: str | None = None) -> Fetched:
    """Fetch and check a submission into `dest_dir` (absent or empty). See `fetch` for arguments."""
    if not isinstance(miner_hotkey, str) or not miner_hotkey:
        raise ValueError("fetching needs the committing hotkey: the commitment binds the model to it")
    commitment = _checked_commitment(commitment, localnet)
    dest = _Destination(dest_dir)
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
            if commitment.kind == "local":
                return await _fetch_into(_LocalSource(commitment, storage_root), commitment, miner_hotkey, dest, limits)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=limits.connect_timeout,
                                            sock_read=limits.read_timeout)
            # Off localnet every name is resolved by PublicResolver, so no hop reaches a private address.
            connector = aiohttp.TCPConnector(resolver=None if localnet else PublicResolver())
            async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False, trust_env=False,
                                             connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
                pace = _Pace(limits)
                if commitment.kind == "http":
                    base = await _http_base(commitment, localnet, limits)
                    # No redirects from a miner's server: it has no reason to send one.
                    net = _Net(session, limits, pace, _Hops(yarl.URL(base), localnet, follow=False))
                    source = _HttpSource(net, commitment, keypair, miner_hotkey, base)
                else:
                    endpoint = yarl.URL(_hf_endpoint(hf_endpoint) or "https://huggingface.co")
                    net = _Net(session, limits, pace, _Hops(endpoint, localnet, follow=True))
                    source = _HfSource(net, commitment, hf_endpoint, hf_token)
                    await source.load_listing()
                return await _fetch_into(source, commitment, miner_hotkey, dest, limits)
    except TimeoutError:  # the per-request deadlines already became rejections; this is the total
        raise _reject(f"fetch not complete after the total limit of {limits.total_timeout:g}s") from None


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
