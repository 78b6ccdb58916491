"""Red team, commitments (issue 11, attack 2: ownership theft), against the real validator on a
local chain.

Before: a commitment carried a bare prefix of the model hash, the miner published its files before
committing, and a same-block tie went to the lower hotkey. A copier who saw the hash committed it
in the victim's block from a low-sorting hotkey and took the victim's weight.

Now: the commitment binds the model to the committing hotkey, the miner's files stay unreadable
until its commitment's block is closed (tests/test_miner_publish.py), and nothing inside a block
orders commitments (eval.scoring). Each attack ends with the copier at 0 and the validator running.
"""
import shutil
import threading

from neurons.commitment import encode_commitment
from neurons.keys import local_keypair
from neurons.miner import Miner, MinerSettings
from neurons.state import ValidatorState
from neurons.storage import publish
from test_redteam_fetch import Net, models, rejection  # noqa: F401  (models: a fixture)


def low_sorting_name(net: Net, below: str) -> str:
    """A miner name whose hotkey sorts before `below`: the hotkey order used to win ties."""
    for i in range(200):
        name = f"copier{i}"
        if local_keypair(f"{name}-default", net.keys).ss58_address < below:
            return name
    raise AssertionError("no low-sorting hotkey in 200 tries")


def run_round(net: Net, work) -> ValidatorState:
    net.chain.advance(25)
    assert net.validator_for(work).run(max_rounds=1) == 1
    return ValidatorState(work / "validator.db")


def test_2_a_commitment_copied_to_another_hotkey_names_nothing(tmp_path, models):
    net = Net(tmp_path)
    victim = net.hotkey("victim")
    data = encode_commitment(publish(models["a"], "local", hotkey=victim, storage_root=net.storage,
                                     location="victim/ckpt"))
    copier_name = low_sorting_name(net, victim)
    assert net.commit("victim", data) == victim
    copier = net.commit(copier_name, data)  # the same string, the same block, a hotkey that sorts first
    assert copier < victim
    state = run_round(net, tmp_path / "v")
    s = rejection(state, copier)
    assert s.stage == "manifest" and "copied from another hotkey" in s.reason, s.reason
    assert net.weight(victim) == 1.0 and net.weight(copier) == 0.0


def test_2_leaked_weights_committed_in_the_victims_block_win_nothing(tmp_path, models):
    """A copier who got the files before the victim's block closed (the miner's order prevents it;
    a leak would not) commits them bound to its own hotkey in the same block, sorting first."""
    net = Net(tmp_path)
    victim = net.hotkey("victim")
    net.commit("victim", encode_commitment(publish(models["a"], "local", hotkey=victim, storage_root=net.storage,
                                                   location="victim/ckpt")))
    copier_name = low_sorting_name(net, victim)
    leaked = tmp_path / "leaked"
    shutil.copytree(models["a"], leaked)
    copier = net.commit(copier_name, encode_commitment(publish(
        leaked, "local", hotkey=net.hotkey(copier_name), storage_root=net.storage, location="copier/ckpt")))
    other = net.commit("other", encode_commitment(publish(
        models["b"], "local", hotkey=net.hotkey("other"), storage_root=net.storage, location="other/ckpt")))
    state = run_round(net, tmp_path / "v")
    scores = {s["hotkey"]: s for s in state.scores(state.last_round().id)}
    assert scores[copier]["gate"] == scores[victim]["gate"] == "exact_copy"
    assert "2 hotkeys in one block" in scores[copier]["axes"]["gate_reason"]
    assert net.weight(copier) == 0.0 and net.weight(other) == 1.0  # a shared first commitment is no one's


def test_2_a_copy_made_once_the_files_are_readable_lands_later_and_gets_nothing(tmp_path, models):
    """The victim publishes as the miner does (stage, commit, release after its block closes); the
    copier takes the files the moment they are readable and commits at once."""
    net = Net(tmp_path)
    kp = net.key("victim")
    export = tmp_path / "exports" / "step-0000100"
    shutil.copytree(models["a"], export, ignore=shutil.ignore_patterns("manifest.json"))
    miner = Miner(net.chain, kp, net.competition, MinerSettings(
        work_dir=tmp_path / "miner", storage="local", storage_root=net.storage, poll_seconds=0.01))
    producing = threading.Event()

    def produce_blocks():  # the chain keeps producing blocks while the miner waits for its own to close
        while not producing.wait(0.02):
            net.chain.advance(1)

    producer = threading.Thread(target=produce_blocks)
    producer.start()
    try:
        assert miner.publish(export, 0.5)
    finally:
        producing.set()
        producer.join()
    published = miner.state["published"]
    copier_name = low_sorting_name(net, kp.ss58_address)
    stolen = tmp_path / "stolen"
    shutil.copytree(published, stolen)
    copier = net.commit(copier_name, encode_commitment(publish(
        stolen, "local", hotkey=net.hotkey(copier_name), storage_root=net.storage, location="copier/ckpt")))
    assert net.chain.commitment_history(copier)[-1].block > miner.state["commit_block"]
    state = run_round(net, tmp_path / "v")
    scores = {s["hotkey"]: s for s in state.scores(state.last_round().id)}
    assert scores[copier]["gate"] == "exact_copy" and scores[kp.ss58_address]["gate"] is None
    assert net.weight(kp.ss58_address) == 1.0 and net.weight(copier) == 0.0
