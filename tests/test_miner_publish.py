"""The miner's publishing order (issue 11, item 2): stage unreadable, commit (sealed where the
chain can), release only once the commitment has landed; a restart in between finishes the job."""
from __future__ import annotations

import json
import threading

import pytest

from eval.competition import load_competition
from neurons.commitment import parse_commitment
from neurons.keys import local_keypair
from neurons.localchain import LocalChain
from neurons.manifest import read_manifest
from neurons.miner import Miner, MinerSettings
from neurons.storage import fetch
from neurons.storage.core import FetchLimits
from neurons.validator import student_limits
from test_validator import student

COMPETITION = load_competition("localnet")


class Watched(LocalChain):
    """The local chain, noting what a validator could read at the moment each commitment lands,
    and producing the next block once one is asked for after a commitment (as a real chain does)."""

    def __init__(self, *a, readable, **kw):
        super().__init__(*a, **kw)
        self.readable, self.seen, self.produce = readable, [], False

    def block(self):
        if self.produce:
            self.produce = False
            self.advance(1)
        return super().block()

    def commit_sealed(self, keypair, data, *, reveal_in_blocks):
        self.seen.append(("sealed", reveal_in_blocks, self.readable()))
        landed = super().commit_sealed(keypair, data, reveal_in_blocks=reveal_in_blocks)
        self.hidden_when_landed = keypair.ss58_address not in self.commitments()
        self.produce = True
        return landed

    def commit(self, keypair, data):
        self.seen.append(("plain", None, self.readable()))
        landed = super().commit(keypair, data)
        self.produce = True
        return landed


@pytest.fixture
def setup(tmp_path):
    storage = tmp_path / "storage"
    released = lambda: [p.name for p in storage.glob("*/*/*") if not p.name.startswith(".")]  # noqa: E731
    chain = Watched(tmp_path / "chain.db", readable=released)
    keys = tmp_path / "keys"
    kp = local_keypair("miner", keys)
    chain.register(kp, local_keypair("cold", keys).ss58_address)
    chain.advance(5)
    export = student(tmp_path / "exports" / "step-0000010", seed=1)
    return chain, kp, storage, export


def miner(tmp_path, chain, kp, storage, **kw) -> Miner:
    settings = MinerSettings(work_dir=tmp_path / "work", storage="local", storage_root=storage, poll_seconds=0.01, **kw)
    return Miner(chain, kp, COMPETITION, settings)


def test_weights_are_unreadable_until_the_sealed_commitment_has_landed(tmp_path, setup):
    chain, kp, storage, export = setup
    m = miner(tmp_path, chain, kp, storage)
    assert m.publish(export, 0.5)
    # committed sealed for half the evaluation delay, with nothing released at that moment
    assert chain.seen == [("sealed", max(1, COMPETITION.schedule.eval_delay_blocks // 2), [])]
    state = json.loads((tmp_path / "work" / "miner.json").read_text())
    assert state["pending"] is None and state["commit_block"] == 5
    assert chain.hidden_when_landed  # sealed: in its block a copier reads nothing
    chain.advance(COMPETITION.schedule.eval_delay_blocks)
    record = chain.commitments()[kp.ss58_address]
    assert record.block == 5 and record.data == state["commitment"]
    # what a validator then fetches is this model, bound to this hotkey
    got = fetch(record.data, tmp_path / "dest", limits=FetchLimits(student_limits(COMPETITION)),
                miner_hotkey=kp.ss58_address, storage_root=storage, localnet=True)
    model_hash = read_manifest(got).model_hash
    assert model_hash == read_manifest(state["published"]).model_hash
    assert not parse_commitment(record.data, localnet=True).matches(model_hash, "5Fcopier")


def test_unsealed_when_asked_and_on_chains_without_seals(tmp_path, setup):
    chain, kp, storage, export = setup
    m = miner(tmp_path, chain, kp, storage, seal_blocks=0)
    assert m.publish(export, 0.5)
    assert chain.seen == [("plain", None, [])]
    assert chain.commitments()[kp.ss58_address].block == 5


def test_the_miners_metrics_show_its_commits(tmp_path, setup):
    from test_metrics import scrape

    chain, kp, storage, export = setup
    m = miner(tmp_path, chain, kp, storage, seal_blocks=0, metrics_port=0)
    m.start_metrics_server()
    try:
        before = scrape(m.metrics_server.url)
        assert before["quasar_miner_last_commit_block"]["samples"] == {("quasar_miner_last_commit_block", ()): 0}
        m._on_step({"step": 7, "loss": 2.5})  # what Trainer.train hands over after each step
        assert m.publish(export, 0.5)
        after = scrape(m.metrics_server.url)
    finally:
        m.stop()
    value = lambda family, name=None: after[family]["samples"][(name or family, ())]  # noqa: E731
    assert (value("quasar_miner_step"), value("quasar_miner_loss")) == (7, 2.5)
    assert value("quasar_miner_last_commit_block") == chain.commitments()[kp.ss58_address].block == 5
    assert value("quasar_miner_commits", "quasar_miner_commits_total") == 1
    assert value("quasar_miner_best_score") == 0.5
    assert value("quasar_miner_commit_failures", "quasar_miner_commit_failures_total") == 0
    # a restart reads the last commit block back from miner.json
    again = miner(tmp_path, chain, kp, storage)
    assert "quasar_miner_last_commit_block 5.0" in again.metrics.render()


def test_a_miner_stopped_between_commit_and_release_finishes_on_restart(tmp_path, setup, monkeypatch):
    chain, kp, storage, export = setup
    import neurons.storage

    def killed(*a, **kw):
        raise KeyboardInterrupt("killed between commit and release")

    m = miner(tmp_path, chain, kp, storage, seal_blocks=0)
    with monkeypatch.context() as patch:
        patch.setattr(neurons.storage, "release", killed)
        with pytest.raises(KeyboardInterrupt):
            m.publish(export, 0.5)
    staged = [p.name for p in storage.glob("*/*/*")]
    assert chain.seen[-1][2] == [] and len(staged) == 1 and staged[0].startswith(".unreleased-")
    assert json.loads((tmp_path / "work" / "miner.json").read_text())["pending"]["score"] == 0.5
    chain.advance(2)
    # copy_from and a set stop: run() finishes what is pending and returns without training
    again = miner(tmp_path, chain, kp, storage, seal_blocks=0, copy_from=tmp_path / "nobody")
    again.stop_event.set()
    again.run()
    state = json.loads((tmp_path / "work" / "miner.json").read_text())
    assert state["pending"] is None and state["best"] == 0.5
    assert len(chain.commitment_history(kp.ss58_address)) == 2  # committed again: harmless, same model
    token = parse_commitment(state["commitment"], localnet=True).revision
    assert token in [p.name for p in storage.glob("*/*/*")]


class Failing(Watched):
    """Commits fail with an RPC error `fails` times (a dropped connection; `landed` ones land anyway)."""

    def __init__(self, *a, fails, landed=(), **kw):
        super().__init__(*a, **kw)
        self.fails, self.landed, self.attempts = fails, set(landed), 0

    def _attempt(self, send):
        from neurons.subtensor_chain import ChainRpcError

        self.attempts += 1
        if self.attempts <= self.fails:
            if self.attempts in self.landed:
                send()
            raise ChainRpcError("committing on finney: RPC failed (websocket closed); the write may or may not have landed")
        return send()

    def commit(self, keypair, data):
        return self._attempt(lambda: super(Failing, self).commit(keypair, data))

    def commit_sealed(self, keypair, data, *, reveal_in_blocks):
        return self._attempt(lambda: super(Failing, self).commit_sealed(keypair, data, reveal_in_blocks=reveal_in_blocks))


def failing(setup, **kw) -> Failing:
    """The same chain file as `setup`'s, reached through a failing connection."""
    return Failing(setup[0].path, readable=setup[0].readable, **kw)


def test_a_failed_commit_is_logged_and_retried_with_backoff(tmp_path, setup, caplog):
    chain, kp, storage, export = setup
    flaky = failing(setup, fails=2)
    m = miner(tmp_path, flaky, kp, storage, commit_retry_seconds=0.01)
    with caplog.at_level("WARNING", logger="miner"):
        assert m.publish(export, 0.5)
    failed = [r for r in caplog.records if r.getMessage() == "commit failed"]
    assert [r.fields["attempt"] for r in failed] == [1, 2]
    assert [r.fields["retry_in"] for r in failed] == [0.01, 0.02]  # doubling
    assert "websocket closed" in failed[0].fields["error"]
    assert json.loads((tmp_path / "work" / "miner.json").read_text())["pending"] is None
    assert flaky.attempts == 3 and len(chain.commitment_history(kp.ss58_address)) == 1


def test_a_plain_commit_whose_rpc_failed_but_landed_is_not_sent_twice(tmp_path, setup):
    chain, kp, storage, export = setup
    flaky = failing(setup, fails=1, landed={1})
    m = miner(tmp_path, flaky, kp, storage, seal_blocks=0, commit_retry_seconds=0.01)
    assert m.publish(export, 0.5)
    assert flaky.attempts == 1 and len(chain.commitment_history(kp.ss58_address)) == 1
    state = json.loads((tmp_path / "work" / "miner.json").read_text())
    assert state["pending"] is None and state["commit_block"] == chain.commitments()[kp.ss58_address].block


def test_a_commit_still_failing_when_stopped_is_finished_by_a_rerun(tmp_path, setup, monkeypatch, caplog):
    chain, kp, storage, export = setup
    down = failing(setup, fails=10 ** 6)
    m = miner(tmp_path, down, kp, storage, commit_retry_seconds=0.01)
    threading.Timer(0.3, m.stop_event.set).start()  # the operator stops it while the chain is down
    assert m.publish(export, 0.5) is False
    assert down.attempts >= 2
    state = json.loads((tmp_path / "work" / "miner.json").read_text())
    assert state["pending"]["score"] == 0.5 and state["commitment"] is None  # not lost: pending
    assert kp.ss58_address not in chain.commitments()
    # the rerun on the same work dir finishes the commitment (and says so) before training anything
    order = []
    monkeypatch.setattr(Miner, "train_loop", lambda self: order.append(("train", self.state["pending"])))
    again = miner(tmp_path, chain, kp, storage, serve_after_training=False)
    with caplog.at_level("INFO", logger="miner"):
        again.run()
    assert order == [("train", None)]
    assert [r.getMessage() for r in caplog.records if r.getMessage() in (
        "finishing pending commitment", "committed")] == ["finishing pending commitment", "committed"]
    state = json.loads((tmp_path / "work" / "miner.json").read_text())
    assert state["pending"] is None and state["best"] == 0.5 and state["commit_block"] is not None
    assert len(chain.commitment_history(kp.ss58_address)) == 1


def test_a_refusal_no_retry_can_change_is_raised_and_stays_pending(tmp_path, setup):
    from neurons.chain import NotPermitted

    chain, kp, storage, export = setup
    stranger = local_keypair("stranger", tmp_path / "keys")  # never registered
    m = miner(tmp_path, chain, stranger, storage, commit_retry_seconds=0.01)
    with pytest.raises(NotPermitted):
        m.publish(export, 0.5)
    assert json.loads((tmp_path / "work" / "miner.json").read_text())["pending"]["score"] == 0.5
