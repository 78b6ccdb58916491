"""SubtensorChain through the real bittensor 11 SDK, against an in-memory chain (CPU, a few seconds).

Nothing of SubtensorChain or the SDK is mocked: the adapter drives the SDK's SyncClient, read
namespaces, SetWeights intent, executor and timelock code, and only the `bittensor.Substrate`
object under them (the SDK's RPC seam, what `RpcSubstrate` implements over a websocket) is the
`FakeChain` below. It answers with values shaped like the transport's decoded SCALE output, and it
composes calls with the SDK's real SCALE codec (bittensor_core) against a small runtime metadata
written here from subtensor's call signatures, so a payload the runtime types would not accept
fails here too. Submitted calls are decoded back, signed by the key the SDK hands over (checked
against its ss58 address), recorded, and applied to storage.
"""
from __future__ import annotations

import math
import pickle
from dataclasses import dataclass

import bittensor as bt
import bittensor_core
import pytest
from bittensor.result import chain_error_from_substrate_request
from bittensor.sp_core import Keypair, verify

from neurons.chain import Chain, ChainError, InvalidSignature, InvalidWrite, NotPermitted
from neurons.commitment import CommitmentRejected, parse_commitment
from neurons.chain import SealedCommit
from neurons.subtensor_chain import ChainRpcError, SubtensorChain

NETUID = 24
ALICE, BOB, CHARLIE, DAVE = (Keypair.create_from_uri(u) for u in ("//Alice", "//Bob", "//Charlie", "//Dave"))
COLD = Keypair.create_from_uri("//Ferdie").ss58_address
GONE = Keypair.create_from_uri("//Eve").ss58_address  # committed once, since deregistered
COMMIT = "q2:hf:quasar/long-1b:" + "ab" * 20 + ":" + "cd" * 16


# ---- a minimal runtime metadata (V14) for the calls under test --------------------------------

def _compact(n: int) -> bytes:
    if n < 1 << 6:
        return bytes([n << 2])
    if n < 1 << 14:
        return ((n << 2) | 1).to_bytes(2, "little")
    return ((n << 2) | 2).to_bytes(4, "little")


def _vec(items: list[bytes]) -> bytes:
    return _compact(len(items)) + b"".join(items)


def _str(text: str) -> bytes:
    return _vec([bytes([b]) for b in text.encode()])


def _opt(item: bytes | None) -> bytes:
    return b"\x00" if item is None else b"\x01" + item


def _build_runtime() -> bittensor_core.Runtime:
    """Metadata V14 (type registry, pallets, extrinsic) holding only what these tests send.

    Types follow subtensor's declarations: newtypes (NetUid, MechId, BoundedVec) are one-field
    composites and `Data`'s `RawN` variants carry N bytes, so the codec checks the payload shapes.
    """
    types: list[bytes] = []

    def add(path: list[str], type_def: bytes, params: tuple = ()) -> int:
        param_bytes = [_str(name) + _opt(_compact(t)) for name, t in params]
        types.append(_vec([_str(p) for p in path]) + _vec(param_bytes) + type_def + _vec([]))
        return len(types) - 1

    def field(t: int, name: str | None = None) -> bytes:
        return _opt(None if name is None else _str(name)) + _compact(t) + _opt(None) + _vec([])

    def composite(*fields: bytes) -> bytes:
        return b"\x00" + _vec(list(fields))

    def variant(*cases: tuple[str, list[bytes], int]) -> bytes:
        return b"\x01" + _vec([_str(n) + _vec(f) + bytes([i]) + _vec([]) for n, f, i in cases])

    def array(n: int, t: int) -> bytes:
        return b"\x03" + n.to_bytes(4, "little") + _compact(t)

    u8, u16, u64 = (add([], b"\x05" + bytes([k])) for k in (3, 4, 6))
    bytes_vec = add([], b"\x02" + _compact(u8))
    u16_vec = add([], b"\x02" + _compact(u16))
    bounded_bytes = add(["bounded_collections", "bounded_vec", "BoundedVec"], composite(field(bytes_vec)))
    h256, sig64 = add([], array(32, u8)), add([], array(64, u8))
    # pallet_commitments::Data: the Raw variant's name carries its byte length.
    raw = [(f"Raw{n}", [field(add([], array(n, u8)))], n + 1) for n in range(129)]
    data = add(["pallet_commitments", "types", "Data"], variant(
        ("None", [], 0), *raw, ("BlakeTwo256", [field(h256)], 130), ("Sha256", [field(h256)], 131),
        ("TimelockEncrypted", [field(bounded_bytes, "encrypted"), field(u64, "reveal_round")], 134),
    ))
    data_vec = add([], b"\x02" + _compact(data))
    fields = add(["bounded_collections", "bounded_vec", "BoundedVec"], composite(field(data_vec)))
    info = add(["pallet_commitments", "types", "CommitmentInfo"], composite(field(fields, "fields")))
    netuid = add(["subtensor_runtime_common", "NetUid"], composite(field(u16)))
    mecid = add(["subtensor_runtime_common", "MechId"], composite(field(u8)))
    commitments_call = add(["pallet_commitments", "pallet", "Call"], variant(
        ("set_commitment", [field(netuid, "netuid"), field(info, "info")], 0),
    ))
    subtensor_call = add(["pallet_subtensor", "pallet", "Call"], variant(
        ("set_mechanism_weights", [field(netuid, "netuid"), field(mecid, "mecid"), field(u16_vec, "dests"),
                                   field(u16_vec, "weights"), field(u64, "version_key")], 119),
        ("commit_timelocked_mechanism_weights", [field(netuid, "netuid"), field(mecid, "mecid"),
                                                 field(bounded_bytes, "commit"), field(u64, "reveal_round"),
                                                 field(u16, "commit_reveal_version")], 118),
    ))
    runtime_call = add(["node_subtensor_runtime", "RuntimeCall"], variant(
        ("SubtensorModule", [field(subtensor_call)], 7), ("Commitments", [field(commitments_call)], 18),
    ))
    address = add(["sp_runtime", "multiaddress", "MultiAddress"], variant(("Id", [field(h256)], 0)))
    signature = add(["sp_runtime", "MultiSignature"], variant(("Sr25519", [field(sig64)], 1)))
    extrinsic = add(["sp_runtime", "generic", "unchecked_extrinsic", "UncheckedExtrinsic"], composite(field(bytes_vec)),
                    params=(("Address", address), ("Call", runtime_call), ("Signature", signature),
                            ("Extra", add([], b"\x04" + _vec([])))))
    runtime = add(["node_subtensor_runtime", "Runtime"], composite())

    def pallet(name: str, call: int, index: int) -> bytes:
        return _str(name) + _opt(None) + _opt(_compact(call)) + _opt(None) + _vec([]) + _opt(None) + bytes([index])

    registry = _vec([_compact(i) + t for i, t in enumerate(types)])
    pallets = _vec([pallet("SubtensorModule", subtensor_call, 7), pallet("Commitments", commitments_call, 18)])
    extrinsic_v4 = _compact(extrinsic) + bytes([4]) + _vec([])  # no signed extensions needed here
    metadata = b"meta" + bytes([14]) + registry + pallets + extrinsic_v4 + _compact(runtime)
    return bittensor_core.Runtime(metadata, 1, 1, 42)


RUNTIME = _build_runtime()


# ---- the chain behind the SDK's Substrate seam ----------------------------------------------

@dataclass
class Extrinsic:
    module: str
    function: str
    args: dict
    signer: str
    signature_ok: bool


def _hash(block: int) -> str:
    return "0x" + (block + 0xABC).to_bytes(32, "big").hex()


def _decoded_bytes(raw: bytes) -> str:
    """How the transport hands over a byte vector: text when it is utf-8, else 0x-hex."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + raw.hex()


def _raw(text: bytes) -> dict:
    return {f"Raw{len(text)}": "0x" + text.hex()}


class FakeChain:
    """Subnet 24 at block 1000: Alice (uid 0) validates, Bob and Charlie mine; Dave is unregistered."""

    BLOCK_HASH_WINDOW = 256  # System.BlockHash keeps this many blocks before the head (and genesis)

    def __init__(self) -> None:
        self.token_symbols: dict[int, str] = {}
        self.head = 1000
        hotkeys = [ALICE.ss58_address, BOB.ss58_address, CHARLIE.ss58_address]
        self.storage = {
            ("SubtensorModule", "CommitRevealWeightsEnabled", NETUID): False,
            ("SubtensorModule", "WeightsSetRateLimit", NETUID): 100,
            ("SubtensorModule", "LastUpdate", NETUID): [900, 850, 0],
            ("SubtensorModule", "MinAllowedWeights", NETUID): 1,
            ("SubtensorModule", "MaxWeightsLimit", NETUID): 65535,
            ("SubtensorModule", "SubnetEpochConsensus", NETUID): "Yuma",
            ("SubtensorModule", "Tempo", NETUID): 360,
            ("SubtensorModule", "RevealPeriodEpochs", NETUID): 1,
            ("SubtensorModule", "LastEpochBlock", NETUID): 720,
            ("SubtensorModule", "PendingEpochAt", NETUID): 0,
            ("SubtensorModule", "SubnetEpochIndex", NETUID): 2,
            ("SubtensorModule", "BlocksSinceLastStep", NETUID): 280,
        }
        self.maps = {
            ("SubtensorModule", "Uids", NETUID): [(hk, uid) for uid, hk in enumerate(hotkeys)],
            ("Commitments", "CommitmentOf", NETUID): [],
            ("Commitments", "RevealedCommitments", NETUID): [],
        }
        self.metagraph = {
            "netuid": NETUID, "name": list(b"quasar"), "symbol": list("\u03c3".encode()), "block": self.head,
            "tempo": 360, "last_step": 720, "blocks_since_last_step": 280, "owner_hotkey": ALICE.ss58_address,
            "owner_coldkey": COLD, "network_registered_at": 10, "num_uids": 3, "max_uids": 256,
            "hotkeys": hotkeys, "coldkeys": [COLD] * 3, "active": [True] * 3,
            "validator_permit": [True, False, False], "last_update": [900, 850, 0],
            "block_at_registration": [20, 30, 40], "total_stake": [5_000_000_000_000, 2_500_000_000, 0],
            "alpha_stake": [5_000_000_000_000, 2_500_000_000, 0], "tao_stake": [0, 0, 0],
            "emission": [0, 0, 0], "incentives": [0, 65535, 0], "dividends": [65535, 0, 0],
        }
        self.extrinsics: list[Extrinsic] = []
        self.fail: Exception | None = None  # raised by every read while set
        self.refuse: bt.ChainError | None = None  # carried by the next submission's failed result
        self.submit_error: Exception | None = None  # raised by the next submission

    # -- reads, as RpcSubstrate returns them --

    def balance(self, rao: int, netuid: int = 0) -> bt.Balance:
        return bt.Balance(int(rao), netuid, self.token_symbols.get(netuid))

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _read(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def block_number(self) -> int:
        self._read()
        return self.head

    async def block_hash(self, block: int | None = None) -> str:
        self._read()
        block = self.head if block is None else block
        if block > self.head:
            raise bt.ChainError(f"block {block} not found")
        return _hash(block)

    async def block_time(self) -> float:
        return 12.0

    async def get_block(self, block_number: int | None = None, block_hash: str | None = None) -> dict | None:
        self._read()
        n = self.head if block_number is None else block_number
        if n > self.head:
            return None
        now = {"name": "now", "value": 1_700_000_000_000 + 12_000 * n}
        return {
            "header": {"number": n, "hash": _hash(n), "parentHash": _hash(max(0, n - 1))},
            "extrinsics": [{"call": {"call_module": "Timestamp", "call_function": "set", "call_args": [now]}}],
        }

    async def query(self, module: str, name: str, params: list | None = None, block_hash: str | None = None):
        self._read()
        params = list(params or [])
        if (module, name) == ("System", "BlockHash"):
            (n,) = params
            kept = n == 0 or self.head - self.BLOCK_HASH_WINDOW <= n < self.head
            return _hash(n) if kept else "0x" + "00" * 32  # a value query: missing reads as zero
        key = (module, name, *params)
        if key in self.storage:
            return self.storage[key]
        prefix = (module, name, *params[:-1])
        if params and prefix in self.maps:  # one entry of a double map: Option, None when absent
            return dict(self.maps[prefix]).get(params[-1])
        raise bt.ChainError(f"fake chain holds no storage {module}.{name}{params}")

    async def query_map(self, module: str, name: str, params: list | None = None, block_hash: str | None = None):
        self._read()
        key = (module, name, *(params or []))
        if key not in self.maps:
            raise bt.ChainError(f"fake chain holds no map {key}")
        return list(self.maps[key])

    async def runtime_call(self, api: str, method: str, params: list, block_hash: str | None = None):
        self._read()
        if (api, method) != ("SubnetInfoRuntimeApi", "get_metagraph"):
            raise bt.ChainError(f"fake chain has no runtime API {api}.{method}")
        return self.metagraph if params == [NETUID] else None

    # -- calls and writes --

    async def compose(self, call) -> bytes:
        module, function, params = call
        return bytes(RUNTIME.compose_call(module, function, params))

    async def estimate_fee(self, call, keypair) -> bt.Balance:
        return bt.Balance.from_rao(125_000)

    async def submit(self, call: bytes, keypair, *, nonce=None, period=None,
                     wait_for_inclusion=True, wait_for_finalization=True) -> bt.ExtrinsicResult:
        if self.submit_error is not None:
            error, self.submit_error = self.submit_error, None
            raise error
        decoded = RUNTIME.decode_call(call)
        signature = bytes(keypair.sign(call))
        args = {arg["name"]: arg["value"] for arg in decoded["call_args"]}
        self.extrinsics.append(Extrinsic(decoded["call_module"], decoded["call_function"], args,
                                         keypair.ss58_address, verify(call, signature, keypair.ss58_address)))
        if self.refuse is not None:
            error, self.refuse = self.refuse, None
            return bt.ExtrinsicResult(success=False, message=error.message, error=error)
        self.head += 1
        self._apply(decoded["call_function"], args, keypair.ss58_address)
        return bt.ExtrinsicResult(success=True, message="Success", block_hash=_hash(self.head),
                                  extrinsic_id=f"{self.head}-0003")

    def _apply(self, function: str, args: dict, signer: str) -> None:
        if function == "set_commitment":
            entries = [e for e in self.maps["Commitments", "CommitmentOf", NETUID] if e[0] != signer]
            self.maps["Commitments", "CommitmentOf", NETUID] = entries + [
                (signer, {"deposit": 0, "block": self.head, "info": args["info"]})]
        else:  # a weight write or commit: the rate limit counts from here
            uid = dict(self.maps["SubtensorModule", "Uids", NETUID])[signer]
            self.storage["SubtensorModule", "LastUpdate", NETUID][uid] = self.head


@pytest.fixture
def fake():
    return FakeChain()


@pytest.fixture
def chain(fake):
    with SubtensorChain("finney", NETUID, substrate=fake, wait_for_finalization=False) as c:
        yield c


# ---- reads ----------------------------------------------------------------------------------

def test_block_and_block_hash(chain, fake):
    assert isinstance(chain, Chain) and chain.netuid == NETUID
    assert chain.block() == 1000
    assert chain.block_hash(999) == _hash(999)  # System.BlockHash
    assert chain.block_hash(1000) == _hash(1000)  # the head: from its header
    assert chain.block_hash(10) == _hash(10)  # outside System.BlockHash's window: from its header
    assert chain.block_hash(0) == _hash(0)
    with pytest.raises(ValueError, match="does not exist yet"):
        chain.block_hash(1001)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="bad block number"):
            chain.block_hash(bad)


def test_metagraph(chain, fake):
    mg = chain.metagraph()
    assert (mg.netuid, mg.block, mg.uids) == (NETUID, 1000, (0, 1, 2))
    assert mg.hotkeys == (ALICE.ss58_address, BOB.ss58_address, CHARLIE.ss58_address)
    assert mg.coldkeys == (COLD,) * 3
    assert mg.stakes == (5000.0, 2.5, 0.0) and mg.validator_permit == (True, False, False)
    assert mg.uid_of(BOB.ss58_address) == 1 and mg.uid_of(DAVE.ss58_address) is None
    other = SubtensorChain("finney", 99, substrate=fake)
    with pytest.raises(ChainError, match="netuid 99 does not exist"):
        other.metagraph()
    other.close()


def test_commitments_keep_readable_ones_and_skip_the_rest(chain, fake):
    revealed = b"q2:local:models/a:tok:" + b"ef" * 16
    fake.maps["Commitments", "CommitmentOf", NETUID] = [
        (BOB.ss58_address, {"deposit": 0, "block": 950, "info": {"fields": [_raw(COMMIT.encode())]}}),
        (GONE, {"deposit": 0, "block": 940, "info": {"fields": [_raw(b"q1:old")]}}),
        # foreign: a hash variant is returned verbatim; the grammar check rejects it
        (CHARLIE.ss58_address, {"deposit": 0, "block": 930, "info": {"fields": [{"Sha256": "0x" + "11" * 32}]}}),
        # too long for a commitment this subnet writes (two Raw fields, 200 bytes)
        ("5Foreign1", {"deposit": 0, "block": 920, "info": {"fields": [_raw(b"x" * 128), _raw(b"y" * 72)]}}),
        ("5Foreign2", {"deposit": 0, "block": 910, "info": {"fields": ["None"]}}),  # nothing readable
        ("5Foreign3", None),  # not a record at all
        # sealed until a drand round nobody has reached: unreadable, skipped
        ("5Sealed", {"deposit": 0, "block": 990, "info": {"fields": [
            {"TimelockEncrypted": {"encrypted": "0x" + "22" * 40, "reveal_round": 10**9}}]}}),
        # a reveal that failed for good stays in storage for audit; nothing to read
        ("5Failed", {"deposit": 0, "block": 980, "info": {"fields": [
            {"TimelockRevealFailed": {"encrypted": "0x" + "33" * 40, "reveal_round": 5}}]}}),
    ]
    # ALICE's sealed commitment was revealed and its storage entry dropped: the reveal is what's left
    fake.maps["Commitments", "RevealedCommitments", NETUID] = [
        (ALICE.ss58_address, [(_decoded_bytes(_compact(len(revealed)) + revealed), 960)]),
    ]
    got = chain.commitments()
    assert set(got) == {BOB.ss58_address, GONE, CHARLIE.ss58_address, ALICE.ss58_address}
    assert (got[BOB.ss58_address].data, got[BOB.ss58_address].block, got[BOB.ss58_address].uid) == (COMMIT, 950, 1)
    assert (got[GONE].uid, got[GONE].data, got[GONE].block) == (None, "q1:old", 940)
    assert (got[ALICE.ss58_address].data, got[ALICE.ss58_address].block) == (revealed.decode(), 960)
    assert parse_commitment(got[BOB.ss58_address].data).binding == "cd" * 16
    with pytest.raises(CommitmentRejected):
        parse_commitment(got[CHARLIE.ss58_address].data)


def test_weights_rate_limit_and_last_weights_block(chain, fake):
    assert chain.weights_rate_limit() == 100
    assert chain.last_weights_block(ALICE.ss58_address) == 900
    assert chain.last_weights_block(CHARLIE.ss58_address) is None  # LastUpdate 0: never counted
    assert chain.last_weights_block(DAVE.ss58_address) is None  # not registered


# ---- commitments ----------------------------------------------------------------------------

def test_commit_submits_set_commitment_signed_by_the_hotkey(chain, fake):
    assert chain.commit(BOB, COMMIT) == 1001
    (ext,) = fake.extrinsics
    assert (ext.module, ext.function, ext.signer, ext.signature_ok) == (
        "Commitments", "set_commitment", BOB.ss58_address, True)
    assert ext.args == {"netuid": NETUID, "info": {"fields": [_raw(COMMIT.encode())]}}
    record = chain.commitments()[BOB.ss58_address]
    assert (record.data, record.block, record.uid) == (COMMIT, 1001, 1)
    assert chain.commit(BOB, "q1:second") == 1002  # the latest commitment replaces the earlier one
    assert chain.commitments()[BOB.ss58_address].data == "q1:second"


def test_commit_refusals(chain, fake):
    with pytest.raises(InvalidWrite, match="limit is 128"):
        chain.commit(BOB, "x" * 129)
    with pytest.raises(InvalidWrite, match="non-empty"):
        chain.commit(BOB, "")
    with pytest.raises(NotPermitted, match="not registered"):
        chain.commit(DAVE, COMMIT)
    with pytest.raises(InvalidSignature, match="cannot sign"):
        chain.commit(Keypair(ss58_address=BOB.ss58_address), COMMIT)
    assert fake.extrinsics == []  # all of the above refused before anything was sent
    fake.refuse = bt.ChainError("The caller is not allowed to commit", "AccountNotAllowedCommit")
    with pytest.raises(NotPermitted, match="AccountNotAllowedCommit"):
        chain.commit(BOB, COMMIT)
    fake.refuse = bt.ChainError("Account is trying to commit data too fast", "SpaceLimitExceeded")
    with pytest.raises(InvalidWrite, match="SpaceLimitExceeded"):
        chain.commit(BOB, COMMIT)
    assert chain.commitments() == {}


def test_commit_sealed_sends_a_timelocked_commitment(chain, fake):
    before = bt.timelock.current_round()
    sealed = chain.commit_sealed(BOB, COMMIT, reveal_in_blocks=50)
    assert isinstance(sealed, SealedCommit) and sealed.block == 1001
    # 50 blocks of the chain's 12 s are 600 s of 3 s drand rounds
    assert abs(sealed.reveal_round - (before + 200)) <= 2
    (ext,) = fake.extrinsics
    assert (ext.module, ext.function, ext.signer, ext.signature_ok) == (
        "Commitments", "set_commitment", BOB.ss58_address, True)
    (field,) = ext.args["info"]["fields"]
    assert field["TimelockEncrypted"]["reveal_round"] == sealed.reveal_round
    assert COMMIT not in str(ext.args)  # nothing readable went on chain
    assert BOB.ss58_address not in chain.commitments()  # sealed: nothing to read yet
    # The chain decrypts it at the round: the plaintext (as the SDK reads it) replaces the entry.
    fake.maps["Commitments", "CommitmentOf", NETUID] = []
    plaintext = _compact(len(COMMIT)) + COMMIT.encode()
    fake.maps["Commitments", "RevealedCommitments", NETUID] = [(BOB.ss58_address, [(_decoded_bytes(plaintext), 1051)])]
    assert (chain.commitments()[BOB.ss58_address].data, chain.commitments()[BOB.ss58_address].block) == (COMMIT, 1051)

    later = chain.commit_sealed(BOB, COMMIT, reveal_round=before + 1000)
    assert later.reveal_round == before + 1000
    with pytest.raises(ValueError, match="exactly one"):
        chain.commit_sealed(BOB, COMMIT)
    with pytest.raises(ValueError, match="exactly one"):
        chain.commit_sealed(BOB, COMMIT, reveal_round=before + 10, reveal_in_blocks=5)
    with pytest.raises(InvalidWrite, match="not in the future"):
        chain.commit_sealed(BOB, COMMIT, reveal_round=before - 10)
    assert len(fake.extrinsics) == 2


# ---- weights --------------------------------------------------------------------------------

def test_set_weights_sends_normalized_u16_weights_within_the_rate_limit(chain, fake):
    assert chain.set_weights(ALICE, [1, 2], [0.25, 0.75]) is True
    (ext,) = fake.extrinsics
    assert (ext.module, ext.function, ext.signer, ext.signature_ok) == (
        "SubtensorModule", "set_mechanism_weights", ALICE.ss58_address, True)
    assert ext.args == {"netuid": NETUID, "mecid": 0, "dests": [1, 2], "weights": [21845, 65535], "version_key": 0}
    assert chain.last_weights_block(ALICE.ss58_address) == 1001
    # Within the rate limit: False, and nothing is sent.
    assert chain.set_weights(ALICE, [1], [1.0]) is False
    assert len(fake.extrinsics) == 1
    fake.head += 99
    assert chain.set_weights(ALICE, [1], [1.0]) is False
    fake.head += 1  # exactly weights_rate_limit() blocks later
    assert chain.set_weights(ALICE, [1, 2], [3, 1]) is True
    assert fake.extrinsics[-1].args["dests"] == [1, 2] and fake.extrinsics[-1].args["weights"] == [65535, 21845]


def test_set_weights_uses_commit_reveal_when_the_subnet_does(chain, fake):
    fake.storage["SubtensorModule", "CommitRevealWeightsEnabled", NETUID] = True
    assert chain.set_weights(ALICE, [1, 2], [0.5, 0.5]) is True
    (ext,) = fake.extrinsics
    assert (ext.module, ext.function, ext.signer) == (
        "SubtensorModule", "commit_timelocked_mechanism_weights", ALICE.ss58_address)
    assert ext.args["netuid"] == NETUID and ext.args["reveal_round"] > bt.timelock.current_round()
    assert len(bytes.fromhex(ext.args["commit"].removeprefix("0x"))) > 100  # a TLE ciphertext
    assert chain.set_weights(ALICE, [1], [1.0]) is False  # the commit counts for the rate limit


def test_set_weights_refusals(chain, fake):
    for uids, weights in (([1, 2], [1.0]), ([1], [math.nan]), ([1], [-1.0]), ([1, 1], [1, 1]), ([1], [0.0])):
        with pytest.raises(InvalidWrite):
            chain.set_weights(ALICE, uids, weights)
    with pytest.raises(NotPermitted, match="not registered"):
        chain.set_weights(DAVE, [1], [1.0])
    with pytest.raises(InvalidSignature, match="cannot sign"):
        chain.set_weights(Keypair(ss58_address=ALICE.ss58_address), [1], [1.0])
    assert fake.extrinsics == []
    # The chain's own refusals, as RpcSubstrate reports them: a pool rejection ...
    fake.refuse = chain_error_from_substrate_request(Exception("Invalid Transaction: Custom error: 6"))
    assert chain.set_weights(ALICE, [1], [1.0]) is False  # the rate limit, caught by the pool
    fake.refuse = chain_error_from_substrate_request(Exception("Transaction has a bad signature"))
    with pytest.raises(InvalidSignature, match="BadProof"):
        chain.set_weights(ALICE, [1], [1.0])
    # ... and dispatch errors from inside a block
    fake.refuse = bt.ChainError("Neuron has no validator permit", "NeuronNoValidatorPermit")
    with pytest.raises(NotPermitted, match="NeuronNoValidatorPermit"):
        chain.set_weights(BOB, [2], [1.0])
    fake.refuse = bt.ChainError("A uid in the weight vector is invalid", "UidVecContainInvalidOne")
    with pytest.raises(InvalidWrite, match="UidVecContainInvalidOne"):
        chain.set_weights(ALICE, [7], [1.0])
    fake.refuse = bt.ChainError("Setting weights too fast", "SettingWeightsTooFast")
    assert chain.set_weights(ALICE, [1], [1.0]) is False
    assert len(fake.extrinsics) == 5 and chain.last_weights_block(ALICE.ss58_address) == 900


# ---- registration, RPC failures, lifecycle --------------------------------------------------

def test_register_never_spends_without_a_wallet(chain, fake):
    with pytest.raises(InvalidWrite, match="already registered"):
        chain.register(BOB, COLD)
    with pytest.raises(NotPermitted, match="burns TAO"):
        chain.register(DAVE, COLD)
    assert fake.extrinsics == []


def test_rpc_failures_raise_chain_errors(chain, fake):
    assert chain.block() == 1000  # connected
    fake.fail = bt.RpcConnectionError("websocket closed by peer")
    for read in (chain.block, chain.metagraph, chain.commitments, chain.weights_rate_limit,
                 lambda: chain.block_hash(5), lambda: chain.last_weights_block(ALICE.ss58_address)):
        with pytest.raises(ChainRpcError, match="RPC connection failed: websocket closed"):
            read()
    fake.fail = bt.ChainError("State already discarded for 0xabc")
    with pytest.raises(ChainRpcError, match="State already discarded"):
        chain.commitments()
    fake.fail = None
    fake.submit_error = bt.RpcConnectionError("no response in 60.0s")
    with pytest.raises(ChainRpcError, match="may or may not have landed"):
        chain.set_weights(ALICE, [1], [1.0])
    fake.submit_error = bt.RpcConnectionError("no response in 60.0s")
    with pytest.raises(ChainRpcError, match="may or may not have landed"):
        chain.commit(BOB, COMMIT)
    # Never connected at all: the first read already says so.
    fake.fail = bt.RpcConnectionError("connection refused")
    fresh = SubtensorChain("finney", NETUID, substrate=fake)
    with pytest.raises(ChainRpcError, match="connection refused"):
        fresh.block()
    fresh.close()


def test_pickles_without_its_connection(chain, fake):
    assert chain.block() == 1000
    copy = pickle.loads(pickle.dumps(chain))
    assert repr(copy) == "SubtensorChain('finney', netuid=24)"
    assert copy.block() == 1000  # reconnects on first use (to its own copy of the fake here)
    copy.close()



def test_a_dropped_connection_is_reopened_on_the_next_call(chain, fake):
    assert chain.block() == 1000
    first = chain._client()
    fake.fail = bt.RpcConnectionError("websocket closed by peer")
    with pytest.raises(ChainRpcError, match="websocket closed"):
        chain.metagraph()
    fake.fail = None
    assert chain.block() == 1000 and chain._client() is not first  # a fresh client, not the broken one
