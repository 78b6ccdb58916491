"""Validator state (SQLite, phases, EMA applied once) and the status endpoint, checked in headless Chromium."""
import json
import re
import shutil
import sqlite3
import subprocess
import urllib.request
from pathlib import Path

import pytest

from neurons.state import SCHEMA_VERSION, Submission, ValidatorState
from neurons.status import StatusServer


def _scored_round(state, sync_block=10):
    r = state.open_round(sync_block, "0xab", 5, "digest")
    state.record_submission(r.id, Submission("hkA", "q1:bad", None, 3, "rejected", "fetch",
                                             "<script>alert(1)</script> model.bin is a pickle", None))
    state.record_submission(r.id, Submission("hkB", "q1:good", "m" * 64, 4, "accepted", None, None, "/x"))
    state.save_result(r.id, "hkB", "m" * 64, {"items": [1, 2]})
    state.finish_scoring(r.id, [dict(hotkey="hkB", uid=2, model_hash="m" * 64, composite=0.5, rank=1,
                                     axes={"kl": 0.4})], {"hkB": 0.5}, "hkB", "m" * 64)
    state.record_weights(r.id, 11, {2: 1.0}, True)
    return r


def test_round_phases_and_idempotent_open(tmp_path):
    s = ValidatorState(tmp_path / "v.db")
    r = s.open_round(10, "0xab", 5, "digest")
    assert r.phase == "fetch" and s.unfinished_round() == r
    assert s.open_round(10, "0xab", 5, "digest").id == r.id  # restart reopens the same round
    with pytest.raises(RuntimeError, match="another block hash"):
        s.open_round(10, "0xcd", 5, "digest")
    s.set_phase(r.id, "evaluate")
    s.save_result(r.id, "hk", "h", {"v": 1})
    s.save_result(r.id, "hk", "h", {"v": 2})  # a rerun replaces, never duplicates
    assert s.results(r.id) == {"hk": ("h", {"v": 2})}


def test_ema_applied_once_even_if_scoring_is_repeated(tmp_path):
    s = ValidatorState(tmp_path / "v.db")
    r = s.open_round(10, "0xab", 5, "digest")
    row = [dict(hotkey="a", uid=0, model_hash="h", composite=0.7, rank=1)]
    s.finish_scoring(r.id, row, {"a": 0.7}, "a", "h")
    s.finish_scoring(r.id, row, {"a": 99.0}, "a", "h")  # a restart redoing the phase must not apply twice
    assert s.ema() == {"a": 0.7} and s.round(r.id).phase == "weights"
    s.record_weights(r.id, 12, {0: 1.0}, True)
    assert s.round(r.id).phase == "done" and s.weights(r.id) == ({0: 1.0}, True)
    assert s.unfinished_round() is None


def test_first_commit_blocks_name_the_owner(tmp_path):
    s = ValidatorState(tmp_path / "v.db")
    r = s.open_round(10, "0xab", 5, "digest")
    s.record_submission(r.id, Submission("copier", "q1:c", "h1", 9, "accepted", None, None, None))
    s.record_submission(r.id, Submission("owner", "q1:o", "h1", 4, "accepted", None, None, None))
    assert s.first_commit_blocks() == {"h1": 4}


def test_status_json(tmp_path):
    s = ValidatorState(tmp_path / "v.db")
    _scored_round(s)
    srv = StatusServer(tmp_path / "v.db").start()
    try:
        health = json.loads(urllib.request.urlopen(srv.url + "/health", timeout=10).read())
        board = json.loads(urllib.request.urlopen(srv.url + "/leaderboard", timeout=10).read())
    finally:
        srv.stop()
    assert health["status"] == "ok" and health["last_round"] == 1
    assert board["rows"][0]["hotkey"] == "hkB" and board["rows"][0]["weight"] == 1.0 and board["rows"][0]["leader"]
    assert board["rejected"][0]["stage"] == "fetch"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_leaderboard_page_renders_in_headless_chromium(tmp_path):
    s = ValidatorState(tmp_path / "v.db")
    _scored_round(s)
    srv = StatusServer(tmp_path / "v.db").start()
    try:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", srv.url + "/"],
            capture_output=True, text=True, timeout=120)
    finally:
        srv.stop()
    dom = re.sub(r"<script>.*</script>", "", out.stdout, flags=re.S)  # only what the page rendered
    assert 'data-ready="1"' in dom, out.stderr[-2000:]
    assert "round 1 at block 10, leader hkB" in dom
    assert re.search(r'<tr class="leader"><td>1</td><td>2</td><td class="k">hkB</td><td>0\.5000</td>', dom)
    # a hostile rejection reason is shown as text, never run as markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt; model.bin is a pickle" in dom


# ---- schema versions -----------------------------------------------------------------------------

UNVERSIONED = Path(__file__).parent / "data" / "validator-db-unversioned.sql"


def _from_dump(path, dump: Path):
    conn = sqlite3.connect(path)
    conn.executescript(dump.read_text())
    conn.close()


def _user_version(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_an_unversioned_file_is_migrated_and_keeps_every_row(tmp_path):
    db = tmp_path / "validator.db"
    _from_dump(db, UNVERSIONED)  # rows the code wrote before validator.db had a version
    assert _user_version(db) == 0
    s = ValidatorState(db)
    assert _user_version(db) == SCHEMA_VERSION
    done, current = s.rounds()
    assert (done.sync_block, done.phase, done.leader, current.phase) == (100, "done", "5Miner1", "evaluate")
    assert s.unfinished_round() == current and s.last_round() == done
    assert s.round_stack(done.id) == {"torch": "2.13.0", "mismatch": False}
    assert [(x.hotkey, x.status, x.stage) for x in s.submissions()] == [
        ("5Miner1", "accepted", None), ("5Miner2", "rejected", "fetch"), ("5Miner3", "rejected", "evaluate")]
    assert s.results(done.id) == {"5Miner1": ("m" * 64, {"items": [1, 2, 3], "commit_block": 40})}
    assert [(x["hotkey"], x["composite"], x["rank"]) for x in s.scores(done.id)] == [("5Miner1", 0.75, 1)]
    assert s.ema() == {"5Miner1": 0.3} and s.weights(done.id) == ({1: 1.0}, True)
    assert s.start_eval_attempt(done.id, "m" * 64) == 2  # the stored count goes on
    s.close()
    assert ValidatorState(db).rounds() == [done, current]  # opening a current file again changes nothing


def test_a_file_newer_than_the_code_is_refused_untouched(tmp_path):
    db = tmp_path / "validator.db"
    ValidatorState(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ValueError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this validator's "
                                         f"{SCHEMA_VERSION}: upgrade quasar-sn24"):
        ValidatorState(db)
    assert _user_version(db) == SCHEMA_VERSION + 1
