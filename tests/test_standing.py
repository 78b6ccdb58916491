"""`quasar status --netuid N --hotkey SS58` (issue 12): a miner's latest commitment, eligibility
block and the weights, rank and incentive validators give it. Run through `neurons.cli.main` in
this process, on the local chain with real registrations, commitments and weights, and on the
substrate stand-in of tests/test_subtensor_chain.py (the SDK's reads are real)."""
from __future__ import annotations

import json

import pytest

from eval.competition import load_competition
from neurons import cli, network
from neurons.keys import local_keypair
from neurons.localchain import LocalChain
from neurons.standing import eligibility
from neurons.subtensor_chain import SubtensorChain
from test_subtensor_chain import BOB, COMMIT, DAVE, NETUID, FakeChain

LOCALNET = load_competition("localnet").schedule  # cadence 10, eval delay 2


def status(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = cli.main(["status", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eligibility_follows_the_validators_cutoff():
    # a round at sync block S takes commitments landed at or before S - eval_delay
    assert eligibility(3, LOCALNET) == (5, 10)
    assert eligibility(8, LOCALNET) == (10, 10)
    assert eligibility(9, LOCALNET) == (11, 20)
    assert eligibility(0, LOCALNET) == (2, 10)  # no round at block 0


@pytest.fixture
def local(tmp_path):
    """Two validators (stakes 300 and 100) weighting three miners; the third miner committed a
    string validators refuse."""
    chain = LocalChain(tmp_path / "chain.db")
    keys = tmp_path / "keys"
    cold = local_keypair("cold", keys).ss58_address
    v1, v2, m1, m2, m3 = (local_keypair(n, keys) for n in ("v1", "v2", "m1", "m2", "m3"))
    for kp, stake in ((v1, 300.0), (v2, 100.0), (m1, 0.0), (m2, 0.0), (m3, 0.0)):
        chain.register(kp, cold, stake=stake)  # uids 0..4
    chain.advance(7)
    chain.commit(m1, "q2:local:m1/step-1:tok1:" + "ab" * 16)  # block 7: eligible at 9, first round 10
    chain.advance(5)
    chain.commit(m1, "q2:local:m1/step-2:tok2:" + "cd" * 16)  # block 12: the latest counts
    chain.commit(m3, "q2:http:10.0.0.1:80:tok:" + "ef" * 16)  # a private host: refused off localnet only
    chain.set_weights(v1, [2, 3], [0.25, 0.75])
    chain.set_weights(v2, [2, 3], [0.5, 0.5])
    return chain, m1, m2, m3


def test_status_on_the_local_chain(capsys, local):
    chain, m1, m2, m3 = local
    base = ["--network", "localnet", "--chain.path", str(chain.path)]
    rc, out, err = status(capsys, [*base, "--hotkey", m1.ss58_address, "--json"])
    assert rc == 0, err
    s = json.loads(out)
    assert (s["uid"], s["block"], s["commit_block"]) == (2, 12, 12)
    assert s["commitment"] == "q2:local:m1/step-2:tok2:" + "cd" * 16
    assert s["decoded"] == {"kind": "local", "location": "m1/step-2", "revision": "tok2", "binding": "cd" * 16}
    assert (s["eligible_block"], s["first_round"]) == (14, 20)
    assert [(w["uid"], w["stake"], w["weight"], w["rank"]) for w in s["weights"]] == [(0, 300.0, 0.25, 2),
                                                                                     (1, 100.0, 0.5, 1)]
    # stake-weighted: (300 * 0.25 + 100 * 0.5) / 400; uid 3 has (300 * 0.75 + 100 * 0.5) / 400
    assert s["consensus"] == pytest.approx(0.3125) and s["rank"] == 2
    assert s["incentive"] is None  # the local chain runs no Yuma consensus

    rc, out, _ = status(capsys, [*base, "--hotkey", m2.ss58_address])
    assert rc == 0
    assert "uid 3" in out and "commitment: none readable" in out and "consensus weight 0.6875, rank 1" in out
    rc, out, _ = status(capsys, [*base, "--hotkey", m3.ss58_address])
    assert "kind http, location 10.0.0.1:80" in out  # localnet allows private hosts
    rc, out, _ = status(capsys, [*base, "--competition", "sn24", "--hotkey", m1.ss58_address])
    assert "eligible: from block 372; first evaluated by the round at sync block 720 (in 708 blocks)" in out


def test_status_refuses_bad_input_with_one_line(capsys, tmp_path, local):
    chain, m1, _, _ = local
    rc, out, err = status(capsys, ["--chain.path", str(chain.path), "--hotkey", "5nope"])
    [line] = err.splitlines()
    assert rc == 2 and out == "" and line.startswith("quasar status: error: --hotkey '5nope' is not an ss58 address (")
    missing = tmp_path / "nochain" / "chain.db"
    rc, out, err = status(capsys, ["--chain.path", str(missing), "--hotkey", m1.ss58_address])
    assert rc == 2 and err.splitlines() == [f"quasar status: error: no local chain at {missing} (--chain.path)"]
    assert not missing.parent.exists()


def test_status_on_the_substrate_stand_in(capsys, monkeypatch):
    fake = FakeChain()
    fake.maps["Commitments", "CommitmentOf", NETUID] = [
        (BOB.ss58_address, {"deposit": 0, "block": 950, "info": {"fields": [{f"Raw{len(COMMIT)}": "0x" + COMMIT.encode().hex()}]}})]
    # Alice (uid 0, the validator) set u16 weights: Bob 3 parts, Charlie 1
    fake.maps["SubtensorModule", "Weights", NETUID] = [(0, [(1, 65535), (2, 21845)])]
    monkeypatch.setattr(network, "open_chain_to_read",
                        lambda args: SubtensorChain(args.network, args.netuid, substrate=fake))
    rc, out, err = status(capsys, ["--network", "finney", "--hotkey", BOB.ss58_address, "--json"])
    assert rc == 0, err
    s = json.loads(out)
    assert (s["uid"], s["block"], s["commit_block"], s["commitment"]) == (1, 1000, 950, COMMIT)
    assert s["decoded"]["kind"] == "hf" and s["decoded"]["location"] == "quasar/long-1b"
    assert (s["eligible_block"], s["first_round"]) == (950 + 360, 1440)  # sn24: finney's own competition
    [alice] = s["weights"]
    assert (alice["uid"], alice["stake"], alice["rank"]) == (0, 5000.0, 1) and alice["weight"] == pytest.approx(0.75)
    assert s["rank"] == 1 and s["consensus"] == pytest.approx(0.75)
    assert s["incentive"] == 1.0  # the chain's own (u16 65535 of 65535)

    rc, out, _ = status(capsys, ["--network", "finney", "--hotkey", DAVE.ss58_address])
    assert rc == 0 and "not registered" in out and "commitment: none readable" in out
