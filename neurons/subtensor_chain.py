"""SubtensorChain: the `neurons.chain.Chain` interface on a real network, through bittensor 11.

Every call goes through the SDK's own objects, never around them:
- reads use the typed namespaces (`subnets.metagraph`, `subnets.commitments`, hyperparameters)
  and generic storage queries, pinned to one block where several values must agree;
- a commitment is the raw `Commitments.set_commitment` call (no intent wraps it), signed by the
  hotkey; `commit_sealed` sends it timelocked (`bittensor.timelock`), unreadable until a drand
  round;
- weights are the `SetWeights` intent, which reads the subnet's settings and sends plain or
  timelocked commit-reveal weights itself, after preflighting registration and the rate limit.

`substrate` is handed to the SDK client unchanged (`bittensor.Substrate` is the SDK's chain-access
seam), so tests run all of the above against an in-memory chain.

Errors keep the `Chain` contract: a weights write the rate limit refuses returns False; every
other refusal raises a `neurons.chain.ChainError` subclass named after what went wrong; a
failure of the RPC itself raises `ChainRpcError`, whose message says when a write's outcome is
unknown.
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import bittensor as bt
from bittensor.sp_core import CRYPTO_SR25519, Keypair

from neurons.chain import (
    ChainError,
    CommitmentRecord,
    InvalidSignature,
    InvalidWrite,
    Metagraph,
    NotPermitted,
    SealedCommit,
    check_commitment,
    normalize_weights,
)
from neurons.keys import WalletKeys

log = logging.getLogger(__name__)

RAO_PER_UNIT = 1e9
# Chain error names that mean "this hotkey may not do that" although the SDK files them under a
# balance code: too little stake to set weights is a missing permission, not a missing payment.
_NOT_PERMITTED_NAMES = {"NotEnoughStakeToSetWeights", "StakeAmountTooLow", "NeuronNoValidatorPermit"}
_BAD_SIGNATURE_NAMES = {"BadProof", "BadSigner"}
_INVALID_CODES = {bt.ErrorCode.INVALID_ARGUMENT, bt.ErrorCode.LIMIT_EXCEEDED}
_NOT_PERMITTED_CODES = {bt.ErrorCode.NOT_REGISTERED, bt.ErrorCode.NOT_AUTHORIZED}


class ChainRpcError(ChainError):
    """The RPC endpoint failed or answered with an error instead of the chain judging the request
    (for a write, whether it landed is then unknown)."""


class SubtensorChain:
    """`neurons.chain.Chain` on a bittensor network (finney, test, local, or a ws(s):// URL).

    `wallet` (a bittensor `Wallet`, or `neurons.keys.WalletKeys`) is only needed by `register`,
    which spends TAO from its coldkey; commits and weights are signed by the keypair passed in.
    `version_key` is sent with every weight write (subnets may require a minimum).
    """

    def __init__(
        self,
        network: str = "finney",
        netuid: int = 24,
        *,
        substrate: bt.Substrate | None = None,
        wallet: Any = None,
        version_key: int = 0,
        wait_for_finalization: bool = True,
        fallback_endpoints: list[str] | None = None,
    ) -> None:
        if isinstance(netuid, bool) or not isinstance(netuid, int) or netuid < 0:
            raise ValueError(f"bad netuid {netuid!r}")
        self.network = network
        self._netuid = netuid
        self._substrate = substrate
        self._wallet = wallet.wallet if isinstance(wallet, WalletKeys) else wallet
        self._version_key = int(version_key)
        self._finalize = bool(wait_for_finalization)
        # None: the SDK's public pool for a known network; the client rotates through them when the
        # endpoint is unreachable or drops
        self._fallback = None if fallback_endpoints is None else list(fallback_endpoints)
        self._lock = threading.Lock()
        self._sdk: tuple[int, bt.SyncClient] | None = None

    def __repr__(self) -> str:
        return f"SubtensorChain({self.network!r}, netuid={self._netuid})"

    @property
    def netuid(self) -> int:
        return self._netuid

    # ---- SDK client plumbing ----------------------------------------------------------------

    def _client(self) -> bt.SyncClient:
        # The SDK's blocking client runs its own event loop thread, which does not survive a
        # fork: a child process builds its own client (keyed by pid, like LocalChain's connections).
        with self._lock:
            if self._sdk is None or self._sdk[0] != os.getpid():
                with self._errors(f"connecting to {self.network}"):
                    client = bt.SyncClient(self.network, substrate=self._substrate,
                                           fallback_endpoints=self._fallback)
                    client.connect()  # under the lock: two threads must not both open the socket
                self._sdk = (os.getpid(), client)
            return self._sdk[1]

    def close(self) -> None:
        with self._lock:
            sdk, self._sdk = self._sdk, None
        if sdk is not None and sdk[0] == os.getpid():
            sdk[1].close()

    def _drop_client(self) -> None:
        """Forget a client whose connection failed (no lock: called from inside _client's)."""
        sdk, self._sdk = self._sdk, None
        if sdk is not None and sdk[0] == os.getpid():
            try:
                sdk[1].close()
            except Exception:  # noqa: BLE001  it is already broken; closing is a courtesy
                log.debug("closing a failed client", exc_info=True)

    def __enter__(self) -> SubtensorChain:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_sdk"] = None  # the client's loop thread and socket stay in this process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Reads: any SDK failure becomes ChainRpcError naming what was being read."""
        try:
            yield
        except ChainError:
            raise
        except bt.RpcConnectionError as exc:
            self._drop_client()  # the next call connects afresh (through the fallbacks) instead of reusing it
            raise ChainRpcError(f"{action} on {self.network}: RPC connection failed: {exc}") from exc
        except bt.BittensorError as exc:
            raise ChainRpcError(f"{action} on {self.network} failed: {exc}") from exc
        except (TimeoutError, OSError) as exc:
            raise ChainRpcError(f"{action} on {self.network}: {type(exc).__name__}: {exc}") from exc

    @contextmanager
    def _write_errors(self, action: str) -> Iterator[None]:
        """Writes: refusals map to the Chain error classes; RPC failures say the outcome is unknown."""
        try:
            yield
        except ChainError:
            raise
        except bt.ChainError as exc:
            raise _refusal(action, exc) from exc
        except bt.TimelockError as exc:
            raise InvalidWrite(f"{action}: {exc}") from exc
        except (bt.RpcConnectionError, TimeoutError, OSError) as exc:
            raise ChainRpcError(
                f"{action} on {self.network}: RPC failed ({exc}); the write may or may not have "
                "landed, so read the chain before retrying"
            ) from exc
        except bt.BittensorError as exc:  # the SDK refused the input before sending anything
            raise InvalidWrite(f"{action}: {exc}") from exc

    # ---- reads ------------------------------------------------------------------------------

    def block(self) -> int:
        with self._errors("reading the block number"):
            return int(self._client().block)

    def block_hash(self, block: int) -> str:
        """The hash of an existing block (ValueError for a future one, like LocalChain)."""
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise ValueError(f"bad block number {block!r}")
        client = self._client()
        with self._errors(f"reading the hash of block {block}"):
            current = int(client.block)
            if block > current:
                raise ValueError(f"block {block} does not exist yet (current block {current})")
            # System.BlockHash is one cheap storage read but only covers the last few hundred
            # blocks before the head (and genesis); the head itself and older blocks come from
            # the block's header.
            found = _hex32(client.query(bt.storage.System.BlockHash, [block]))
            if found is None:
                info = client.block_info(block)
                found = _hex32(info.hash) if info is not None else None
        if found is None:
            raise ChainRpcError(f"{self.network} returned no hash for block {block}")
        return found

    def metagraph(self) -> Metagraph:
        with self._errors(f"reading the metagraph of netuid {self._netuid}"):
            graph = self._client().subnets.metagraph(self._netuid, commitments=False)
        if graph is None:
            raise ChainError(f"netuid {self._netuid} does not exist on {self.network}")
        neurons = sorted(graph.neurons, key=lambda n: n.uid)
        return Metagraph(
            netuid=self._netuid,
            block=int(graph.block),
            uids=tuple(n.uid for n in neurons),
            hotkeys=tuple(n.hotkey for n in neurons),
            coldkeys=tuple(n.coldkey for n in neurons),
            # Total stake in whole units of the subnet's token, as the chain's metagraph reports it.
            stakes=tuple(n.total_stake.rao / RAO_PER_UNIT for n in neurons),
            validator_permit=tuple(bool(n.validator_permit) for n in neurons),
            incentives=tuple(float(n.incentive) for n in neurons),
        )

    def weights(self) -> dict[int, dict[int, float]]:
        """validator uid -> {uid: fraction of its latest revealed weight row}."""
        with self._errors(f"reading the weights of netuid {self._netuid}"):
            return self._client().weights.weights(self._netuid)

    def commitments(self) -> dict[str, CommitmentRecord]:
        """Each hotkey's latest readable commitment and the block it counts from.

        Only strings this subnet's commit could have written are returned (what `check_commitment`
        accepts, as on LocalChain); the caller's grammar check judges the rest. Skipped: sealed
        commitments not yet revealed, failed reveals, oversized or empty content. A revealed
        timelocked commitment counts from its commit block while the chain keeps that entry, and
        from its reveal block once the chain has dropped it (the reveal is all that is left).
        """
        with self._errors(f"reading the commitments of netuid {self._netuid}"):
            found = self._client().subnets.commitments(self._netuid)
        out: dict[str, CommitmentRecord] = {}
        for hotkey, entry in found.items():
            data = entry.value
            if data is None:
                continue  # sealed until its drand round, or a reveal that failed: nothing to read
            try:
                check_commitment(data)
            except InvalidWrite as exc:
                log.debug("skipping commitment of %s at block %s: %s", hotkey, entry.block, exc)
                continue
            out[hotkey] = CommitmentRecord(hotkey=hotkey, uid=entry.uid, data=data, block=int(entry.block))
        return out

    def weights_rate_limit(self) -> int:
        with self._errors("reading the weights rate limit"):
            return int(self._client().hyperparameters.weights_rate_limit(self._netuid))

    def last_weights_block(self, hotkey: str) -> int | None:
        """The block the chain measures this hotkey's weights rate limit from, or None.

        That is `LastUpdate`: the last weight write (or commit, on commit-reveal subnets), and
        on subtensor also the registration block, which rate-limits a fresh validator the same way.
        """
        with self._errors(f"reading the last weights block of {hotkey}"):
            snapshot = self._client().at()  # uid and LastUpdate from the same block
            uid = snapshot.neurons.uid(hotkey, self._netuid)
            if uid is None:
                return None
            # Mechanism 0's LastUpdate is stored under the netuid itself.
            last = snapshot.query(bt.storage.SubtensorModule.LastUpdate, [self._netuid])
        if not isinstance(last, (list, tuple)) or uid >= len(last) or int(last[uid]) <= 0:
            return None
        return int(last[uid])

    # ---- writes -----------------------------------------------------------------------------

    def commit(self, keypair: Keypair, data: str) -> int:
        """Publish `data` in the clear; returns the block it landed in."""
        raw = check_commitment(data)
        return self._commit(keypair, {"fields": [{f"Raw{len(raw)}": raw}]}, "committing")

    def commit_sealed(
        self, keypair: Keypair, data: str, *, reveal_round: int | None = None, reveal_in_blocks: int | None = None
    ) -> SealedCommit:
        """Publish `data` timelocked: nobody (the committer included) can read it before the drand
        round, after which the chain decrypts it and `commitments()` shows it.

        Give `reveal_round` (a drand quicknet round) or `reveal_in_blocks` (converted with the
        chain's own block time, since drand rounds are wall-clock).
        """
        raw = check_commitment(data)
        if (reveal_round is None) == (reveal_in_blocks is None):
            raise ValueError("give exactly one of reveal_round or reveal_in_blocks")
        if reveal_in_blocks is not None and (not isinstance(reveal_in_blocks, int) or reveal_in_blocks <= 0):
            raise ValueError(f"reveal_in_blocks must be a positive int, got {reveal_in_blocks!r}")
        # The SDK reads a revealed payload as SCALE bytes (compact length, then the text), so the
        # plaintext is sealed in that form for `commitments()` to read it back.
        payload = _compact(len(raw)) + raw
        with self._write_errors("committing (sealed)"):
            if reveal_in_blocks is not None:
                seconds = reveal_in_blocks * self._client().block_time()
                sealed = bt.timelock.encrypt(payload, reveal_in=seconds)
            else:
                sealed = bt.timelock.encrypt(payload, reveal_round=reveal_round)
        # The pallet stores the inner TLE ciphertext and the round as separate fields.
        info = {"fields": [{"TimelockEncrypted": {"encrypted": sealed.encrypted, "reveal_round": sealed.reveal_round}}]}
        return SealedCommit(self._commit(keypair, info, "committing (sealed)"), sealed.reveal_round)

    def _commit(self, keypair: Keypair, info: dict, action: str) -> int:
        _require_signer(keypair)
        client = self._client()
        hotkey = keypair.ss58_address
        # Checked here because the pallet refuses an unregistered hotkey only after the
        # extrinsic is in a block, with its fee already paid.
        with self._errors(f"looking up {hotkey}"):
            registered = client.neurons.uid(hotkey, self._netuid) is not None
        if not registered:
            raise NotPermitted(f"hotkey {hotkey} is not registered on netuid {self._netuid}")
        call = bt.calls.Commitments.set_commitment(netuid=self._netuid, info=info)
        with self._write_errors(action):
            result = client.submit_call(call, keypair, signer="hotkey", wait_for_finalization=self._finalize)
            result.raise_for_failure()
        block = _landed_block(result)
        if block is None:  # the result did not say where it landed: the stored entry does
            with self._errors(f"reading back the commitment of {hotkey}"):
                record = client.query(bt.storage.Commitments.CommitmentOf, [self._netuid, hotkey])
            if not isinstance(record, dict) or record.get("block") is None:
                raise ChainRpcError(f"{action}: included, but {self.network} shows no commitment for {hotkey}")
            block = int(record["block"])
        return block

    def set_weights(self, keypair: Keypair, uids: list[int], weights: list[float]) -> bool:
        """True when accepted; False when the chain's rate limit refuses it (checked by the SDK
        before sending, and again by the chain). Other refusals raise (see neurons.chain)."""
        vector = normalize_weights(uids, weights)  # refuse NaN / negative / mismatch before anything
        _require_signer(keypair)
        client = self._client()
        intent = bt.SetWeights(
            netuid=self._netuid,
            uids=list(vector),
            weights=list(vector.values()),
            version_key=self._version_key,
        )
        with self._write_errors("setting weights"):
            try:
                # retries: the SDK resubmits only on transient pool rejections (nonce races).
                result = client.execute(intent, keypair, wait_for_finalization=self._finalize, retries=2)
                result.raise_for_failure()
            except bt.ChainError as exc:
                if exc.code is not bt.ErrorCode.RATE_LIMITED:
                    raise
                log.info("weights from %s refused by the rate limit: %s", keypair.ss58_address, exc)
                return False
        return True

    def register(self, keypair: Keypair, coldkey_ss58: str) -> int:
        """Register keypair's hotkey with a burned registration paid by the constructor's wallet.

        On a real network registration spends TAO from the coldkey, so it happens only when that
        wallet was given and its coldkey is `coldkey_ss58`; most operators register with btcli.
        """
        client = self._client()
        hotkey = keypair.ss58_address
        with self._errors(f"looking up {hotkey}"):
            uid = client.neurons.uid(hotkey, self._netuid)
        if uid is not None:
            raise InvalidWrite(f"hotkey {hotkey} is already registered on netuid {self._netuid} (uid {uid})")
        if self._wallet is None:
            raise NotPermitted(
                f"registering on {self.network} burns TAO from the coldkey and this chain was given no "
                f"wallet; register with `btcli subnets register --netuid {self._netuid}` or pass wallet="
            )
        owner = bt.public_view(self._wallet, "coldkey").ss58_address
        if owner != coldkey_ss58:
            raise NotPermitted(f"the wallet's coldkey is {owner}, not {coldkey_ss58}")
        intent = bt.BurnedRegister(netuid=self._netuid, hotkey_ss58=hotkey)
        with self._write_errors(f"registering {hotkey}"):
            client.execute(intent, self._wallet, wait_for_finalization=self._finalize).raise_for_failure()
        with self._errors(f"looking up {hotkey}"):
            uid = client.neurons.uid(hotkey, self._netuid)
        if uid is None:
            raise ChainRpcError(f"registration of {hotkey} was included but netuid {self._netuid} shows no uid")
        return int(uid)


def _refusal(action: str, exc: bt.ChainError) -> ChainError:
    """The Chain error class for an SDK ChainError (a chain or pool refusal)."""
    name = f" ({exc.name})" if exc.name else ""
    message = f"{action} refused: {exc.message}{name}"
    if exc.name in _BAD_SIGNATURE_NAMES:
        return InvalidSignature(message)
    if exc.name in _NOT_PERMITTED_NAMES or exc.code in _NOT_PERMITTED_CODES:
        return NotPermitted(message)
    if exc.code in _INVALID_CODES:
        return InvalidWrite(message)
    return ChainError(message)


def _require_signer(keypair: Keypair) -> None:
    # Checked before any chain traffic: deep in the SDK a key that cannot sign surfaces as a
    # generic submission failure, after reads and fee estimates were already spent on it.
    if getattr(keypair, "crypto_type", None) != CRYPTO_SR25519:
        raise InvalidSignature("hotkeys sign with sr25519")
    try:
        keypair.sign(b"quasar-subtensor-chain:can-sign")
    except ValueError as exc:  # a public-key-only Keypair
        raise InvalidSignature(f"{keypair.ss58_address} cannot sign: {exc}") from None


def _landed_block(result: bt.ExtrinsicResult) -> int | None:
    """The block number in the result's "block-index" extrinsic id, when it has one."""
    height, _, _ = (result.extrinsic_id or "").partition("-")
    return int(height) if height.isdigit() else None


def _hex32(value: Any) -> str | None:
    """A 32-byte hash as 0x-hex, or None for a missing or all-zero (pruned) one."""
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value.removeprefix("0x"))
        except ValueError:
            return None
    elif isinstance(value, (list, tuple)):
        value = bytes(int(b) for b in value)
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32 or not any(value):
        return None
    return "0x" + bytes(value).hex()


def _compact(n: int) -> bytes:
    """SCALE compact encoding of a length below 2**14 (a commitment is at most 128 bytes)."""
    if n < 1 << 6:
        return bytes([n << 2])
    if n < 1 << 14:
        return ((n << 2) | 1).to_bytes(2, "little")
    raise ValueError(f"length {n} is too long for a commitment")
