"""A replay store for `bittensor.http_auth.verify` that survives a restart of the miner's server.

An in-memory store forgets every nonce when the process restarts, so a request captured just
before a restart could be replayed just after it while still fresh. This one keeps each accepted
(hotkey, nonce) in a small SQLite file until its freshness window has passed (`retention`, in
wall-clock seconds, since a nonce's freshness is judged against the wall clock too).
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

PRUNE_EVERY = 256  # inserts between deletions of expired rows


class SqliteNonceStore:
    def __init__(self, path: str | Path, retention: float):
        self.path, self.retention = Path(path), retention
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS nonces (hotkey TEXT NOT NULL, nonce INTEGER NOT NULL, "
                           "expires REAL NOT NULL, PRIMARY KEY (hotkey, nonce))")
        self._inserts = 0

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        """True (and remembered) the first time a (hotkey, nonce) is seen, False after."""
        now = time.time()
        with self._lock:
            # committed before the request is served: a crash after this cannot forget the nonce
            inserted = self._conn.execute("INSERT OR IGNORE INTO nonces VALUES (?, ?, ?)",
                                          (hotkey_ss58, nonce_ns, now + self.retention)).rowcount == 1
            self._inserts += inserted
            if self._inserts >= PRUNE_EVERY:
                self._conn.execute("DELETE FROM nonces WHERE expires < ?", (now,))
                self._inserts = 0
        return inserted

    def close(self) -> None:
        with self._lock:
            self._conn.close()
