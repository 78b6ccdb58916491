"""LocalChain: the embedded default `Chain`, one SQLite file shared by every localnet process.

Miners and the validator run as separate processes on one file, so:
- the file is in WAL mode (readers never block the single writer) and every write is one
  `BEGIN IMMEDIATE` transaction: checks and insert see the same state, nothing half-applied;
- each thread of each process gets its own connection (SQLite connections must not cross threads
  or a fork), kept open because closing a WAL database's last connection checkpoints it: a
  connection per call cost ~20 ms a write. The object pickles as its path and re-connects;
- whatever must agree across processes (block clock, genesis secret, limits) lives in the file,
  not in constructor arguments.

Writes are authenticated like on chain: the hotkey's sr25519 key signs (genesis hash, netuid,
kind, hotkey, payload, block) and the chain verifies that signature against the hotkey's ss58
address before applying anything. The named block must be recent (`SIGNATURE_TTL_BLOCKS`) and a
signature is accepted once, so a captured write can neither be replayed later nor forged by
someone holding only the public key.

Block clock: block = offset + whole `block_time` periods elapsed since genesis. With
`block_time=None` the chain only moves through `advance(n)` (tests, deterministic); with a
`block_time` it ticks with wall time (localnet) and `advance(n)` still fast-forwards it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from bittensor.sp_core import CRYPTO_SR25519, Keypair, ss58_decode, verify

from neurons.chain import (
    ChainError,
    CommitmentRecord,
    InvalidSignature,
    InvalidWrite,
    Metagraph,
    NotPermitted,
    SealedCommit,
    check_commitment,
    normalize_weights,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: sealed commitments (commitments.reveal_block)
# A signed write must land within this many blocks of the block it names (like a mortal
# extrinsic's era): long enough for a write queued behind other processes' writes while the clock
# moves, short enough that old signatures expire.
SIGNATURE_TTL_BLOCKS = 64
# Genesis parameters used when a file is created; openers of an existing file read them from it.
# 100 blocks between weight writes is the SN24 mainnet value; 256 uids is the usual subnet size.
GENESIS_DEFAULTS = {"max_uids": 256, "weights_rate_limit": 100, "min_validator_stake": 1.0}

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS registrations (
        uid INTEGER PRIMARY KEY, hotkey TEXT NOT NULL UNIQUE, coldkey TEXT NOT NULL,
        stake REAL NOT NULL, block INTEGER NOT NULL)""",
    # Every commitment is kept (the earliest commitment of a model hash owns it); the latest row
    # per hotkey is its current commitment. The UNIQUE signature is the replay guard.
    # reveal_block: a sealed commitment is unreadable before it (NULL: readable at once).
    """CREATE TABLE IF NOT EXISTS commitments (
        id INTEGER PRIMARY KEY AUTOINCREMENT, hotkey TEXT NOT NULL, data TEXT NOT NULL,
        block INTEGER NOT NULL, signature BLOB NOT NULL UNIQUE, reveal_block INTEGER)""",
    "CREATE INDEX IF NOT EXISTS commitments_by_hotkey ON commitments (hotkey, id)",
    """CREATE TABLE IF NOT EXISTS weights (
        id INTEGER PRIMARY KEY AUTOINCREMENT, hotkey TEXT NOT NULL, block INTEGER NOT NULL,
        weights TEXT NOT NULL, signature BLOB NOT NULL UNIQUE)""",
    "CREATE INDEX IF NOT EXISTS weights_by_hotkey ON weights (hotkey, block)",
)


@dataclass(frozen=True)
class SignedWrite:
    """One write as it travels to the chain: what, by whom, at which block, and the proof."""

    kind: str  # "register" | "commit" | "weights"
    hotkey: str
    payload: str
    block: int
    signature: bytes


def write_message(genesis_hash: str, netuid: int, kind: str, hotkey: str, payload: str, block: int) -> bytes:
    """The exact bytes a write's signature covers.

    Canonical JSON so the same fields always give the same bytes; the genesis hash binds the
    signature to one chain file and the domain prefix keeps it from meaning anything elsewhere.
    """
    fields = [genesis_hash, netuid, kind, hotkey, payload, block]
    return b"quasar-localchain/v1:" + json.dumps(fields, separators=(",", ":")).encode()


class LocalChain:
    """SQLite-backed `neurons.chain.Chain`. See the module docstring for the design."""

    def __init__(
        self,
        path: str | Path,
        netuid: int = 24,
        block_time: float | None = None,
        *,
        max_uids: int | None = None,
        weights_rate_limit: int | None = None,
        min_validator_stake: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Every process and thread opens its own connection, so ":memory:" would mean many chains.
        self.path = Path(path)
        if str(path) == ":memory:":
            raise ValueError("LocalChain needs a file path (several processes share it)")
        if block_time is not None and not (block_time > 0 and math.isfinite(block_time)):
            raise ValueError(f"block_time must be a positive number of seconds, got {block_time}")
        self._clock = clock
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        wanted = {"netuid": netuid, "block_time": block_time, "max_uids": max_uids,
                  "weights_rate_limit": weights_rate_limit, "min_validator_stake": min_validator_stake}
        meta = self._open_or_create(wanted)
        if int(meta["schema"]) != SCHEMA_VERSION:
            raise ValueError(f"{self.path}: schema {meta['schema']}, this code reads {SCHEMA_VERSION}")
        self._netuid = int(meta["netuid"])
        self._secret = bytes.fromhex(meta["genesis_secret"])
        self._genesis_time = float(meta["genesis_time"])
        self._block_time = None if meta["block_time"] == "none" else float(meta["block_time"])
        self._max_uids = int(meta["max_uids"])
        self._rate_limit = int(meta["weights_rate_limit"])
        self._min_validator_stake = float(meta["min_validator_stake"])
        # An opener asking for different genesis parameters would silently disagree with the
        # other processes about blocks or limits; refuse instead.
        stored = {"netuid": self._netuid, "block_time": self._block_time, "max_uids": self._max_uids,
                  "weights_rate_limit": self._rate_limit, "min_validator_stake": self._min_validator_stake}
        for key, value in wanted.items():
            if value is not None and value != stored[key]:
                raise ValueError(f"{self.path} was created with {key}={stored[key]}, not {value}")

    def __repr__(self) -> str:
        return f"LocalChain({str(self.path)!r}, netuid={self._netuid}, block_time={self._block_time})"

    # ---- storage plumbing -------------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_local"] = None  # connections stay in the process that opened them
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly one
        # `with self._tx()` block. timeout: wait for the other processes' writes instead of failing.
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        # NORMAL is durable against process crashes in WAL mode, which is what localnet needs.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        # Keyed by pid too: after fork the child inherits the parent's thread-local but must not
        # touch its connection (it is abandoned, not closed, so the parent's locks are untouched).
        cached = getattr(self._local, "conn", None)
        if cached is None or cached[0] != os.getpid():
            cached = (os.getpid(), self._connect())
            self._local.conn = cached
        return cached[1]

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so check-then-insert cannot interleave with
        # another process; a plain BEGIN gives reads one consistent snapshot.
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # never leave the cached connection mid-transaction
                conn.execute("ROLLBACK")
            raise

    def _open_or_create(self, wanted: dict) -> dict[str, str]:
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent: set once, holds for every process
            conn.execute("BEGIN IMMEDIATE")  # concurrent creators serialise here; first one wins
            for stmt in _SCHEMA:
                conn.execute(stmt)
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            if not meta:
                bt = wanted["block_time"]
                meta = {
                    "schema": str(SCHEMA_VERSION),
                    "netuid": str(int(wanted["netuid"])),
                    "genesis_secret": secrets.token_hex(32),
                    "genesis_time": repr(float(self._clock())),
                    "block_time": "none" if bt is None else repr(float(bt)),
                    "block_offset": "0",
                }
                for key, default in GENESIS_DEFAULTS.items():
                    value = wanted[key] if wanted[key] is not None else default
                    meta[key] = repr(float(value)) if isinstance(default, float) else str(int(value))
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
            conn.execute("COMMIT")
            return meta
        finally:
            conn.close()

    # ---- block clock ------------------------------------------------------------------------

    def _block_in(self, conn: sqlite3.Connection) -> int:
        (offset,) = conn.execute("SELECT value FROM meta WHERE key = 'block_offset'").fetchone()
        block = int(offset)
        if self._block_time is not None:
            # max(0, ...): a wall clock stepped backwards must not make blocks go backwards past genesis.
            block += max(0, math.floor((self._clock() - self._genesis_time) / self._block_time))
        return block

    @property
    def netuid(self) -> int:
        return self._netuid

    @property
    def block_time(self) -> float | None:
        """Seconds per block, or None when the clock only moves through `advance`."""
        return self._block_time

    def block(self) -> int:
        with self._tx() as conn:
            return self._block_in(conn)

    def advance(self, n: int = 1) -> int:
        """Move the clock forward n blocks (for every process sharing the file); returns the new block."""
        if not isinstance(n, int) or n < 0:
            raise ValueError("blocks only move forward: n must be an int >= 0")
        with self._tx(write=True) as conn:
            conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'block_offset'", (n,))
            return self._block_in(conn)

    def block_hash(self, block: int) -> str:
        """Deterministic per chain file, unpredictable without its genesis secret, and like a real
        chain only defined for blocks that already exist (a future hash would leak round seeds)."""
        if not isinstance(block, int) or block < 0:
            raise ValueError(f"bad block number {block!r}")
        current = self.block()
        if block > current:
            raise ValueError(f"block {block} does not exist yet (current block {current})")
        return self._hash(block)

    def _hash(self, block: int) -> str:
        return "0x" + hashlib.sha256(self._secret + block.to_bytes(8, "big")).hexdigest()

    @property
    def genesis_hash(self) -> str:
        """Block 0's hash: names this chain file (signatures are bound to it)."""
        return self._hash(0)

    # ---- reads ------------------------------------------------------------------------------

    def _permit(self, stake: float) -> bool:
        # Localnet rule: a validator permit is stake >= min_validator_stake (miners register with 0).
        return stake >= self._min_validator_stake

    def metagraph(self) -> Metagraph:
        with self._tx() as conn:
            block = self._block_in(conn)
            rows = conn.execute("SELECT uid, hotkey, coldkey, stake FROM registrations ORDER BY uid").fetchall()
        return Metagraph(
            netuid=self._netuid,
            block=block,
            uids=tuple(r[0] for r in rows),
            hotkeys=tuple(r[1] for r in rows),
            coldkeys=tuple(r[2] for r in rows),
            stakes=tuple(float(r[3]) for r in rows),
            validator_permit=tuple(self._permit(float(r[3])) for r in rows),
        )

    def commitments(self) -> dict[str, CommitmentRecord]:
        """Each hotkey's latest commitment; none for a hotkey whose latest is still sealed (as on
        chain, a new commitment replaces the old one, so the old one is not shown instead)."""
        with self._tx() as conn:
            block = self._block_in(conn)
            rows = conn.execute(
                """SELECT c.hotkey, r.uid, c.data, c.block FROM commitments c
                   JOIN (SELECT MAX(id) AS id FROM commitments GROUP BY hotkey) latest ON c.id = latest.id
                   LEFT JOIN registrations r ON r.hotkey = c.hotkey
                   WHERE c.reveal_block IS NULL OR c.reveal_block <= ?""", (block,)
            ).fetchall()
        return {row[0]: CommitmentRecord(*row) for row in rows}

    def commitment_history(self, hotkey: str) -> list[CommitmentRecord]:
        """Every readable commitment the hotkey made, oldest first."""
        with self._tx() as conn:
            rows = conn.execute(
                """SELECT c.hotkey, r.uid, c.data, c.block FROM commitments c
                   LEFT JOIN registrations r ON r.hotkey = c.hotkey
                   WHERE c.hotkey = ? AND (c.reveal_block IS NULL OR c.reveal_block <= ?) ORDER BY c.id""",
                (hotkey, self._block_in(conn)),
            ).fetchall()
        return [CommitmentRecord(*row) for row in rows]

    def weights_rate_limit(self) -> int:
        return self._rate_limit

    def last_weights_block(self, hotkey: str) -> int | None:
        with self._tx() as conn:
            return self._last_weights_in(conn, hotkey)

    @staticmethod
    def _last_weights_in(conn: sqlite3.Connection, hotkey: str) -> int | None:
        (block,) = conn.execute("SELECT MAX(block) FROM weights WHERE hotkey = ?", (hotkey,)).fetchone()
        return block

    def weights(self) -> dict[int, dict[int, float]]:
        """validator uid -> {uid: weight} of its last accepted weight write (normalised)."""
        with self._tx() as conn:
            rows = conn.execute(
                """SELECT r.uid, w.weights FROM weights w
                   JOIN (SELECT MAX(id) AS id FROM weights GROUP BY hotkey) latest ON w.id = latest.id
                   JOIN registrations r ON r.hotkey = w.hotkey ORDER BY r.uid""").fetchall()
        return {uid: {int(u): v for u, v in json.loads(row).items()} for uid, row in rows}

    def latest_weights(self, hotkey: str) -> dict[int, float] | None:
        """The normalised uid -> weight vector of the hotkey's last accepted weight write."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT weights FROM weights WHERE hotkey = ? ORDER BY id DESC LIMIT 1", (hotkey,)
            ).fetchone()
        return None if row is None else {int(uid): w for uid, w in json.loads(row[0]).items()}

    # ---- writes -----------------------------------------------------------------------------

    def sign(self, keypair: Keypair, kind: str, payload: str) -> SignedWrite:
        """What a client does before sending a write: name the current block and sign."""
        if keypair.crypto_type != CRYPTO_SR25519:
            raise InvalidSignature("hotkeys sign with sr25519")
        block = self.block()
        message = write_message(self.genesis_hash, self._netuid, kind, keypair.ss58_address, payload, block)
        try:
            signature = bytes(keypair.sign(message))
        except ValueError as exc:  # a public-key-only Keypair has nothing to sign with
            raise InvalidSignature(f"{keypair.ss58_address} cannot sign: {exc}") from None
        return SignedWrite(kind, keypair.ss58_address, payload, block, signature)

    def register(self, keypair: Keypair, coldkey_ss58: str, stake: float = 0.0) -> int:
        """Register keypair's hotkey; returns its uid. `stake` decides the validator permit."""
        payload = json.dumps({"coldkey": coldkey_ss58, "stake": float(stake)}, sort_keys=True)
        return self.submit(self.sign(keypair, "register", payload))

    def commit(self, keypair: Keypair, data: str) -> int:
        check_commitment(data)  # refuse early, before signing; submit checks again
        return self.submit(self.sign(keypair, "commit", data))

    def commit_sealed(self, keypair: Keypair, data: str, *, reveal_in_blocks: int) -> SealedCommit:
        """Commit `data` unreadable (to `commitments()`, by anyone) until `reveal_in_blocks` after
        the block it lands in: the local stand-in for a timelocked commitment. Nothing is encrypted;
        the file is local, and what is tested is who can read what, when."""
        if isinstance(reveal_in_blocks, bool) or not isinstance(reveal_in_blocks, int) or reveal_in_blocks <= 0:
            raise ValueError(f"reveal_in_blocks must be a positive int, got {reveal_in_blocks!r}")
        check_commitment(data)
        payload = json.dumps({"data": data, "reveal_in_blocks": reveal_in_blocks}, sort_keys=True)
        block = self.submit(self.sign(keypair, "commit_sealed", payload))
        return SealedCommit(block, block + reveal_in_blocks)

    def set_weights(self, keypair: Keypair, uids: list[int], weights: list[float]) -> bool:
        """True when accepted; False when fewer than `weights_rate_limit()` blocks passed since
        this hotkey's last accepted write. Other refusals raise (see neurons.chain)."""
        normalize_weights(uids, weights)  # refuse NaN / negative / mismatch before signing
        payload = json.dumps({"uids": [int(u) for u in uids], "weights": [float(w) for w in weights]})
        return self.submit(self.sign(keypair, "weights", payload))

    def submit(self, write: SignedWrite) -> int | bool:
        """Verify and apply one signed write: register -> uid, commit -> block, weights -> bool."""
        appliers = {"register": self._apply_register, "commit": self._apply_commit,
                    "commit_sealed": self._apply_commit_sealed, "weights": self._apply_weights}
        if write.kind not in appliers:
            raise InvalidWrite(f"unknown write kind {write.kind!r}")
        message = write_message(self.genesis_hash, self._netuid, write.kind, write.hotkey, write.payload, write.block)
        try:
            valid = verify(message, write.signature, write.hotkey)
        except (ValueError, TypeError) as exc:  # malformed ss58 address or signature bytes
            raise InvalidSignature(f"unverifiable write from {write.hotkey!r}: {exc}") from None
        if not valid:
            raise InvalidSignature(f"{write.kind} write is not signed by {write.hotkey}")
        try:
            with self._tx(write=True) as conn:
                block = self._block_in(conn)
                if not block - SIGNATURE_TTL_BLOCKS <= write.block <= block:
                    raise InvalidSignature(f"write signed for block {write.block}, chain is at {block}")
                return appliers[write.kind](conn, write, block)
        except sqlite3.IntegrityError as exc:
            if "signature" in str(exc):
                raise InvalidSignature("signature already used (replayed write)") from None
            raise

    def _registration(self, conn: sqlite3.Connection, hotkey: str) -> tuple[int, float] | None:
        return conn.execute("SELECT uid, stake FROM registrations WHERE hotkey = ?", (hotkey,)).fetchone()

    def _apply_register(self, conn: sqlite3.Connection, write: SignedWrite, block: int) -> int:
        try:
            body = json.loads(write.payload)
            coldkey, stake = str(body["coldkey"]), float(body["stake"])
            ss58_decode(coldkey)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidWrite(f"bad registration: {exc}") from None
        if not math.isfinite(stake) or stake < 0:
            raise InvalidWrite(f"stake must be finite and >= 0, got {stake}")
        if self._registration(conn, write.hotkey) is not None:
            raise InvalidWrite(f"hotkey {write.hotkey} is already registered")
        (count,) = conn.execute("SELECT COUNT(*) FROM registrations").fetchone()
        if count >= self._max_uids:
            raise ChainError(f"subnet is full ({self._max_uids} uids)")
        # No deregistration on the local chain, so uids are dense: the next uid is the count.
        conn.execute(
            "INSERT INTO registrations (uid, hotkey, coldkey, stake, block) VALUES (?, ?, ?, ?, ?)",
            (count, write.hotkey, coldkey, stake, block),
        )
        return count

    def _apply_commit(self, conn: sqlite3.Connection, write: SignedWrite, block: int,
                      data: str | None = None, reveal_block: int | None = None) -> int:
        data = write.payload if data is None else data
        check_commitment(data)
        if self._registration(conn, write.hotkey) is None:
            raise NotPermitted(f"hotkey {write.hotkey} is not registered on netuid {self._netuid}")
        conn.execute(
            "INSERT INTO commitments (hotkey, data, block, signature, reveal_block) VALUES (?, ?, ?, ?, ?)",
            (write.hotkey, data, block, write.signature, reveal_block),
        )
        return block

    def _apply_commit_sealed(self, conn: sqlite3.Connection, write: SignedWrite, block: int) -> int:
        try:
            body = json.loads(write.payload)
            data, delay = body["data"], body["reveal_in_blocks"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidWrite(f"bad sealed commitment: {exc}") from None
        if isinstance(delay, bool) or not isinstance(delay, int) or delay <= 0:
            raise InvalidWrite(f"reveal_in_blocks must be a positive int, got {delay!r}")
        return self._apply_commit(conn, write, block, data=data, reveal_block=block + delay)

    def _apply_weights(self, conn: sqlite3.Connection, write: SignedWrite, block: int) -> bool:
        reg = self._registration(conn, write.hotkey)
        if reg is None:
            raise NotPermitted(f"hotkey {write.hotkey} is not registered on netuid {self._netuid}")
        if not self._permit(float(reg[1])):
            raise NotPermitted(f"hotkey {write.hotkey} has no validator permit (stake {reg[1]})")
        try:
            body = json.loads(write.payload)
            vector = normalize_weights(body["uids"], body["weights"])
        except (ValueError, KeyError, TypeError) as exc:  # InvalidWrite is a ValueError
            raise InvalidWrite(f"bad weights: {exc}") from None
        (count,) = conn.execute("SELECT COUNT(*) FROM registrations").fetchone()
        unknown = [uid for uid in vector if uid >= count]
        if unknown:
            raise InvalidWrite(f"weights name unregistered uids {unknown}")
        last = self._last_weights_in(conn, write.hotkey)
        if last is not None and block - last < self._rate_limit:
            log.info("weights from %s refused: rate limit (last %d, now %d, limit %d)",
                     write.hotkey, last, block, self._rate_limit)
            return False
        conn.execute(
            "INSERT INTO weights (hotkey, block, weights, signature) VALUES (?, ?, ?, ?)",
            (write.hotkey, block, json.dumps({str(u): w for u, w in vector.items()}), write.signature),
        )
        return True
