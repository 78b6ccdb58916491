"""LocalChain: the embedded chain every localnet process shares (CPU, a few seconds)."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import sqlite3
import stat
import time

import pytest
from bittensor.sp_core import Keypair

from neurons.chain import MAX_COMMITMENT_BYTES, Chain, InvalidSignature, InvalidWrite, NotPermitted
from neurons.keys import load_wallet, local_keypair
from neurons.localchain import SIGNATURE_TTL_BLOCKS, LocalChain

ALICE, BOB, CHARLIE, DAVE = (Keypair.create_from_uri(u) for u in ("//Alice", "//Bob", "//Charlie", "//Dave"))
COLD = Keypair.create_from_uri("//Ferdie").ss58_address


@pytest.fixture
def chain(tmp_path):
    """Alice validates (stake 10 >= 1), Bob and Charlie mine; the clock moves only by advance()."""
    c = LocalChain(tmp_path / "chain.db", weights_rate_limit=5)
    c.register(ALICE, COLD, stake=10.0)
    c.register(BOB, COLD)
    c.register(CHARLIE, COLD)
    return c


def test_registration_and_metagraph(tmp_path, chain):
    assert isinstance(chain, Chain)
    mg = chain.metagraph()
    assert mg.netuid == 24 and len(mg) == 3 and mg.uids == (0, 1, 2)
    assert mg.hotkeys == (ALICE.ss58_address, BOB.ss58_address, CHARLIE.ss58_address)
    assert mg.coldkeys == (COLD,) * 3
    assert mg.stakes == (10.0, 0.0, 0.0) and mg.validator_permit == (True, False, False)
    assert mg.uid_of(BOB.ss58_address) == 1 and mg.uid_of(DAVE.ss58_address) is None
    with pytest.raises(InvalidWrite, match="already registered"):
        chain.register(BOB, COLD)
    with pytest.raises(InvalidWrite):
        chain.register(DAVE, "not-an-address")
    # Max uids, and the genesis parameters are the file's: a conflicting opener is refused.
    small = LocalChain(tmp_path / "small.db", max_uids=1)
    small.register(ALICE, COLD)
    with pytest.raises(Exception, match="full"):
        small.register(BOB, COLD)
    with pytest.raises(ValueError, match="max_uids"):
        LocalChain(tmp_path / "small.db", max_uids=2)
    assert LocalChain(tmp_path / "small.db").metagraph().hotkeys == (ALICE.ss58_address,)


def test_commit_history_latest_and_size_limit(chain):
    assert chain.commitments() == {}
    chain.advance(3)
    assert chain.commit(BOB, "hf:bob/model@r1#aa") == 3
    chain.advance(2)
    assert chain.commit(BOB, "hf:bob/model@r2#bb") == 5
    chain.commit(CHARLIE, "local:/tmp/c#cc")
    latest = chain.commitments()
    assert set(latest) == {BOB.ss58_address, CHARLIE.ss58_address}
    rec = latest[BOB.ss58_address]
    assert (rec.uid, rec.data, rec.block) == (1, "hf:bob/model@r2#bb", 5)
    assert [(r.data, r.block) for r in chain.commitment_history(BOB.ss58_address)] == [
        ("hf:bob/model@r1#aa", 3), ("hf:bob/model@r2#bb", 5)]
    # 128 utf-8 bytes is the limit, counted in bytes, not characters.
    chain.commit(BOB, "x" * MAX_COMMITMENT_BYTES)
    for too_big in ("x" * (MAX_COMMITMENT_BYTES + 1), "é" * 65, ""):
        with pytest.raises(InvalidWrite):
            chain.commit(BOB, too_big)
    with pytest.raises(NotPermitted):
        chain.commit(DAVE, "unregistered")
    assert len(chain.commitment_history(BOB.ss58_address)) == 3


def test_sealed_commitments_are_unreadable_until_they_open_then_count_from_their_block(chain):
    chain.advance(3)
    chain.commit(BOB, "old")
    sealed = chain.commit_sealed(BOB, "new", reveal_in_blocks=4)
    assert sealed == (3, 7)
    # as on chain, the sealed one replaced the old one: the hotkey shows nothing until it opens
    assert BOB.ss58_address not in chain.commitments()
    assert [r.data for r in chain.commitment_history(BOB.ss58_address)] == ["old"]
    chain.advance(3)
    assert BOB.ss58_address not in chain.commitments()
    chain.advance(1)
    rec = chain.commitments()[BOB.ss58_address]
    assert (rec.data, rec.block) == ("new", 3)  # its landing block, not its opening
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="reveal_in_blocks"):
            chain.commit_sealed(BOB, "x", reveal_in_blocks=bad)
    with pytest.raises(InvalidWrite):
        chain.commit_sealed(BOB, "x" * (MAX_COMMITMENT_BYTES + 1), reveal_in_blocks=1)
    with pytest.raises(NotPermitted):
        chain.commit_sealed(DAVE, "unregistered", reveal_in_blocks=1)
    # the delay is signed: a relayer cannot shorten it
    write = chain.sign(CHARLIE, "commit_sealed", '{"data": "c", "reveal_in_blocks": 50}')
    forged = dataclasses.replace(write, payload='{"data": "c", "reveal_in_blocks": 1}')
    with pytest.raises(InvalidSignature):
        chain.submit(forged)


def test_weights_rate_limit_permit_and_validation(chain):
    assert chain.weights_rate_limit() == 5 and chain.last_weights_block(ALICE.ss58_address) is None
    assert chain.set_weights(ALICE, [1, 2], [3.0, 1.0]) is True
    assert chain.latest_weights(ALICE.ss58_address) == {1: 0.75, 2: 0.25}
    assert chain.last_weights_block(ALICE.ss58_address) == 0
    assert chain.set_weights(ALICE, [1], [1.0]) is False  # refused: same block
    chain.advance(4)
    assert chain.set_weights(ALICE, [1], [1.0]) is False  # 4 < 5 blocks
    chain.advance(1)
    assert chain.set_weights(ALICE, [2], [2.0]) is True
    assert chain.latest_weights(ALICE.ss58_address) == {2: 1.0} and chain.last_weights_block(ALICE.ss58_address) == 5
    chain.advance(5)
    for uids, weights in (([1], [float("nan")]), ([1], [-0.1]), ([1, 2], [1.0]), ([1, 1], [1.0, 1.0]),
                          ([9], [1.0]), ([1], [0.0]), ([], [])):
        with pytest.raises(InvalidWrite):
            chain.set_weights(ALICE, uids, weights)
    with pytest.raises(NotPermitted):  # a miner has no validator permit
        chain.set_weights(BOB, [0], [1.0])
    with pytest.raises(NotPermitted):  # an unregistered hotkey neither
        chain.set_weights(DAVE, [0], [1.0])


def test_the_validators_weights_are_normalised_once_and_reach_the_chain_as_sent(chain):
    """eval.scoring.normalized is where a validator's weights are normalised: its EMA by hotkey, put
    on the metagraph's uids, a hotkey no longer registered dropped and its share given to the rest.
    The chain's own check of the write changes them by rounding only."""
    from eval.scoring import normalized

    ema = {CHARLIE.ss58_address: 0.1, BOB.ss58_address: 0.3, DAVE.ss58_address: 0.6}  # DAVE: not registered
    weights = normalized(ema, chain.metagraph().uid_of)
    bob, charlie = chain.metagraph().uid_of(BOB.ss58_address), chain.metagraph().uid_of(CHARLIE.ss58_address)
    assert weights == pytest.approx({bob: 0.75, charlie: 0.25}, rel=1e-15)
    assert chain.set_weights(ALICE, list(weights), list(weights.values())) is True
    assert chain.latest_weights(ALICE.ss58_address) == pytest.approx(weights, rel=1e-15, abs=0)
    assert normalized({BOB.ss58_address: 0.0}, chain.metagraph().uid_of) == {}  # nothing earned: nothing sent


def test_forged_and_replayed_writes_are_rejected(tmp_path, chain):
    genuine = chain.sign(BOB, "commit", "hf:bob/model@r1#aa")
    # Another key signs a write that claims to be Bob's.
    forged = dataclasses.replace(chain.sign(DAVE, "commit", "hf:evil#00"), hotkey=BOB.ss58_address)
    # Bob's real signature on a payload someone altered in flight.
    tampered = dataclasses.replace(genuine, payload="hf:evil#00")
    # A write claiming another block than the one signed.
    moved = dataclasses.replace(genuine, block=genuine.block + 1)
    weights = dataclasses.replace(chain.sign(BOB, "weights", '{"uids":[1],"weights":[1]}'), hotkey=ALICE.ss58_address)
    for bad in (forged, tampered, moved, weights, dataclasses.replace(genuine, signature=b"\0" * 64),
                dataclasses.replace(genuine, signature=b"short")):
        with pytest.raises(InvalidSignature):
            chain.submit(bad)
    with pytest.raises(InvalidSignature):  # only the public key: nothing to sign with
        chain.commit(Keypair(ss58_address=BOB.ss58_address), "hf:evil#00")
    assert chain.commitments() == {}
    # A genuine write lands once; replaying it is refused; a write signed for another chain too.
    assert chain.submit(genuine) == 0
    with pytest.raises(InvalidSignature, match="replayed"):
        chain.submit(genuine)
    other = LocalChain(tmp_path / "other.db")
    other.register(BOB, COLD)
    with pytest.raises(InvalidSignature):
        chain.submit(other.sign(BOB, "commit", "hf:bob/model@r9#ff"))
    # An old signature expires.
    stale = chain.sign(BOB, "commit", "hf:bob/model@r3#cc")
    chain.advance(SIGNATURE_TTL_BLOCKS + 1)
    with pytest.raises(InvalidSignature, match="signed for block"):
        chain.submit(stale)
    assert [r.data for r in chain.commitment_history(BOB.ss58_address)] == ["hf:bob/model@r1#aa"]


def _writer(args):
    """One localnet participant in its own process: register, then commit while moving the clock."""
    chain, index, n = args  # the chain arrives pickled: just its path and genesis, no connection
    key = Keypair.create_from_uri(f"//writer{index}")
    chain.register(key, COLD)
    for j in range(n):
        chain.commit(key, f"hf:w{index}/m@{j}#00")
        chain.advance(1)
    return key.ss58_address, chain.block_hash(0)


def _weights_once(chain):
    return chain.set_weights(ALICE, [0], [1.0])


def test_concurrent_writers_from_processes(tmp_path):
    path = tmp_path / "shared.db"
    chain = LocalChain(path)
    workers, n = 4, 12
    assert workers * n < SIGNATURE_TTL_BLOCKS  # so a write queued behind all the others stays valid
    chain.block()  # the parent holds an open connection while the children write
    # fork: separate processes without re-importing bittensor in each (spawn costs seconds here)
    with mp.get_context("fork").Pool(workers) as pool:
        results = pool.map(_writer, [(chain, i, n) for i in range(workers)])
    assert {genesis for _, genesis in results} == {chain.block_hash(0)}  # same hash in every process
    hotkeys = [hotkey for hotkey, _ in results]
    assert sorted(chain.metagraph().uids) == list(range(workers))
    assert set(chain.metagraph().hotkeys) == set(hotkeys)
    assert chain.block() == workers * n  # every advance counted, none lost
    for i, hotkey in enumerate(hotkeys):
        history = chain.commitment_history(hotkey)
        assert [r.data for r in history] == [f"hf:w{i}/m@{j}#00" for j in range(n)]
        assert [r.block for r in history] == sorted(r.block for r in history)
        assert chain.commitments()[hotkey].data == f"hf:w{i}/m@{n - 1}#00"
    # The rate-limit check and the insert are one transaction: racing validator processes of the
    # same hotkey get exactly one write through.
    chain.register(ALICE, COLD, stake=10.0)
    with mp.get_context("fork").Pool(workers) as pool:
        assert sorted(pool.map(_weights_once, [chain] * workers)) == [False] * (workers - 1) + [True]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_block_clock_explicit_and_time_based(tmp_path):
    explicit = LocalChain(tmp_path / "explicit.db")
    assert explicit.block_time is None and explicit.block() == 0
    assert explicit.advance(7) == 7 and LocalChain(tmp_path / "explicit.db").block() == 7  # shared
    with pytest.raises(ValueError):
        explicit.advance(-1)

    now = [1000.0]
    timed = LocalChain(tmp_path / "timed.db", block_time=12.0, clock=lambda: now[0])
    assert timed.block() == 0
    now[0] += 25.0
    assert timed.block() == 2  # two whole 12 s blocks
    assert timed.advance(3) == 5  # a fast-forward on top of wall time
    now[0] -= 100.0  # a wall clock stepped backwards never goes below the advanced offset
    assert timed.block() == 3
    with pytest.raises(ValueError, match="block_time"):
        LocalChain(tmp_path / "timed.db", block_time=1.0)

    real = LocalChain(tmp_path / "real.db", block_time=0.05)
    time.sleep(0.2)
    assert 3 <= real.block() <= 10


def test_block_hash_deterministic_and_per_block(tmp_path):
    a = LocalChain(tmp_path / "a.db")
    a.advance(3)
    hashes = [a.block_hash(n) for n in range(4)]
    assert len(set(hashes)) == 4 and all(h.startswith("0x") and len(h) == 66 for h in hashes)
    assert [LocalChain(tmp_path / "a.db").block_hash(n) for n in range(4)] == hashes  # reopened
    assert LocalChain(tmp_path / "b.db").block_hash(0) != hashes[0]  # another chain
    with pytest.raises(ValueError, match="does not exist"):
        a.block_hash(4)  # future hashes would leak round seeds


def test_local_keypair_persists_and_reloads(tmp_path):
    keydir = tmp_path / "keys"
    first = local_keypair("miner-0", keydir)
    again = local_keypair("miner-0", keydir)
    assert first.ss58_address == again.ss58_address and first.public_key == again.public_key
    assert again.verify(b"msg", first.sign(b"msg"))
    assert local_keypair("miner-1", keydir).ss58_address != first.ss58_address
    path = keydir / "miner-0.mnemonic"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().split()) == 12
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError):
        local_keypair("miner-0", keydir)
    with pytest.raises(ValueError):
        local_keypair("../escape", keydir)


def test_load_wallet_reads_existing_files_only(tmp_path):
    from bittensor.wallet import Wallet

    wallet = Wallet("owner", "hot1", path=str(tmp_path))
    wallet.create_new_coldkey(use_password=False, suppress=True)
    wallet.create_new_hotkey(use_password=False, suppress=True)
    keys = load_wallet("owner", "hot1", tmp_path)
    assert keys.hotkey_ss58 == wallet.hotkey.ss58_address and keys.coldkey_ss58 == wallet.coldkeypub.ss58_address
    assert keys.hotkey.verify(b"m", keys.hotkey.sign(b"m"))
    with pytest.raises(FileNotFoundError):
        load_wallet("owner", "missing", tmp_path)
    assert not (tmp_path / "owner" / "hotkeys" / "missing").exists()
