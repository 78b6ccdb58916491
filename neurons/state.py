"""The validator's state: one SQLite file (WAL) holding everything a round did.

A round moves through phases, each committed in one transaction, so a validator killed at any
moment restarts at the first phase it had not committed and redoes only that:

    fetch     every eligible commitment fetched and checked (accepted or rejected with a reason)
    evaluate  one stored result per (round, hotkey); evaluations already stored are not rerun
    score     composites, gates, the leader and the new per-hotkey EMA, written together
    weights   the weights sent (or refused by the rate limit)
    done

The EMA and the round's scores are written in the same transaction that moves the round to
`weights`, so a crash can neither lose an update nor apply it twice.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PHASES = ("fetch", "evaluate", "score", "weights", "done")

# The file's layout, stored as `PRAGMA user_version`: files written before it was versioned read 0.
# A file is brought to SCHEMA_VERSION by MIGRATIONS[v] for each v above its own, all in one
# transaction; a file newer than this code is refused (an older validator must not write into a
# layout it does not know).
SCHEMA_VERSION = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rounds (
        id INTEGER PRIMARY KEY AUTOINCREMENT, sync_block INTEGER NOT NULL UNIQUE, block_hash TEXT NOT NULL,
        seed INTEGER NOT NULL, competition TEXT NOT NULL, phase TEXT NOT NULL,
        started REAL NOT NULL, finished REAL, leader TEXT, leader_hash TEXT, stack TEXT)""",
    # One row per (hotkey, commitment string) ever seen: fetched once, whatever happens later.
    """CREATE TABLE IF NOT EXISTS submissions (
        hotkey TEXT NOT NULL, commitment TEXT NOT NULL, model_hash TEXT, commit_block INTEGER NOT NULL,
        status TEXT NOT NULL, stage TEXT, reason TEXT, path TEXT, round_id INTEGER NOT NULL,
        PRIMARY KEY (hotkey, commitment))""",
    """CREATE TABLE IF NOT EXISTS results (
        round_id INTEGER NOT NULL, hotkey TEXT NOT NULL, model_hash TEXT NOT NULL, result TEXT NOT NULL,
        PRIMARY KEY (round_id, hotkey))""",
    """CREATE TABLE IF NOT EXISTS scores (
        round_id INTEGER NOT NULL, hotkey TEXT NOT NULL, uid INTEGER, model_hash TEXT NOT NULL,
        composite REAL NOT NULL, gate TEXT, rank INTEGER NOT NULL, axes TEXT NOT NULL,
        PRIMARY KEY (round_id, hotkey))""",
    "CREATE TABLE IF NOT EXISTS ema (hotkey TEXT PRIMARY KEY, value REAL NOT NULL, round_id INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS weights (
        round_id INTEGER PRIMARY KEY, block INTEGER NOT NULL, weights TEXT NOT NULL, accepted INTEGER NOT NULL)""",
    # evaluations started per (round, model hash): one that never finished was cut short by the
    # validator dying, so the count says how often a submission's evaluation took the validator down
    """CREATE TABLE IF NOT EXISTS eval_attempts (
        round_id INTEGER NOT NULL, model_hash TEXT NOT NULL, attempts INTEGER NOT NULL,
        PRIMARY KEY (round_id, model_hash))""",
)


def _to_v1(c: sqlite3.Connection) -> None:
    """A new file, or an unversioned one (any layout the code wrote before versions): the tables,
    and the column added last before versions (rounds.stack, the evaluation stack)."""
    for stmt in _SCHEMA:
        c.execute(stmt)
    if "stack" not in {row[1] for row in c.execute("PRAGMA table_info(rounds)")}:
        c.execute("ALTER TABLE rounds ADD COLUMN stack TEXT")


MIGRATIONS = {1: _to_v1}


@dataclass(frozen=True)
class Round:
    id: int
    sync_block: int
    block_hash: str
    seed: int
    competition: str  # the competition file's digest
    phase: str
    leader: str | None = None
    leader_hash: str | None = None


@dataclass(frozen=True)
class Submission:
    hotkey: str
    commitment: str
    model_hash: str | None
    commit_block: int
    status: str  # "accepted" | "rejected"
    stage: str | None
    reason: str | None
    path: str | None


class ValidatorState:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # read before anything else opens it: even switching a newer file to WAL would write to it
        probe = sqlite3.connect(self.path)
        try:
            version = probe.execute("PRAGMA user_version").fetchone()[0]
        finally:
            probe.close()
        if version > SCHEMA_VERSION:
            raise ValueError(f"{self.path} has schema version {version}, newer than this validator's "
                             f"{SCHEMA_VERSION}: upgrade quasar-sn24, or give another --out")
        with self._tx() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]  # again: another process may have migrated it
            if version < SCHEMA_VERSION:
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[v](c)
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a committed phase survives power loss, not just a crash
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------------ rounds
    def _round(self, row) -> Round | None:
        return Round(*row) if row else None

    _ROUND_COLS = "id, sync_block, block_hash, seed, competition, phase, leader, leader_hash"

    def open_round(self, sync_block: int, block_hash: str, seed: int, competition: str,
                   stack: dict | None = None) -> Round:
        """The round at `sync_block`, created in phase `fetch` if new (idempotent across restarts);
        `stack` (eval.stack.check_stack) is stored with a new round."""
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO rounds (sync_block, block_hash, seed, competition, phase, started, stack) "
                      "VALUES (?, ?, ?, ?, 'fetch', ?, ?)", (sync_block, block_hash, seed, competition, time.time(),
                                                           None if stack is None else json.dumps(stack, sort_keys=True)))
            row = c.execute(f"SELECT {self._ROUND_COLS} FROM rounds WHERE sync_block = ?", (sync_block,)).fetchone()
        r = self._round(row)
        if (r.block_hash, r.seed, r.competition) != (block_hash, seed, competition):
            raise RuntimeError(f"round at block {sync_block} was opened with another block hash, seed or "
                               f"competition ({r.competition[:12]} vs {competition[:12]}): refusing to mix them")
        return r

    def round_stack(self, round_id: int) -> dict | None:
        """The evaluation stack the round was opened on (None for rounds from before it was recorded)."""
        row = self._conn().execute("SELECT stack FROM rounds WHERE id = ?", (round_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def round(self, round_id: int) -> Round | None:
        return self._round(self._conn().execute(
            f"SELECT {self._ROUND_COLS} FROM rounds WHERE id = ?", (round_id,)).fetchone())

    def unfinished_round(self) -> Round | None:
        return self._round(self._conn().execute(
            f"SELECT {self._ROUND_COLS} FROM rounds WHERE phase != 'done' ORDER BY id LIMIT 1").fetchone())

    def last_round(self, done_only: bool = True) -> Round | None:
        where = "WHERE phase = 'done'" if done_only else ""
        return self._round(self._conn().execute(
            f"SELECT {self._ROUND_COLS} FROM rounds {where} ORDER BY id DESC LIMIT 1").fetchone())

    def rounds(self) -> list[Round]:
        return [Round(*r) for r in self._conn().execute(f"SELECT {self._ROUND_COLS} FROM rounds ORDER BY id")]

    def set_phase(self, round_id: int, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        with self._tx() as c:
            c.execute("UPDATE rounds SET phase = ?, finished = CASE WHEN ? = 'done' THEN ? ELSE finished END "
                      "WHERE id = ?", (phase, phase, time.time(), round_id))

    # ------------------------------------------------------------- submissions
    def submission(self, hotkey: str, commitment: str) -> Submission | None:
        row = self._conn().execute(
            "SELECT hotkey, commitment, model_hash, commit_block, status, stage, reason, path FROM submissions "
            "WHERE hotkey = ? AND commitment = ?", (hotkey, commitment)).fetchone()
        return Submission(*row) if row else None

    def record_submission(self, round_id: int, s: Submission) -> None:
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO submissions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (s.hotkey, s.commitment, s.model_hash, s.commit_block, s.status, s.stage, s.reason,
                       s.path, round_id))

    def reject_submission(self, hotkey: str, commitment: str, stage: str, reason: str) -> None:
        """An accepted submission that failed later (its evaluation): rejected for good, like at fetch."""
        with self._tx() as c:
            c.execute("UPDATE submissions SET status = 'rejected', stage = ?, reason = ? "
                      "WHERE hotkey = ? AND commitment = ?", (stage, reason, hotkey, commitment))

    def start_eval_attempt(self, round_id: int, model_hash: str) -> int:
        """Count one more evaluation of `model_hash` in the round, committed before it starts; the new count."""
        with self._tx() as c:
            c.execute("INSERT INTO eval_attempts VALUES (?, ?, 1) ON CONFLICT (round_id, model_hash) "
                      "DO UPDATE SET attempts = attempts + 1", (round_id, model_hash))
            return c.execute("SELECT attempts FROM eval_attempts WHERE round_id = ? AND model_hash = ?",
                             (round_id, model_hash)).fetchone()[0]

    def cancel_eval_attempt(self, round_id: int, model_hash: str) -> None:
        """Un-count an evaluation the validator itself stopped (SIGTERM): the model did not cause it."""
        with self._tx() as c:
            c.execute("UPDATE eval_attempts SET attempts = attempts - 1 WHERE round_id = ? AND model_hash = ?",
                      (round_id, model_hash))

    def submissions(self, status: str | None = None) -> list[Submission]:
        q = "SELECT hotkey, commitment, model_hash, commit_block, status, stage, reason, path FROM submissions"
        args: tuple = ()
        if status:
            q, args = q + " WHERE status = ?", (status,)
        return [Submission(*r) for r in self._conn().execute(q + " ORDER BY commit_block, hotkey", args)]

    def recent_rejections(self, per_hotkey: int, total: int) -> list[Submission]:
        """The latest `per_hotkey` rejections of each hotkey, at most `total`, newest first."""
        return [Submission(*r) for r in self._conn().execute(
            "SELECT hotkey, commitment, model_hash, commit_block, status, stage, reason, path FROM ("
            "  SELECT *, ROW_NUMBER() OVER (PARTITION BY hotkey ORDER BY commit_block DESC, rowid DESC) AS n"
            "  FROM submissions WHERE status = 'rejected') WHERE n <= ? "
            "ORDER BY commit_block DESC, rowid DESC LIMIT ?", (per_hotkey, total))]

    def rejections_by_stage(self) -> dict[str | None, int]:
        """stage -> how many submissions it rejected, over the file's whole history."""
        return dict(self._conn().execute(
            "SELECT stage, COUNT(*) FROM submissions WHERE status = 'rejected' GROUP BY stage"))

    def first_commit_blocks_by_hotkey(self) -> dict[tuple[str, str], int]:
        """(hotkey, model_hash) -> the earliest block that hotkey committed that hash at."""
        return {(k, h): b for k, h, b in self._conn().execute(
            "SELECT hotkey, model_hash, MIN(commit_block) FROM submissions WHERE model_hash IS NOT NULL "
            "GROUP BY hotkey, model_hash")}

    def round_model_hashes(self, round_id: int) -> list[str]:
        """The model hashes of the submissions accepted in round `round_id`."""
        return [h for (h,) in self._conn().execute(
            "SELECT DISTINCT model_hash FROM submissions WHERE round_id = ? AND status = 'accepted'", (round_id,))]

    def first_commit_blocks(self) -> dict[str, int]:
        """model_hash -> the earliest block any hotkey committed it at (the owner's block)."""
        return {h: b for h, b in self._conn().execute(
            "SELECT model_hash, MIN(commit_block) FROM submissions WHERE model_hash IS NOT NULL GROUP BY model_hash")}

    # ----------------------------------------------------------------- results
    def save_result(self, round_id: int, hotkey: str, model_hash: str, result: dict) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                      (round_id, hotkey, model_hash, json.dumps(result, sort_keys=True)))

    def results(self, round_id: int) -> dict[str, tuple[str, dict]]:
        """hotkey -> (model_hash, result) of one round."""
        return {h: (m, json.loads(r)) for h, m, r in self._conn().execute(
            "SELECT hotkey, model_hash, result FROM results WHERE round_id = ?", (round_id,))}

    # ------------------------------------------------------- scores, EMA, weights
    def ema(self) -> dict[str, float]:
        return dict(self._conn().execute("SELECT hotkey, value FROM ema"))

    def finish_scoring(self, round_id: int, scores: list[dict], ema: dict[str, float],
                       leader: str | None, leader_hash: str | None) -> None:
        """Scores, the new EMA (replacing the old one) and the leader, with the move to `weights`: atomic."""
        with self._tx() as c:
            phase = c.execute("SELECT phase FROM rounds WHERE id = ?", (round_id,)).fetchone()
            if phase is None or phase[0] not in ("fetch", "evaluate", "score"):
                return  # already scored: applying the EMA again would count this round twice
            c.execute("DELETE FROM scores WHERE round_id = ?", (round_id,))
            c.executemany("INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
                (round_id, s["hotkey"], s.get("uid"), s["model_hash"], s["composite"], s.get("gate"), s["rank"],
                 json.dumps(s.get("axes", {}), sort_keys=True)) for s in scores])
            c.execute("DELETE FROM ema")
            c.executemany("INSERT INTO ema VALUES (?, ?, ?)", [(h, v, round_id) for h, v in ema.items()])
            c.execute("UPDATE rounds SET phase = 'weights', leader = ?, leader_hash = ? WHERE id = ?",
                      (leader, leader_hash, round_id))

    def scores(self, round_id: int) -> list[dict]:
        return [dict(hotkey=h, uid=u, model_hash=m, composite=s, gate=g, rank=r, axes=json.loads(a))
                for h, u, m, s, g, r, a in self._conn().execute(
                    "SELECT hotkey, uid, model_hash, composite, gate, rank, axes FROM scores "
                    "WHERE round_id = ? ORDER BY rank", (round_id,))]

    def record_weights(self, round_id: int, block: int, weights: dict[int, float], accepted: bool) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO weights VALUES (?, ?, ?, ?)",
                      (round_id, block, json.dumps({str(k): v for k, v in weights.items()}), int(accepted)))
            c.execute("UPDATE rounds SET phase = 'done', finished = ? WHERE id = ?", (time.time(), round_id))

    def last_weights_block(self) -> int | None:
        """The block of the latest weights this validator recorded as accepted by the chain."""
        return self._conn().execute("SELECT MAX(block) FROM weights WHERE accepted = 1").fetchone()[0]

    def weights(self, round_id: int) -> tuple[dict[int, float], bool] | None:
        row = self._conn().execute("SELECT weights, accepted FROM weights WHERE round_id = ?", (round_id,)).fetchone()
        if row is None:
            return None
        return {int(k): v for k, v in json.loads(row[0]).items()}, bool(row[1])
