"""Preflight of `quasar miner` / `quasar validator` and `quasar doctor` (issue 12, item 1).

Driven through `neurons.cli.main` in this process, with `neurons.network.open_chain` handing back
a SubtensorChain over the substrate stand-in of tests/test_subtensor_chain.py (the SDK is real,
only its RPC seam is the stand-in), or a LocalChain in a temporary directory. Each failing case
must end in seconds with exit status 2 and one `error:` line, before any training, evaluation or
state is written.
"""
from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from pathlib import Path

import bittensor as bt
import pytest

from eval.competition import SHIPPED
from neurons import cli, network
from neurons.keys import local_keypair
from neurons.localchain import LocalChain
from neurons.subtensor_chain import SubtensorChain
from test_subtensor_chain import ALICE, BOB, DAVE, FakeChain

PUBLIC = ["--storage", "http", "--public-host", "93.184.216.34", "--port", "8091"]  # an IP literal: no DNS


@pytest.fixture(autouse=True)
def _keep_logging():
    """cmd_miner/cmd_validator point the root logger at this test's stderr: put it back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def pinned(tmp_path) -> Path:
    """sn24 with every field a real network needs pinned (the shipped file is not yet)."""
    raw = json.loads((SHIPPED / "sn24.json").read_text())
    raw["teacher"]["revision"] = "a" * 40
    raw["tokenizer"]["fingerprint"] = "b" * 64
    raw["heldout"]["revision"] = "c" * 40
    path = tmp_path / "sn24-pinned.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture
def fake(monkeypatch):
    """The stand-in chain; open_chain returns it and the hotkey in `fake.hotkey` (BOB unless set)."""
    fake = FakeChain()
    fake.hotkey = BOB
    fake.opened = 0

    def open_chain(args):
        fake.opened += 1
        return SubtensorChain(args.network, args.netuid, substrate=fake, wait_for_finalization=False), fake.hotkey
    monkeypatch.setattr(network, "open_chain", open_chain)
    return fake


def run(capsys, argv: list[str]) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    rc = cli.main(argv)
    took = time.perf_counter() - t0
    out, err = capsys.readouterr()
    return rc, out, err, took


def refused(capsys, argv: list[str], *, match: str) -> str:
    """Runs argv; asserts rc 2 in under 10 s and exactly one `error:` line (matching) and no traceback."""
    rc, out, err, took = run(capsys, argv)
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert rc == 2, (rc, out, err)
    assert len(errors) == 1 and match in errors[0], err
    assert "Traceback" not in err + out
    assert took < 10, f"{argv[0]} took {took:.1f} s to refuse"
    return errors[0]


def miner(tmp_path, *extra) -> list[str]:
    return ["miner", "--network", "finney", "--out", str(tmp_path / "work"), "--min-free-gb", "0.01", *extra]


def validator(tmp_path, *extra) -> list[str]:
    return ["validator", "--network", "finney", "--out", str(tmp_path / "work"), "--min-free-gb", "0.01",
            "--status-port", "-1", *extra]


# ---- on the substrate stand-in ---------------------------------------------------------------

def test_unreachable_chain_is_refused_before_anything_starts(tmp_path, capsys, fake, pinned):
    fake.fail = bt.RpcConnectionError("could not connect to any endpoint: connection refused")
    line = refused(capsys, miner(tmp_path, "--competition", str(pinned), *PUBLIC), match="unreachable")
    assert "connection refused" in line and "--network" in line
    assert not (tmp_path / "work").exists()  # nothing written: no work dir, no training
    refused(capsys, validator(tmp_path, "--competition", str(pinned)), match="unreachable")


def test_unregistered_hotkey_and_missing_permit(tmp_path, capsys, fake, pinned):
    fake.hotkey = DAVE
    line = refused(capsys, miner(tmp_path, "--competition", str(pinned), *PUBLIC), match="is not registered on netuid 24")
    assert "btcli subnets register --netuid 24" in line and DAVE.ss58_address in line
    fake.hotkey = BOB  # registered, no validator permit
    line = refused(capsys, validator(tmp_path, "--competition", str(pinned)), match="has no validator permit")
    assert "uid 1" in line and "stake" in line
    assert not (tmp_path / "work").exists()


def test_unpinned_or_foreign_competition_is_refused_before_the_chain_is_opened(tmp_path, capsys, fake, pinned):
    # the default on finney is the network's own competition, sn24, shipped unpinned for now
    line = refused(capsys, miner(tmp_path, *PUBLIC), match="competition 'sn24' is not pinned for a real network")
    assert "teacher.revision is 'main'" in line
    refused(capsys, validator(tmp_path), match="is not pinned")
    refused(capsys, miner(tmp_path, "--competition", "localnet", *PUBLIC),
            match="competition 'localnet' is the local chain's, not finney's: pass --competition sn24")
    refused(capsys, miner(tmp_path, "--competition", str(pinned), "--netuid", "7", *PUBLIC),
            match="is for netuid 24, not --netuid 7")
    # a URL names no competition of its own: it must be named
    refused(capsys, ["miner", "--network", "ws://10.1.2.3:9944", *PUBLIC], match="name it with --competition")
    assert fake.opened == 0


@pytest.mark.parametrize("flags, match", [
    ([], "dial 127.0.0.1: http host '127.0.0.1' is not a public address"),  # the defaults
    (["--public-host", "10.0.0.5", "--port", "8091"], "dial 10.0.0.5: http host '10.0.0.5' is not a public address"),
    (["--public-host", "192.168.1.20", "--port", "8091"], "is not a public address"),
    (["--host", "0.0.0.0", "--port", "8091"], "0.0.0.0 is the unspecified address"),
    (["--public-host", "localhost", "--port", "8091"], "is a local name"),
    (["--public-host", "miner.internal", "--port", "8091"], "is a local name"),
    (["--public-host", "93.184.216.34"], "--port 0 picks a random port"),
    (["--storage", "local", "--storage-root", "x"], "--storage local is for the local chain only"),
    (["--storage", "hf"], "--storage hf needs --hf.repo"),
    (["--storage", "hf", "--hf.repo", "nobody"], "must be 'owner/name'"),
    (["--storage", "hf", "--hf.repo", "me/student"], "needs HF_TOKEN"),
])
def test_storage_settings_a_validator_could_not_use(tmp_path, capsys, fake, pinned, monkeypatch, flags, match):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    refused(capsys, miner(tmp_path, "--competition", str(pinned), *flags), match=match)
    assert fake.opened == 0


def test_disk_and_work_dir(tmp_path, capsys, fake, pinned):
    argv = miner(tmp_path, "--competition", str(pinned), *PUBLIC)
    argv[argv.index("--min-free-gb") + 1] = "1e9"
    refused(capsys, argv, match="GiB needed")
    blocker = tmp_path / "file"
    blocker.write_text("")
    refused(capsys, ["miner", "--network", "finney", "--out", str(blocker / "work"), "--min-free-gb", "0.01",
                     "--competition", str(pinned), *PUBLIC], match="is not a directory")


def test_a_miner_metrics_port_in_use_is_refused(tmp_path, capsys, fake, pinned):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused(capsys, miner(tmp_path, "--competition", str(pinned), *PUBLIC, "--metrics-port", str(port)),
                match=f"--metrics-port {port} on 127.0.0.1 cannot be bound")
    assert not (tmp_path / "work").exists()


def test_doctor_prints_every_check(tmp_path, capsys, fake, pinned, monkeypatch):
    fake.hotkey = ALICE
    rc, out, err, _ = run(capsys, ["doctor", *validator(tmp_path, "--competition", str(pinned))])
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", "competition"], ["ok", "device"], ["ok", "work"], ["ok", "disk"],
                                                    ["ok", "chain"], ["ok", "registered"], ["ok", "permit"],
                                                    ["ok", "status"]]
    assert "finney at block 1000" in out and "uid 0" in out
    assert not (tmp_path / "work").exists()  # doctor changes nothing
    # everything wrong at once: each failure on its own line, the dependent checks skipped
    monkeypatch.delenv("HF_TOKEN", raising=False)
    fake.fail = bt.RpcConnectionError("connection refused")
    rc, out, err, took = run(capsys, ["doctor", *miner(tmp_path, "--storage", "hf")])
    assert rc == 2 and took < 10
    status = {line.split()[1]: line.split()[0] for line in out.splitlines()}
    assert status == {"competition": "FAIL", "device": "ok", "storage": "FAIL", "metrics": "ok", "work": "ok", "disk": "skip",
                      "chain": "FAIL", "registered": "skip"}
    assert err.splitlines() == ["quasar doctor: error: 3 check(s) failed: competition, storage, chain"]


def test_a_hung_endpoint_is_a_preflight_failure_not_a_hang(tmp_path, pinned):
    from neurons.preflight import Preflight, PreflightError

    class Hung:
        def block(self):
            time.sleep(60)

    args = cli.build_parser().parse_args(miner(tmp_path, "--competition", str(pinned), *PUBLIC))
    pf = Preflight(args, "miner", open_chain=lambda a: (Hung(), BOB), timeout=0.5)
    t0 = time.perf_counter()
    with pytest.raises(PreflightError, match="no answer within 0.5 s"):
        pf.run()
    assert time.perf_counter() - t0 < 5


# ---- on the local chain ----------------------------------------------------------------------

def test_local_chain(tmp_path, capsys):
    chain_path, keys = tmp_path / "net" / "chain.db", tmp_path / "net" / "keys"
    common = ["--chain.path", str(chain_path), "--wallet.path", str(keys), "--min-free-gb", "0.01"]
    # no chain file: refused, and none is created behind the operator's back
    refused(capsys, ["miner", *common, "--out", str(tmp_path / "m")], match="no local chain at")
    assert not chain_path.exists()
    chain = LocalChain(chain_path)
    cold = local_keypair("cold", keys).ss58_address
    chain.register(local_keypair("m-default", keys), cold)
    chain.register(local_keypair("v-default", keys), cold, stake=100.0)
    chain.register(local_keypair("w-default", keys), cold)  # registered, no stake: no permit
    # on the local chain loopback, port 0 and local storage are fine, and localnet is the default competition
    rc, out, err, _ = run(capsys, ["doctor", "miner", *common, "--wallet.name", "m", "--out", str(tmp_path / "m")])
    assert rc == 0, out + err
    assert "localnet (netuid 24" in out and "loopback allowed" in out
    rc, out, err, _ = run(capsys, ["doctor", "validator", *common, "--wallet.name", "v", "--out", str(tmp_path / "v")])
    assert rc == 0 and "validator permit" in out, out + err
    refused(capsys, ["validator", *common, "--wallet.name", "w", "--out", str(tmp_path / "w"), "--status-port", "-1"],
            match="has no validator permit")
    refused(capsys, ["miner", *common, "--wallet.name", "stranger", "--out", str(tmp_path / "s")],
            match="`quasar localnet` registers its keys")


def test_a_miners_disk_need_follows_its_own_student(tmp_path, capsys, fake, pinned):
    """Export, published copy and training checkpoints of the student the miner's config builds
    (counted on the meta device): a tiny student passes where a 'preview'-sized one is refused."""
    from eval.competition import load_competition
    from neurons.preflight import miner_free_bytes, miner_student

    argv = miner(tmp_path, "--competition", str(pinned), *PUBLIC)
    del argv[argv.index("--min-free-gb"):argv.index("--min-free-gb") + 2]
    comp = load_competition(str(pinned))
    args = type("Args", (), {"config": None, "override": ["student.preset=preview"]})()
    params, keep, source = miner_student(args, comp)
    assert source == "its 'preview' student" and keep == 2 and params > 1e9
    assert miner_free_bytes(params, keep) == params * (2 * 4 + 3 * 12)
    need = miner_free_bytes(params, keep)
    free = shutil.disk_usage(tmp_path).free
    assert need > free, "this machine has room for a preview student's checkpoints: pick a larger preset"
    refused(capsys, [*argv, "--set", "student.preset=preview"], match="'preview' student")
    _, out, _, _ = run(capsys, ["doctor", *argv])  # the default config's tiny student fits
    disk = next(line for line in out.splitlines() if line.split()[1] == "disk")
    assert disk.split()[0] == "ok" and "'tiny' student" in disk, disk
