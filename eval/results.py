"""Per-item results: what the evaluator measures per submission, and all the scoring rule reads.

One `ItemResult` per scored item of a round. `item_id` names the item, not the submission
("heldout/3", "recall/passkey/L2/d7/i0"), so every submission scored on a round has the same ids
and the paired bootstrap can compare two submissions item by item. (axis, item_id) is unique per
submission; the kl and ce items of one document share its id, so they are resampled together. Values:
  kl      mean forward KL(teacher || student) of one held-out document, nats/token
  ce      mean student cross-entropy of one held-out document, nats/token (`teacher_ce`: the
          teacher's own CE on that document, when known, so the score measures the gap to it)
  recall  1.0 or 0.0: greedy exact match of the answer span (`truncated`: the answer was longer
          than the competition's max_answer_tokens and was graded on its first tokens)
A non-finite value is kept as it is (a broken model can overflow); scoring counts it as worst.

`SubmissionResult` adds who submitted what (hotkey, model hash, commit block), the logit
fingerprint (eval.gates: its log-softmax reading on the round's probes, the teacher's component
projected out; comparable only within the round), the similarity of its reading to the teacher's
(None when not taken)
and the greedy continuations the degenerate gate reads. Both round-trip through plain JSON for SQLite storage and offline replay.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Sequence

AXES = ("kl", "ce", "recall")


def _real(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{what}: expected a number, got {type(v).__name__} {v!r:.40}")
    return float(v)


def _check_keys(raw: dict, known: set[str], required: set[str], what: str) -> None:
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: expected an object, got {type(raw).__name__}")
    unknown, missing = sorted(set(raw) - known), sorted(required - set(raw))
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; known: {sorted(known)}")
    if missing:
        raise ValueError(f"{what}: missing keys {missing}")


@dataclass(frozen=True)
class ItemResult:
    axis: str
    item_id: str
    value: float
    teacher_ce: float | None = None
    truncated: bool = False  # recall only; stored only when True, so rows from before it load unchanged

    def __post_init__(self):
        if self.axis not in AXES:
            raise ValueError(f"item {self.item_id!r}: unknown axis {self.axis!r}; known: {list(AXES)}")
        if not isinstance(self.item_id, str) or not self.item_id:
            raise ValueError(f"item on axis {self.axis!r}: item_id must be a non-empty string, got {self.item_id!r}")
        object.__setattr__(self, "value", _real(self.value, f"item {self.item_id!r} value"))
        if self.teacher_ce is not None:
            if self.axis != "ce":
                raise ValueError(f"item {self.item_id!r}: teacher_ce belongs to ce items, not {self.axis!r}")
            tce = _real(self.teacher_ce, f"item {self.item_id!r} teacher_ce")
            if not math.isfinite(tce):
                raise ValueError(f"item {self.item_id!r}: teacher_ce must be finite, got {tce}")
            object.__setattr__(self, "teacher_ce", tce)
        if not isinstance(self.truncated, bool):
            raise ValueError(f"item {self.item_id!r}: truncated must be true or false, got {self.truncated!r:.40}")
        if self.truncated and self.axis != "recall":
            raise ValueError(f"item {self.item_id!r}: truncated belongs to recall items, not {self.axis!r}")
        if self.axis == "recall" and math.isfinite(self.value) and self.value not in (0.0, 1.0):
            raise ValueError(f"item {self.item_id!r}: a recall value is 0 or 1 (exact match), got {self.value}")

    def to_dict(self) -> dict:
        d = {"axis": self.axis, "item_id": self.item_id, "value": self.value}
        if self.teacher_ce is not None:
            d["teacher_ce"] = self.teacher_ce
        if self.truncated:
            d["truncated"] = True
        return d

    @classmethod
    def from_dict(cls, raw: dict) -> "ItemResult":
        _check_keys(raw, {"axis", "item_id", "value", "teacher_ce", "truncated"}, {"axis", "item_id", "value"}, "item")
        return cls(raw["axis"], raw["item_id"], raw["value"], raw.get("teacher_ce"), raw.get("truncated", False))


@dataclass
class SubmissionResult:
    hotkey: str
    model_hash: str
    commit_block: int
    items: list[ItemResult] = field(default_factory=list)
    fingerprint: list[float] = field(default_factory=list)   # a tensor is accepted and flattened
    continuations: list[list[int]] = field(default_factory=list)
    teacher_similarity: float | None = None

    def __post_init__(self):
        who = f"submission {self.hotkey!r}"
        if not self.hotkey or not self.model_hash:
            raise ValueError(f"{who}: hotkey and model_hash must be non-empty")
        if isinstance(self.commit_block, bool) or not isinstance(self.commit_block, int) or self.commit_block < 0:
            raise ValueError(f"{who}: commit_block must be an int >= 0, got {self.commit_block!r}")
        self.items = [it if isinstance(it, ItemResult) else ItemResult.from_dict(it) for it in self.items]
        fp = self.fingerprint
        if hasattr(fp, "detach"):  # a torch tensor: stored as plain floats so JSON and replay need no torch
            fp = fp.detach().float().flatten().cpu().tolist()
        self.fingerprint = [_real(v, f"{who} fingerprint") for v in fp]
        self.continuations = [[int(t) for t in seq] for seq in self.continuations]
        if self.teacher_similarity is not None:
            self.teacher_similarity = _real(self.teacher_similarity, f"{who} teacher_similarity")

    def to_dict(self) -> dict:
        d = {"hotkey": self.hotkey, "model_hash": self.model_hash, "commit_block": self.commit_block,
             "items": [it.to_dict() for it in self.items], "fingerprint": list(self.fingerprint),
             "continuations": [list(s) for s in self.continuations]}
        if self.teacher_similarity is not None:
            d["teacher_similarity"] = self.teacher_similarity
        return d

    @classmethod
    def from_dict(cls, raw: dict) -> "SubmissionResult":
        known = {"hotkey", "model_hash", "commit_block", "items", "fingerprint", "continuations", "teacher_similarity"}
        _check_keys(raw, known, {"hotkey", "model_hash", "commit_block"}, "submission result")
        return cls(raw["hotkey"], raw["model_hash"], raw["commit_block"], [ItemResult.from_dict(i) for i in raw.get("items", [])],
                   raw.get("fingerprint", []), raw.get("continuations", []), raw.get("teacher_similarity"))

    def to_json(self) -> str:
        # NaN/Infinity are written as JSON's common extension: a broken model's value survives replay
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "SubmissionResult":
        return cls.from_dict(json.loads(text))


def results_to_json(results: Sequence[SubmissionResult]) -> str:
    return json.dumps([r.to_dict() for r in results], separators=(",", ":"))


def results_from_json(text: str) -> list[SubmissionResult]:
    raw = json.loads(text)
    if not isinstance(raw, list):
        raise ValueError(f"round results: expected a list of submission results, got {type(raw).__name__}")
    return [SubmissionResult.from_dict(r) for r in raw]


__all__ = ["AXES", "ItemResult", "SubmissionResult", "results_to_json", "results_from_json"]
