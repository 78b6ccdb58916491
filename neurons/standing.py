"""`quasar status`: where one hotkey stands, read from the chain only (no wallet, nothing written).

    commitment   its latest readable commitment, decoded by the grammar validators use (or the
                 reason they would reject it at the `commitment` stage)
    eligibility  the first block it is old enough for a round (commit block + the competition's
                 eval_delay_blocks) and the sync block of the first round that evaluates it (the
                 first multiple of cadence_blocks at or after that: neurons.validator.eligible)
    weights      each validator's latest weight on its uid, the uid's rank in that row, and the
                 stake-weighted consensus of all of them with the uid's rank by it; the chain's own
                 incentive where it computes one (bittensor networks; the local chain has no Yuma)

A commitment sealed until a later block is unreadable here as it is to validators; a re-commit
of the same model keeps its first commit block at validators (neurons.validator), which only
their state knows, so the eligibility shown is that of the latest commitment.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from eval.competition import ScheduleSpec
from neurons.chain import Chain
from neurons.commitment import CommitmentRejected, parse_commitment


@dataclass(frozen=True)
class ValidatorWeight:
    hotkey: str
    uid: int
    stake: float
    weight: float          # this validator's weight on the hotkey's uid (its row sums to 1)
    rank: int | None       # the uid's place in that row (1: most weight); None without weight


@dataclass(frozen=True)
class Standing:
    netuid: int
    block: int
    hotkey: str
    uid: int | None                  # None: not registered
    commitment: str | None           # the raw string, None when there is no readable one
    commit_block: int | None
    decoded: dict | None             # kind, location, revision, binding
    refused: str | None              # why validators would reject the commitment string
    eligible_block: int | None
    first_round: int | None          # sync block of the first round that evaluates it
    weights: tuple[ValidatorWeight, ...]
    consensus: float | None          # stake-weighted mean of the validators' weights on the uid
    rank: int | None                 # the uid's place among all uids by consensus (1: highest)
    incentive: float | None          # the chain's (None on the local chain)

    def to_dict(self) -> dict:
        return asdict(self)


def eligibility(commit_block: int, schedule: ScheduleSpec) -> tuple[int, int]:
    """(first block the commitment is old enough, sync block of the first round that evaluates it):
    a round at sync block S takes commitments that landed at or before S - eval_delay_blocks."""
    ready = commit_block + schedule.eval_delay_blocks
    cadence = schedule.cadence_blocks
    return ready, max(cadence, -(-ready // cadence) * cadence)  # rounds start at the first cadence


def _ranks(values: dict[int, float]) -> dict[int, int]:
    """uid -> 1 + how many uids have strictly more (ties share a place); only uids above 0."""
    return {uid: 1 + sum(other > v for other in values.values()) for uid, v in values.items() if v > 0}


def standing(chain: Chain, schedule: ScheduleSpec, hotkey: str, *, localnet: bool) -> Standing:
    metagraph = chain.metagraph()
    uid = metagraph.uid_of(hotkey)
    record = chain.commitments().get(hotkey)
    decoded = refused = ready = first_round = None
    if record is not None:
        try:
            c = parse_commitment(record.data, localnet=localnet)
            decoded = {"kind": c.kind, "location": c.location, "revision": c.revision, "binding": c.binding}
        except CommitmentRejected as e:
            refused = e.reason
        ready, first_round = eligibility(record.block, schedule)

    rows = chain.weights()
    stake_of = dict(zip(metagraph.uids, metagraph.stakes))
    hotkey_of = dict(zip(metagraph.uids, metagraph.hotkeys))
    weights = []
    for v, row in sorted(rows.items()):
        if v not in hotkey_of:
            continue  # a row left by a uid since deregistered
        w = row.get(uid, 0.0) if uid is not None else 0.0
        weights.append(ValidatorWeight(hotkey_of[v], v, stake_of[v], w, _ranks(row).get(uid) if w > 0 else None))
    total_stake = math.fsum(x.stake for x in weights)
    consensus = rank = None
    if total_stake > 0:
        by_uid = {u: math.fsum(stake_of[v] * row.get(u, 0.0) for v, row in rows.items() if v in hotkey_of)
                  / total_stake for u in metagraph.uids}
        if uid is not None:
            consensus = by_uid[uid]
            rank = _ranks(by_uid).get(uid)
    incentive = None
    if metagraph.incentives is not None and uid is not None:
        incentive = metagraph.incentives[metagraph.uids.index(uid)]
    return Standing(metagraph.netuid, metagraph.block, hotkey, uid, record and record.data, record and record.block,
                    decoded, refused, ready, first_round, tuple(weights), consensus, rank, incentive)


def render(s: Standing, network: str) -> list[str]:
    """The standing as lines for a terminal."""
    out = [f"netuid {s.netuid} on {network} at block {s.block}",
           f"hotkey {s.hotkey}: " + (f"uid {s.uid}" if s.uid is not None else "not registered")]
    if s.commitment is None:
        out.append("commitment: none readable (none made, or sealed until a later block)")
    else:
        out.append(f"commitment: {s.commitment} (block {s.commit_block})")
        if s.decoded is not None:
            out.append("  " + ", ".join(f"{k} {v}" for k, v in s.decoded.items()))
        else:
            out.append(f"  validators reject it: {s.refused}")
        out.append(f"eligible: from block {s.eligible_block}; first evaluated by the round at sync block {s.first_round}"
                   + (" (passed)" if s.first_round <= s.block else f" (in {s.first_round - s.block} blocks)"))
    if not s.weights:
        out.append("weights: no validator has set weights")
    for w in s.weights:
        place = f"rank {w.rank} in its row" if w.rank is not None else "no weight"
        out.append(f"  validator uid {w.uid} {w.hotkey} (stake {w.stake:g}): weight {w.weight:.4f}, {place}")
    if s.consensus is not None:
        out.append(f"consensus weight {s.consensus:.4f}" + (f", rank {s.rank}" if s.rank is not None else ", unranked"))
    if s.incentive is not None:
        out.append(f"incentive {s.incentive:.4f}")
    return out
