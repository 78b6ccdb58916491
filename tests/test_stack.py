"""The evaluation stack: the lock, the competition's eval_stack, and a validator that refuses to
score on other library versions unless told to (and then says so in every round)."""
import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from eval.competition import CompetitionError, load_competition, parse_competition
from eval.stack import (
    NUMERIC_PACKAGES, StackMismatch, check_stack, installed_versions, read_lock, stack_mismatches,
)
from neurons.keys import local_keypair
from neurons.localchain import LocalChain
from neurons.state import ValidatorState
from neurons.validator import Validator, ValidatorSettings

ROOT = Path(__file__).resolve().parents[1]


def locked_versions() -> dict[str, str]:
    return read_lock(ROOT / "requirements.lock")


def test_sn24_pins_the_locked_versions_of_every_package_that_moves_scores():
    lock, pinned = locked_versions(), load_competition("sn24").eval_stack
    assert set(pinned) == set(NUMERIC_PACKAGES)
    assert {name: lock[name] for name in pinned} == pinned


def test_the_lock_pins_triton_to_what_pypi_torch_requires_and_torch_without_a_local_build():
    lock = locked_versions()
    assert lock["torch"] == "2.13.0"      # the README's pin; +cpu / +cu130 builds both match it
    assert lock["triton"] == "3.7.1"      # PyPI's torch 2.13.0 requires triton==3.7.1 on Linux


def test_versions_compare_by_public_part_and_name_both_sides():
    installed = {"torch": "2.13.0", "transformers": "5.23.0", "numpy": "absent"}
    pinned = {"torch": "2.13.0+cu130", "transformers": "5.24.0", "numpy": "2.4.6"}
    assert stack_mismatches(pinned, installed) == [
        "numpy absent (the competition pins 2.4.6)",
        "transformers 5.23.0 (the competition pins 5.24.0)",
    ]
    assert stack_mismatches({}, installed) == []


def test_check_stack_refuses_a_mismatch_unless_allowed_and_reports_it_either_way():
    real = installed_versions()
    assert "+" not in real["torch"] and real["transformers"] != "absent"
    assert check_stack({"transformers": real["transformers"]}) == {
        "installed": real, "pinned": True, "mismatch": [], "mismatch_allowed": False}
    with pytest.raises(StackMismatch, match=r"transformers .* \(the competition pins 0\.0\.1\)"):
        check_stack({"transformers": "0.0.1"})
    allowed = check_stack({"transformers": "0.0.1"}, allow_mismatch=True)
    assert allowed["mismatch_allowed"] and allowed["mismatch"] == [
        f"transformers {real['transformers']} (the competition pins 0.0.1)"]


def test_eval_stack_entries_must_be_exact_public_versions():
    raw = load_competition("localnet").to_dict()
    raw["eval_stack"] = {"torch": "2.13.0+cpu"}
    with pytest.raises(CompetitionError, match=r"eval_stack\.torch"):
        parse_competition(raw)


def test_an_unpinned_competition_keeps_the_digest_it_had_before_eval_stack():
    comp = load_competition("localnet")
    assert comp.eval_stack == {}
    raw = comp.to_dict()
    del raw["eval_stack"]
    old = hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert comp.digest == old   # a round stored by an older validator resumes after the upgrade


def _pinned_competition(tmp_path: Path, transformers: str) -> Path:
    raw = load_competition("localnet").to_dict()
    raw["eval_stack"] = {"torch": installed_versions()["torch"], "transformers": transformers}
    path = tmp_path / "pinned.json"
    path.write_text(json.dumps(raw))
    return path


def _local_validator(tmp_path: Path):
    chain = LocalChain(tmp_path / "chain.db", block_time=None)
    keys = tmp_path / "keys"
    kp = local_keypair("validator-default", keys)
    chain.register(kp, local_keypair("validator-cold", keys).ss58_address, stake=100.0)
    return chain, keys, kp


def test_validator_cli_refuses_a_mismatched_stack_with_one_error_line(tmp_path):
    chain, keys, _ = _local_validator(tmp_path)
    work = tmp_path / "v"
    cmd = [sys.executable, "-m", "neurons.cli", "validator", "--network", "localnet", "--chain.path", str(chain.path),
           "--wallet.path", str(keys), "--wallet.name", "validator", "--competition",
           str(_pinned_competition(tmp_path, "0.0.1")), "--out", str(work), "--status-port", "-1",
           "--max-rounds", "1", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("quasar validator: error: "), res.stderr
    assert "transformers" in errors[0] and "0.0.1" in errors[0] and "--allow-stack-mismatch" in errors[0]
    assert "Traceback" not in res.stderr
    assert not (work / "validator.db").exists()  # refused before any state was written


def test_an_allowed_mismatch_is_recorded_with_the_round(tmp_path):
    chain, _, kp = _local_validator(tmp_path)
    comp = load_competition(_pinned_competition(tmp_path, "0.0.1"))
    settings = ValidatorSettings(work_dir=tmp_path / "v", localnet=True, allow_stack_mismatch=True)
    v = Validator(chain, kp, comp, settings)
    chain.advance(comp.schedule.cadence_blocks)
    r = v.next_round()
    stored = ValidatorState(tmp_path / "v" / "validator.db").round_stack(r.id)
    assert stored["mismatch_allowed"] is True and stored["pinned"] is True
    assert stored["mismatch"] == [f"transformers {installed_versions()['transformers']} (the competition pins 0.0.1)"]
    assert stored["installed"]["torch"] == installed_versions()["torch"]


def test_a_state_file_from_before_the_stack_column_is_migrated(tmp_path):
    db = tmp_path / "validator.db"
    with sqlite3.connect(db) as c:   # the rounds table as earlier releases created it
        c.execute("""CREATE TABLE rounds (
            id INTEGER PRIMARY KEY AUTOINCREMENT, sync_block INTEGER NOT NULL UNIQUE, block_hash TEXT NOT NULL,
            seed INTEGER NOT NULL, competition TEXT NOT NULL, phase TEXT NOT NULL,
            started REAL NOT NULL, finished REAL, leader TEXT, leader_hash TEXT)""")
        c.execute("INSERT INTO rounds (sync_block, block_hash, seed, competition, phase, started) "
                  "VALUES (10, '0xab', 7, 'd', 'done', 1.0)")
    state = ValidatorState(db)
    old = state.last_round()
    assert (old.sync_block, old.seed) == (10, 7) and state.round_stack(old.id) is None
    new = state.open_round(20, "0xcd", 8, "d", {"installed": {}, "pinned": False, "mismatch": [],
                                                "mismatch_allowed": False})
    assert state.round_stack(new.id)["pinned"] is False


def test_a_real_network_refuses_an_unpinned_competition(tmp_path):
    """sn24.json ships with teacher revision "main" and no tokenizer fingerprint: the subnet owner
    pins them; until then no validator on a real network scores with it."""
    chain, _, kp = _local_validator(tmp_path)
    sn24 = load_competition("sn24")
    assert sn24.unpinned() == ["teacher.revision is 'main', not a 40-hex commit", "tokenizer.fingerprint is empty",
                               "heldout.revision is 'main', not a 40-hex commit of dataset 'HuggingFaceFW/fineweb-edu'"]
    with pytest.raises(ValueError, match="not pinned for a real network: teacher.revision is 'main'"):
        Validator(chain, kp, sn24, ValidatorSettings(work_dir=tmp_path / "v", localnet=False))
    assert not (tmp_path / "v" / "validator.db").exists()
    assert load_competition("localnet").unpinned()  # localnet is unpinned, and runs only as localnet


def test_a_real_network_refuses_an_unpinned_heldout_dataset(tmp_path):
    """Everything else pinned, the held-out dataset's revision left to a branch: the documents a round
    draws would move with the branch, so validators would score on different data."""
    from test_redteam_fetch import pinned_for_a_real_network, redteam_competition

    chain, _, kp = _local_validator(tmp_path)
    raw = pinned_for_a_real_network(redteam_competition())
    assert parse_competition(raw).unpinned() == []
    raw["heldout"].update(dataset="HuggingFaceFW/fineweb-edu", revision="main")
    comp = parse_competition(raw)
    with pytest.raises(ValueError, match="not pinned for a real network: heldout.revision is 'main', not a 40-hex "
                                         "commit of dataset 'HuggingFaceFW/fineweb-edu'"):
        Validator(chain, kp, comp, ValidatorSettings(work_dir=tmp_path / "v", localnet=False))
    assert not (tmp_path / "v" / "validator.db").exists()
