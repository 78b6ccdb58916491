"""The miner's checkpoint server: published checkpoints over HTTP, to registered validators only.

    GET /checkpoint/{token}/{name}      name: manifest.json or a file the manifest lists

Every request must be signed with `bittensor.http_auth` (btauth/1) by a hotkey the caller's
`is_validator` accepts, bound to this miner's hotkey, fresh and never seen before. Refusals:

    401  unsigned, malformed, forged, stale or replayed request
    403  signed for another miner, or not a registered validator
    429  the hotkey is over its request rate or concurrent-download limit (Retry-After given)
    404  unknown token or a name the manifest does not list (there is no listing of any kind)

The checks run cheapest first and the rate limit comes after the signature, so nobody can spend
a validator's budget by claiming its hotkey. Nothing outside a manifest is ever served: names
are looked up in the manifest, never joined onto a path unchecked, and files are opened without
following symlinks. The served directory must stay unchanged while published; a file whose size
no longer matches its manifest is refused (410) rather than sent.

The server runs its own event loop in a daemon thread (`start()` / `stop()`), so a miner's
synchronous training loop can publish without adopting asyncio.
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aiohttp import web
from bittensor import http_auth

from .commitment import _TOKEN as TOKEN_PATTERN  # the commitment grammar's token: one spelling everywhere
from .manifest import (
    MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, parse_manifest, read_small_file, verify_manifest,
)
from .nonces import SqliteNonceStore

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_TOKENS = 64  # published checkpoints held at once; old ones should be unregistered
_AUTH_HEADERS = (http_auth.HEADER_VERSION, http_auth.HEADER_HOTKEY, http_auth.HEADER_RECEIVER,
                 http_auth.HEADER_NONCE, http_auth.HEADER_CRYPTO, http_auth.HEADER_SIGNATURE)


@dataclass(frozen=True)
class Published:
    directory: Path
    manifest: Manifest
    manifest_bytes: bytes  # served from memory: exactly the bytes that were verified


class RateLimiter:
    """Per-hotkey token bucket (`burst` requests, refilled at `per_second`) and stream cap.

    Only authenticated, allowed hotkeys get a bucket, so the table is bounded by the validator set.
    """

    def __init__(self, per_second: float, burst: int, max_streams: int, clock: Callable[[], float] = time.monotonic):
        self.per_second, self.burst, self.max_streams, self.clock = per_second, burst, max_streams, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # hotkey -> (tokens, last refill time)
        self._streams: dict[str, int] = {}

    def take(self, hotkey: str) -> float:
        """0 when the request may go ahead, else the seconds until one token is back."""
        now = self.clock()
        tokens, last = self._buckets.get(hotkey, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
        if tokens < 1.0:
            self._buckets[hotkey] = (tokens, now)
            return (1.0 - tokens) / self.per_second if self.per_second > 0 else 3600.0
        self._buckets[hotkey] = (tokens - 1.0, now)
        return 0.0

    def open_stream(self, hotkey: str) -> bool:
        if self._streams.get(hotkey, 0) >= self.max_streams:
            return False
        self._streams[hotkey] = self._streams.get(hotkey, 0) + 1
        return True

    def close_stream(self, hotkey: str) -> None:
        left = self._streams.get(hotkey, 1) - 1
        if left > 0:
            self._streams[hotkey] = left
        else:
            self._streams.pop(hotkey, None)


def _refuse(status: int, reason: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=reason + "\n", headers={"Cache-Control": "no-store", **headers})


class CheckpointServer:
    """Serves registered checkpoints to validators. `is_validator(ss58) -> bool` must be cheap.

    `host`/`port` are the bind address (port 0: an ephemeral port, read back from `.port`).
    `nonce_path`: the replay store's SQLite file (a miner's work dir); None keeps it in memory,
    which a restart forgets.
    """

    def __init__(self, hotkey_ss58: str, is_validator: Callable[[str], bool], *, host: str = "127.0.0.1",
                 port: int = 0, requests_per_second: float = 1.0, burst: int = 60, max_streams: int = 4,
                 max_age: float = http_auth.DEFAULT_MAX_AGE, allowed_skew: float = http_auth.DEFAULT_ALLOWED_SKEW,
                 nonce_path: str | os.PathLike | None = None):
        self.hotkey_ss58 = hotkey_ss58
        self.is_validator = is_validator
        self.host, self.port = host, port
        self.max_age, self.allowed_skew = max_age, allowed_skew
        # Retention covers the whole freshness window, or a replay inside the gap would pass; on
        # disk (`nonce_path`), so a request captured before a restart cannot be replayed after it.
        retention = max(60.0, 2 * (max_age + allowed_skew))
        self._nonces = (http_auth.InMemoryNonceStore(retention=retention) if nonce_path is None
                        else SqliteNonceStore(nonce_path, retention))
        self._limiter = RateLimiter(requests_per_second, burst, max_streams)
        self._published: dict[str, Published] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ publishing
    def register(self, token: str, directory: str | os.PathLike) -> Manifest:
        """Serve `directory` under `token`. Verifies every file against its manifest first."""
        if not isinstance(token, str) or not TOKEN_PATTERN.fullmatch(token):
            raise ValueError(f"token {token!r} is not 1-24 [A-Za-z0-9._-] characters starting alphanumeric")
        directory = Path(directory)
        raw = read_small_file(directory / MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest.json")
        manifest = parse_manifest(raw)
        verify_manifest(directory, manifest)  # a miner learns of a broken checkpoint now, not from validators
        with self._lock:
            if token not in self._published and len(self._published) >= MAX_TOKENS:
                raise ValueError(f"already serving {MAX_TOKENS} checkpoints; unregister old ones first")
            self._published[token] = Published(directory, manifest, raw)
        return manifest

    def unregister(self, token: str) -> None:
        with self._lock:
            self._published.pop(token, None)

    # ------------------------------------------------------------------ requests
    def _authenticate(self, request: web.Request) -> str | web.Response:
        """The caller's verified hotkey, or the refusal to send."""
        claimed = request.headers.getall(http_auth.HEADER_HOTKEY, [])
        if not claimed:
            return _refuse(401, f"request is not signed (no {http_auth.HEADER_HOTKEY} header)")
        # A repeated auth header could make the allow-list and the verifier read different copies.
        if any(len(request.headers.getall(h, [])) > 1 for h in _AUTH_HEADERS):
            return _refuse(400, "an authentication header is repeated")
        try:
            allowed = bool(self.is_validator(claimed[0]))
        except Exception:  # the caller's validator list failing must not open the door
            log.exception("is_validator failed")
            return _refuse(503, "validator list unavailable")
        if not allowed:  # before the signature check: spam from strangers costs a lookup, not a verify
            return _refuse(403, "hotkey is not a registered validator")
        if request.body_exists:
            return _refuse(400, "GET requests carry no body")
        try:
            caller = http_auth.verify(
                request.headers, b"", method=request.method, path=request.raw_path,
                self_hotkey_ss58=self.hotkey_ss58, max_age=self.max_age, allowed_skew=self.allowed_skew,
                nonce_store=self._nonces)
        except http_auth.WrongReceiver as e:
            return _refuse(403, f"signature refused: {e}")
        except http_auth.AuthError as e:  # malformed, stale, forged, replayed: the message says which
            return _refuse(401, f"signature refused: {e}")
        if caller.hotkey_ss58 != claimed[0]:  # cannot happen with one header each; checked all the same
            return _refuse(401, "signature refused: verified hotkey differs from the claimed one")
        return caller.hotkey_ss58

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        who = self._authenticate(request)
        if isinstance(who, web.Response):
            # debug, not info: a flood of refused requests must not become a flood of log lines
            log.debug("refused %s %s from %s: %s", request.method, request.raw_path[:200], request.remote,
                      who.text.strip())
            return who
        wait = self._limiter.take(who)
        if wait:
            return _refuse(429, "rate limit: too many requests from this hotkey",
                           **{"Retry-After": str(int(wait) + 1)})
        with self._lock:
            published = self._published.get(request.match_info["token"])
        name = request.match_info["name"]
        if published is None:
            return _refuse(404, "no such checkpoint")
        if name == MANIFEST_NAME:
            return web.Response(body=published.manifest_bytes, content_type="application/json",
                                headers={"Cache-Control": "no-store"})
        entry = published.manifest.entry(name)
        if entry is None:
            return _refuse(404, "no such file in this checkpoint")
        if not self._limiter.open_stream(who):
            return _refuse(429, "rate limit: too many concurrent downloads for this hotkey", **{"Retry-After": "5"})
        try:
            return await self._send_file(request, published.directory / entry.name, entry.size)
        finally:
            self._limiter.close_stream(who)

    async def _send_file(self, request: web.Request, path: Path, size: int) -> web.StreamResponse:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return _refuse(410, "file is gone since it was published")
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                return _refuse(410, "file changed since it was published")
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                                   "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
            response.content_length = size
            await response.prepare(request)
            left = size
            while left > 0:  # never more than the manifest's size, even if the file grew since
                block = await asyncio.to_thread(f.read, min(CHUNK, left))
                if not block:
                    break  # shrank under us: the validator sees a short file and refuses it
                await response.write(block)
                left -= len(block)
            await response.write_eof()
            return response

    # ------------------------------------------------------------------ lifecycle
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1024)
        app.router.add_get("/checkpoint/{token}/{name}", self._handle, allow_head=False)
        return app

    async def _start(self) -> None:
        # A short shutdown grace: a validator stalled mid-download must not hold up stop().
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> "CheckpointServer":
        """Bind and serve from a background thread; returns once the port is open."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start())
            except BaseException as e:  # surfaced to start()'s caller, not lost in the thread
                failure.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="checkpoint-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._thread = self._loop = self._runner = None

    def __enter__(self) -> "CheckpointServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
