"""Bad inputs to the command line (issue 12, item 3): each ends with exit status 2, exactly one
`error:` line on stderr, no traceback, and nothing written.

Each case runs the real entry point in a subprocess (`python -m neurons.cli`, and the standalone
`python -m eval.cli` / `python -m distill.cli`). The checks run before torch is imported wherever no
model is needed, so most cases take well under a second; the unknown-teacher cases load
transformers (offline: HF_HUB_OFFLINE=1, as on a machine without internet access). `params` runs
in this process: its presets live in the model package, which imports torch either way.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.competition import SHIPPED
from neurons import cli
from neurons.keys import local_keypair
from neurons.localchain import LocalChain

REPO = Path(__file__).resolve().parents[1]
# this checkout first, whatever the working directory (a case may run in a scratch one)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", QUASAR_DEBUG="", OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))


def refused(args: list[str], *, match: str, module: str = "neurons.cli", cwd: Path | None = None,
            seconds: float = 30) -> str:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV,
                       cwd=cwd or REPO, timeout=120)
    took = time.perf_counter() - t0
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert len(errors) == 1 and match in errors[0], p.stderr
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    assert took < seconds, f"{args[0]} took {took:.1f} s to refuse"
    return errors[0]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "notckpt").mkdir()
    (d / "notckpt" / "readme.txt").write_text("not a checkpoint")
    (d / "badcfg").mkdir()
    (d / "badcfg" / "config.json").write_text("{not json")
    (d / "bad.yaml").write_text("steps: [1, 2\n  bad: : yaml\n")
    (d / "bad.json").write_text('{"steps": 1,,}')
    return d


# ---- eval ------------------------------------------------------------------------------------

def test_eval_on_what_is_not_a_checkpoint(tmp_path, bad):
    out = tmp_path / "report"
    refused(["eval", str(bad / "notckpt"), "--out", str(out)], match="no config.json (is this a checkpoint directory?)")
    refused(["eval", str(bad / "nosuch"), "--out", str(out)], match="no such directory")
    refused(["eval", str(bad / "badcfg"), "--out", str(out)], match="config.json is not valid JSON")
    refused(["eval", str(bad / "notckpt"), "--out", str(out)], module="eval.cli", match="no config.json")
    assert not out.exists()


def test_eval_on_missing_or_truncated_weights_and_a_bad_config(tmp_path, pristine):
    import shutil

    out = tmp_path / "report"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine, ckpt)
    weights = ckpt / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    refused(["eval", str(ckpt), "--out", str(out)], match="truncated")
    weights.write_bytes(raw[:4])
    refused(["eval", str(ckpt), "--out", str(out)], match="too short for a safetensors header")
    weights.unlink()
    refused(["eval", str(ckpt), "--out", str(out)], match="model.safetensors is missing")
    weights.write_bytes(raw)
    (ckpt / "config.json").write_text('{"vocab_size": 1024')
    refused(["eval", str(ckpt), "--out", str(out)], match="config.json is not valid JSON")
    (ckpt / "config.json").write_text('{"vocab_size": 1024}')
    refused(["eval", str(ckpt), "--out", str(out)], match="config.json has no model_type")
    assert not out.exists()


# ---- distill, teacher-cache, init-student, demo, params --------------------------------------

def test_distill_with_a_malformed_config(tmp_path, bad):
    refused(["distill", str(bad / "bad.yaml")], match="invalid YAML", cwd=tmp_path)
    refused(["distill", str(bad / "bad.json")], match="invalid JSON", cwd=tmp_path)
    refused(["distill", str(bad / "nosuch.json")], match="not found", cwd=tmp_path)
    refused(["distill", str(bad / "bad.yaml")], module="distill.cli", match="invalid YAML", cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no output_dir, nothing else


def test_teacher_cache_flags_are_checked_before_the_teacher_is_loaded(tmp_path):
    out = tmp_path / "cache"
    common = ["teacher-cache", "--teacher", "tiny-teacher", "--data", "corpus:train", "--out", str(out)]
    refused([*common, "--k", "0"], match="--k must be >= 1, got 0", seconds=5)
    refused([*common, "--seq-len", "0"], match="--seq-len must be >= 1", seconds=5)
    refused([*common, "--temperature", "0"], match="--temperature must be > 0", seconds=5)
    refused(["teacher-cache", "--text-only", "--data", "corpus:train", "--out", str(out)],
            match="quasar teacher-cache: error: teacher-cache --text-only needs --tokenizer", seconds=5)
    refused(["teacher-cache", "--data", "corpus:train", "--out", str(out)], match="needs --teacher", seconds=5)
    assert not out.exists()


def test_an_unknown_teacher_offline(tmp_path):
    out = tmp_path / "student"
    line = refused(["init-student", "--teacher", "nosuch/model", "--out", str(out)],
                   match="teacher 'nosuch/model' cannot be loaded")
    assert line.startswith("quasar init-student: error: ")
    refused(["teacher-cache", "--teacher", "nosuch/model", "--data", "corpus:train", "--out", str(tmp_path / "c")],
            match="teacher 'nosuch/model' cannot be loaded")
    assert list(tmp_path.iterdir()) == []


def test_demo_and_params(capsys):
    refused(["demo", "--prompt-len", "0"], match="--prompt-len and --new-tokens must be >= 1", seconds=5)
    refused(["demo", "--new-tokens", "-1"], match="must be >= 1", seconds=5)
    assert cli.main(["params", "--preset", "tiny", "--preset", "nosuch"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no table header before the error
    assert err.splitlines() == ["quasar params: error: unknown preset 'nosuch'; known: ['dense', 'preview', 'small', 'tiny']"]


# ---- --device (quasar_model.devices) --------------------------------------------------------

def test_a_device_that_does_not_exist_is_one_error_line(tmp_path, pristine):
    refused(["eval", str(pristine), "--out", str(tmp_path / "r"), "--device", "tpu"],
            match="device 'tpu': expected auto, cpu, cuda or cuda:N")
    refused(["init-student", "--teacher", "tiny-teacher", "--device", "cuda:99", "--out", str(tmp_path / "s")],
            match="device 'cuda:99': ")  # no CUDA here, or fewer than 100 GPUs
    chain = LocalChain(tmp_path / "chain.db")
    keys = tmp_path / "keys"
    chain.register(local_keypair("v-default", keys), local_keypair("cold", keys).ss58_address, stake=100.0)
    refused(["validator", "--network", "localnet", "--chain.path", str(chain.path), "--wallet.path", str(keys),
             "--wallet.name", "v", "--out", str(tmp_path / "v"), "--status-port", "-1", "--device", "gpu"],
            match="preflight device: device 'gpu': expected auto, cpu, cuda or cuda:N")
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists() and not (tmp_path / "v").exists()


# ---- miner and validator ---------------------------------------------------------------------

@pytest.fixture
def pinned(tmp_path) -> Path:
    raw = json.loads((SHIPPED / "sn24.json").read_text())
    raw["teacher"]["revision"], raw["tokenizer"]["fingerprint"], raw["heldout"]["revision"] = "a" * 40, "b" * 64, "c" * 40
    path = tmp_path / "sn24-pinned.json"
    path.write_text(json.dumps(raw))
    return path


def test_miner_and_validator_with_a_wallet_that_does_not_exist(tmp_path, pinned):
    wallets = tmp_path / "wallets"
    common = ["--network", "finney", "--competition", str(pinned), "--wallet.path", str(wallets),
              "--wallet.name", "nobody", "--min-free-gb", "0.01"]
    line = refused(["miner", *common, "--public-host", "93.184.216.34", "--port", "8091",
                    "--out", str(tmp_path / "m")], match="no keyfile at")
    assert "create it with btcli first" in line and str(wallets / "nobody") in line
    refused(["validator", *common, "--out", str(tmp_path / "v"), "--status-port", "-1"], match="no keyfile at")
    assert not wallets.exists() and not (tmp_path / "m").exists() and not (tmp_path / "v").exists()


def test_validator_status_port_in_use(tmp_path):
    chain = LocalChain(tmp_path / "chain.db")
    keys = tmp_path / "keys"
    chain.register(local_keypair("v-default", keys), local_keypair("cold", keys).ss58_address, stake=100.0)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused(["validator", "--network", "localnet", "--chain.path", str(chain.path), "--wallet.path", str(keys),
                 "--wallet.name", "v", "--out", str(tmp_path / "v"), "--min-free-gb", "0.01",
                 "--status-port", str(port)], match=f"--status-port {port} on 127.0.0.1 cannot be bound")
    assert not (tmp_path / "v").exists()  # refused before validator.db or anything else


def test_miner_seal_blocks_must_be_a_block_count(tmp_path):
    for value, words in (("-1", "give 0 (off) or more"), ("soon", "not a whole number of blocks")):
        refused(["miner", f"--seal-blocks={value}", "--out", str(tmp_path / "w")], match=words, cwd=tmp_path)
    assert not (tmp_path / "w").exists()


def test_validator_db_newer_than_the_code(tmp_path):
    import sqlite3

    from neurons.state import SCHEMA_VERSION

    chain = LocalChain(tmp_path / "chain.db")
    keys = tmp_path / "keys"
    chain.register(local_keypair("v-default", keys), local_keypair("cold", keys).ss58_address, stake=100.0)
    work = tmp_path / "v"
    work.mkdir()
    conn = sqlite3.connect(work / "validator.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")  # written by a newer release
    conn.close()
    before = (work / "validator.db").read_bytes()
    refused(["validator", "--network", "localnet", "--chain.path", str(chain.path), "--wallet.path", str(keys),
             "--wallet.name", "v", "--out", str(work), "--min-free-gb", "0.01", "--status-port", "-1"],
            match=f"has schema version {SCHEMA_VERSION + 1}, newer than this validator's {SCHEMA_VERSION}")
    assert (work / "validator.db").read_bytes() == before and sorted(p.name for p in work.iterdir()) == ["validator.db"]


# ---- conventions: chain flags, localnet's run directory -------------------------------------

def test_chain_flags_that_do_not_go_together(tmp_path):
    line = refused(["miner", "--network", "local", "--chain.path", str(tmp_path / "chain.db")],
                   match="--chain.path is the SQLite local chain's file: pass --network localnet", seconds=5)
    assert "`--network local` is bittensor's local subtensor node" in line  # the old meaning, named
    # `local` alone, as it was once meant: its first failing check says what `local` is now
    refused(["miner", "--network", "local", "--out", str(tmp_path / "m")],
            match="this toolkit's SQLite local chain is `--network localnet`", seconds=10)
    refused(["validator", "--subtensor.chain_endpoint", "10.0.0.5:9944"], match="expected a ws:// or wss:// URL",
            seconds=5)
    refused(["doctor", "miner", "--network", "localnet", "--subtensor.chain_endpoint", "ws://10.0.0.5:9944"],
            match="--network localnet is the SQLite local chain", seconds=5)
    assert list(tmp_path.iterdir()) == []


def test_localnet_refuses_a_directory_it_did_not_create(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    for flag in ("--out", "--dir"):  # --dir: the deprecated spelling, same check
        refused(["localnet", flag, str(mine)], match="is not empty and was not created by quasar localnet", seconds=5)
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    (tmp_path / "file").write_text("x")
    refused(["localnet", "--out", str(tmp_path / "file")], match="not a directory", seconds=5)


def test_the_old_tiny_teacher_spelling_still_works_with_one_warning(caplog):
    from quasar_model.teacher_outputs.tiny_teacher import TINY_TEACHER, resolve_teacher

    with caplog.at_level(logging.WARNING, logger="quasar_model"):
        old = resolve_teacher("tiny", progress=False)
    assert old == resolve_teacher(TINY_TEACHER, progress=False) and Path(old).is_dir()
    assert [r.getMessage() for r in caplog.records] == ["teacher 'tiny' is deprecated; name it 'tiny-teacher'"]
