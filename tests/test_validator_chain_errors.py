"""A validator survives chain errors (issue 12, item 2): reads and writes that fail a few times and
then work cost a logged backoff, never the process or the round's stored work.

The submission is a real tiny checkpoint, fetched and checked for real; its evaluation is a fixed
result (scoring is not under test here, and an isolated evaluation costs a minute on 2 busy cores)."""
from __future__ import annotations

import logging

from eval.results import ItemResult, SubmissionResult
from neurons.commitment import encode_commitment
from neurons.localchain import LocalChain
from neurons.state import ValidatorState
from neurons.storage import publish
from neurons.subtensor_chain import ChainRpcError
from neurons.validator import Validator
from test_validator import Subnet, small_competition, student


def fixed_result(path, seed, model_hash) -> dict:
    items = [it for i in range(4) for it in (ItemResult("kl", f"d{i}", 0.5 + i / 10),
                                             ItemResult("ce", f"d{i}", 3.0, teacher_ce=2.5),
                                             ItemResult("recall", f"r{i}", float(i % 2)))]
    return SubmissionResult("?", model_hash, 0, items, fingerprint=[0.1, -0.2, 0.3, 0.05],
                            continuations=[[1, 2, 3, 4, 5, 6]]).to_dict()


class Flaky(LocalChain):
    """The local chain behind a connection that drops: `block` fails on its first calls, `commitments`
    once, `metagraph` twice while the round is in its score phase, and the first weights write lands
    but its answer is lost (the outcome a dropped RPC leaves unknown)."""

    def __init__(self, *a, phase, **kw):
        super().__init__(*a, **kw)
        self.phase = phase
        self.fails = {"block": 2, "commitments": 1, "metagraph": 2, "set_weights": 1}
        self.landed_weights = 0

    def _drop(self, what: str) -> None:
        if self.fails[what] > 0:
            self.fails[what] -= 1
            raise ChainRpcError(f"{what} on finney: RPC connection failed: websocket closed by peer")

    def block(self):
        self._drop("block")
        return super().block()

    def commitments(self):
        self._drop("commitments")
        return super().commitments()

    def metagraph(self):
        if self.phase() == "score":
            self._drop("metagraph")
        return super().metagraph()

    def set_weights(self, keypair, uids, weights):
        ok = super().set_weights(keypair, uids, weights)
        self.landed_weights += ok
        self._drop("set_weights")
        return ok


def test_the_validator_backs_off_and_resumes_its_round_after_chain_errors(tmp_path, caplog):
    raw = small_competition()
    raw["score"]["degenerate_max_repeat"] = 1.0  # weights must be set whatever the random seed (see test_validator)
    net = Subnet(tmp_path, raw)
    miner = net.commit("a", encode_commitment(publish(student(tmp_path / "a", seed=1), "local", hotkey=net.hotkey("a"),
                                                      storage_root=net.storage, location="a/ckpt")))
    net.chain.advance(25)
    work = tmp_path / "v"
    state = ValidatorState  # read the round's phase from the validator's own state file

    def phase():
        if not (work / "validator.db").exists():
            return None
        r = state(work / "validator.db").unfinished_round()
        return r and r.phase

    chain = Flaky(net.chain.path, phase=phase)
    evaluated = []
    v = Validator(chain, net.validator, net.competition, net.settings(work),
                  evaluate=lambda *a: evaluated.append(a[2]) or fixed_result(*a))
    with caplog.at_level(logging.WARNING, logger="validator"):
        assert v.run(max_rounds=1) == 1
    assert chain.fails == {"block": 0, "commitments": 0, "metagraph": 0, "set_weights": 0}
    errors = [r.fields for r in caplog.records if r.getMessage() == "chain error"]
    assert len(errors) == 6 and all("websocket closed by peer" in e["error"] for e in errors)
    # doubling from poll_seconds (0.05), reset by every success in between
    assert [e["retry_in"] for e in errors[:2]] == [0.05, 0.1]
    assert {e["phase"] for e in errors} >= {"fetch", "score", "weights"}
    # the round kept its work: one evaluation of the one submission, one weights write on chain
    assert len(evaluated) == 1
    assert chain.landed_weights == 1
    s = ValidatorState(work / "validator.db")
    r = s.last_round()
    assert r.phase == "done" and [x["hotkey"] for x in s.scores(r.id)] == [miner]
    assert net.chain.latest_weights(net.validator.ss58_address)
