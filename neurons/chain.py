"""The one chain interface both neurons use, and the records it returns.

Two implementations sit behind it: `neurons.localchain.LocalChain` (the embedded SQLite default that
`localnet` and the tests run on) and the bittensor adapter (the real network). Miner and validator
code only ever sees `Chain`, so a round behaves the same on both.

Contract shared by every implementation:
- blocks are ints that never decrease; `block_hash(n)` is a 0x-prefixed hex string, only defined
  for blocks that exist (n <= block());
- `commitments()` maps each hotkey to its *latest* commitment and the block it landed in; a
  sealed commitment (`commit_sealed`, optional: both implementations have it) is left out until
  it opens, then counts from the block it landed in;
- `weights()` (optional, both implementations have it; `quasar status` reads it) maps each
  validator uid to its latest weight row, normalised to fractions summing to 1;
- `set_weights` returns False when the rate limit refuses the write (an expected, retry-later
  condition) and raises a `ChainError` for everything else (bad input, unregistered or
  unpermitted hotkey, bad signature), because those are bugs or attacks, not timing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # the real type is bittensor.sp_core.Keypair; importing bittensor costs ~0.4 s
    from bittensor.sp_core import Keypair

# Commitments pallet limit the subnet keeps to: a commitment names storage kind, location,
# revision and model hash in at most this many utf-8 bytes.
MAX_COMMITMENT_BYTES = 128


class ChainError(Exception):
    """A write the chain refused for a reason other than the weights rate limit."""


class InvalidSignature(ChainError):
    """The write was not signed by the hotkey it claims to come from (or is stale / replayed)."""


class NotPermitted(ChainError):
    """The hotkey is not registered, or lacks the validator permit the write needs."""


class InvalidWrite(ChainError, ValueError):
    """The payload itself is malformed: oversized commitment, NaN weights, unknown uid, ..."""


@dataclass(frozen=True)
class Metagraph:
    """Who is on the subnet at `block`. Parallel tuples indexed by position (uids[i] owns hotkeys[i])."""

    netuid: int
    block: int
    uids: tuple[int, ...]
    hotkeys: tuple[str, ...]
    coldkeys: tuple[str, ...]
    stakes: tuple[float, ...]
    validator_permit: tuple[bool, ...]
    # the chain's incentive per uid (0..1, Yuma consensus) where the chain computes one; None on LocalChain
    incentives: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.uids)

    def uid_of(self, hotkey: str) -> int | None:
        """The hotkey's uid, or None when it is not registered."""
        try:
            return self.uids[self.hotkeys.index(hotkey)]
        except ValueError:
            return None


@dataclass(frozen=True)
class CommitmentRecord:
    """A hotkey's commitment and the block it was included in (what eligibility is measured from)."""

    hotkey: str
    uid: int | None  # None when the hotkey has since left the subnet
    data: str
    block: int


class SealedCommit(NamedTuple):
    """Where a sealed (timelocked) commitment landed, and when it opens: a drand round on a
    bittensor network, a block on LocalChain. Until then nobody can read it, its committer included."""

    block: int
    reveal_round: int


@runtime_checkable
class Chain(Protocol):
    """Everything a miner or validator needs from the chain. Keep it this small."""

    netuid: int

    def block(self) -> int: ...

    def block_hash(self, block: int) -> str: ...

    def metagraph(self) -> Metagraph: ...

    def commitments(self) -> dict[str, CommitmentRecord]: ...

    def commit(self, keypair: Keypair, data: str) -> int:
        """Publish `data` for keypair's hotkey; returns the block it landed in."""
        ...

    def set_weights(self, keypair: Keypair, uids: list[int], weights: list[float]) -> bool:
        """True when accepted, False when the rate limit refused it; raises ChainError otherwise."""
        ...

    def weights_rate_limit(self) -> int:
        """Minimum number of blocks between two accepted weight writes of one hotkey."""
        ...

    def last_weights_block(self, hotkey: str) -> int | None: ...

    def register(self, keypair: Keypair, coldkey_ss58: str) -> int:
        """Register keypair's hotkey under `coldkey_ss58`; returns its uid."""
        ...


def check_commitment(data: str) -> bytes:
    """The commitment's utf-8 bytes, or InvalidWrite. Shared so both chains refuse the same inputs."""
    if not isinstance(data, str) or not data:
        raise InvalidWrite("commitment must be a non-empty string")
    raw = data.encode("utf-8")
    if len(raw) > MAX_COMMITMENT_BYTES:
        raise InvalidWrite(f"commitment is {len(raw)} bytes, limit is {MAX_COMMITMENT_BYTES}")
    return raw


def normalize_weights(uids: Sequence[int], weights: Sequence[float]) -> dict[int, float]:
    """uid -> weight summing to 1, or InvalidWrite.

    Validators must never send garbage: a NaN or negative weight, a length mismatch, a repeated
    uid or an all-zero vector is a scoring bug, so it is refused loudly rather than repaired.
    """
    if len(uids) != len(weights):
        raise InvalidWrite(f"{len(uids)} uids but {len(weights)} weights")
    if not uids:
        raise InvalidWrite("empty weight vector")
    if len(set(uids)) != len(uids):
        raise InvalidWrite("repeated uid in weight vector")
    out: dict[int, float] = {}
    for uid, w in zip(uids, weights):
        if isinstance(uid, bool) or not isinstance(uid, int) or uid < 0:
            raise InvalidWrite(f"bad uid {uid!r}")
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise InvalidWrite(f"weight for uid {uid} is {w}; weights must be finite and >= 0")
        out[uid] = w
    total = math.fsum(out.values())
    if total <= 0:
        raise InvalidWrite("weights sum to zero")
    return {uid: w / total for uid, w in out.items()}
