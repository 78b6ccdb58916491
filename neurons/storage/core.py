"""The fetch core every storage kind shares: what a fetch may spend (FetchLimits, Budget), how one
file arrives (Sink: capped, hashed, counted), where it lands (Destination), how a request goes over
the network (Pace, Hops, Net), and fetch_into, which reads a source's manifest, checks it against the
commitment and downloads the files it lists. A kind (neurons.storage.local, .http, .hf) supplies only
the source: `manifest(budget)`, `check_listing(manifest)`, `download(entry, sink)`.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yarl

from ..addresses import PublicResolver, RefusedAddress, address_problem
from ..checks import CheckedSubmission, StudentLimits
from ..commitment import Commitment, CommitmentRejected, encode_commitment, parse_commitment, unbound_reason
from ..manifest import MANIFEST_NAME, Manifest, SubmissionRejected, parse_manifest

CHUNK = 1 << 20
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


def reject(reason: str, stage: str = "fetch") -> SubmissionRejected:
    return SubmissionRejected(reason, stage)

class Budget:
    """Bytes left for the whole fetch; spent as they arrive, so the cap holds mid-stream."""

    def __init__(self, total: int):
        self.total, self.left = total, total

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise reject(f"download exceeds the total cap of {self.total} bytes")


class Sink:
    """One file on its way in: size-capped, hashed, counted against the budget, kept or written."""

    def __init__(self, what: str, cap: int, budget: Budget, file=None):
        self.what, self.cap, self.budget, self.file = what, cap, budget, file
        self.size, self.sha = 0, hashlib.sha256()
        self.parts: list[bytes] = []

    def declared(self, length: int | None) -> None:
        """A Content-Length over the cap is refused before a byte of the body is read."""
        if length is not None and length > self.cap:
            raise reject(f"{self.what} is announced as {length} bytes, over its {self.cap}-byte limit")

    def __call__(self, block: bytes) -> None:
        self.size += len(block)
        if self.size > self.cap:
            raise reject(f"{self.what} runs past its {self.cap}-byte limit (stopped at {self.size} bytes)")
        self.budget.spend(len(block))
        self.sha.update(block)
        if self.file is None:
            self.parts.append(block)
        else:
            self.file.write(block)

    def content(self) -> bytes:
        return b"".join(self.parts)


class Destination:
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


class Pace:
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
        return reject(f"{what}: transfer rate fell below the minimum of {self.min_rate:g} bytes/s "
                       f"({self.received} bytes in {asyncio.get_running_loop().time() - self.start:.1f}s)")


class Hops:
    """Where a request may go. `trusted` is the origin the validator chose (the Hub endpoint in
    its settings, or the address `_http_base` checked); any other origin a redirect names must be
    public (names are checked by the session's PublicResolver, literals here). `follow`: whether
    redirects are followed at all (never for a miner's own server)."""

    def __init__(self, trusted: yarl.URL, localnet: bool, follow: bool):
        self.trusted, self.localnet, self.follow = trusted.origin(), localnet, follow

    def check(self, url: yarl.URL, what: str) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise reject(f"{what}: a redirect leads to a URL that is not http(s)")
        if url.origin() == self.trusted or self.localnet:
            return
        try:
            ipaddress.ip_address(url.host)
        except ValueError:
            return  # a name: the session's resolver refuses a non-public answer
        problem = address_problem(url.host)
        if problem:
            raise reject(f"{what}: refused a redirect: {problem}")


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def _open(session: aiohttp.ClientSession, url: yarl.URL, headers: dict[str, str], limits: FetchLimits,
                hops: Hops, what: str) -> aiohttp.ClientResponse:
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
            raise reject(f"{what}: the server answered HTTP {response.status}")
        if not hops.follow:
            raise reject(f"{what}: the server answered with a redirect ({response.status}), which is refused")
        try:
            following = url.join(yarl.URL(location or ""))
        except (ValueError, TypeError):
            raise reject(f"{what}: the server answered a redirect to an invalid location") from None
        if not location:
            raise reject(f"{what}: the server answered a redirect without a location")
        if following.origin() != url.origin():  # a credential for the Hub is not for its CDN
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        url = following
    raise reject(f"{what}: more than {limits.max_redirects} redirects")


@dataclass(frozen=True)
class Net:
    """What every request of one fetch shares: the session, limits, rate floor and hop policy."""
    session: aiohttp.ClientSession
    limits: FetchLimits
    pace: Pace
    hops: Hops

    def get(self, url: str, headers: dict[str, str], sink: Sink):
        return _stream(self.session, url, headers, sink, self.limits, self.pace, self.hops)


async def _stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str], sink: Sink,
                  limits: FetchLimits, pace: Pace, hops: Hops) -> None:
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
        raise reject(f"{what}: timed out connecting or waiting {limits.read_timeout:g}s for data") from None
    except TimeoutError:
        if floor is not None and floor.expired():
            raise pace.refusal(what) from None
        raise reject(f"{what}: not complete after the per-request limit of {limits.request_timeout:g}s") from None
    except aiohttp.ClientConnectorError as e:
        if isinstance(e.os_error, RefusedAddress):
            raise reject(f"{what}: {e.os_error}") from None
        # nothing answered: maybe down for a minute, not hostile
        raise SourceUnavailable(f"{what}: cannot connect ({type(e.os_error).__name__})", "fetch") from None
    except (aiohttp.ClientError, OSError) as e:
        # the type only: aiohttp's messages can quote the server's status line or headers
        raise reject(f"{what}: download failed ({type(e).__name__})") from None

@asynccontextmanager
async def client_session(limits: FetchLimits, localnet: bool):
    """The aiohttp session one fetch over the network uses: no decompression, no proxies from the
    environment, no cookies, the limits' connect and read timeouts."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=limits.connect_timeout, sock_read=limits.read_timeout)
    # Off localnet every name is resolved by PublicResolver, so no hop reaches a private address.
    connector = aiohttp.TCPConnector(resolver=None if localnet else PublicResolver())
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False, trust_env=False,
                                     connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def fetch_into(source, commitment: Commitment, hotkey: str, dest: Destination,
                      limits: FetchLimits) -> Manifest:
    budget = Budget(limits.total_bytes)
    raw = await source.manifest(budget)
    manifest = parse_manifest(raw)
    if not commitment.matches(manifest.model_hash, hotkey):  # before a byte of weights is downloaded
        raise reject(unbound_reason(manifest.model_hash, commitment, hotkey), "manifest")
    declared = len(raw) + sum(e.size for e in manifest.files)
    if declared > limits.total_bytes:
        raise reject(f"manifest declares {declared} bytes, over the total cap of {limits.total_bytes}")
    source.check_listing(manifest)
    for entry in manifest.files:
        with dest.create(entry.name) as f:
            sink = Sink(repr(entry.name), entry.size, budget, f)
            await source.download(entry, sink)
        if sink.size != entry.size:
            raise reject(f"{entry.name!r} ended after {sink.size} of its {entry.size} bytes (truncated)")
        if sink.sha.hexdigest() != entry.sha256:
            raise reject(f"file {entry.name!r} sha256 mismatch: manifest {entry.sha256[:16]}..., "
                          f"received {sink.sha.hexdigest()[:16]}...", "manifest")
        dest.keep(entry.name)
    dest.write(MANIFEST_NAME, raw)
    return manifest


def checked_commitment(commitment: Commitment | str | bytes, localnet: bool) -> Commitment:
    """The grammar (again), on this network: a Commitment built by hand gets no free pass."""
    try:
        if isinstance(commitment, (str, bytes)):  # as read from chain
            return parse_commitment(commitment, localnet=localnet)
        if not isinstance(commitment, Commitment):
            raise CommitmentRejected(f"expected a Commitment or its string, got {type(commitment).__name__}")
        return parse_commitment(encode_commitment(commitment), localnet=localnet)
    except CommitmentRejected as e:
        raise reject(e.reason, "commitment") from None


