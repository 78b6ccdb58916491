"""The competition file: everything miners and validators must agree on, in one versioned file.

A competition is a JSON file (YAML also read when PyYAML is importable) loaded into the frozen
`Competition` below. Unknown keys, missing keys and out-of-range values are errors that name the
key path, so a typo can never silently change how submissions are scored. `digest` (sha256 of the
canonical JSON) is recorded with every round, so a stored round says exactly which rules made it.

`budget` states what one submission's evaluation may cost: `tokens`, the most tokens its plan
(eval.budget: held-out documents, recall prompts and answers, fingerprint probes, continuations)
may run, checked here, so a file whose own plan is over it is refused; and `seconds`, the
wall-clock limit per submission on `reference_gpu`, the validator's default evaluation timeout;
and `max_flops`, the most a student's evaluation may cost by eval.budget's estimate for its config,
checked at fetch (neurons.checks) so a student the parameter caps admit cannot overrun `seconds`.

Shipped files (`eval/competitions/`): `localnet.json` (the tiny teacher trained by this project on
the local corpus, CPU sizes) and `sn24.json` (the real subnet). `load_competition("localnet")`
finds a shipped one by name; any other argument is a path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from eval.budget import planned_tokens  # eval.budget names Competition only for type checkers: no cycle
from quasar_model.files import read_file

FORMAT_VERSION = 1
SHIPPED = Path(__file__).parent / "competitions"
FAMILIES = ("passkey", "niah_multikey", "multivalue", "assoc_recall", "variable_tracking")


class CompetitionError(ValueError):
    pass


@dataclass(frozen=True)
class TeacherSpec:
    id: str                    # Hugging Face repo id or local path; "tiny-teacher" = quasar_model.teacher_outputs.tiny_teacher
    revision: str              # pinned commit on the Hub ("local" for the tiny teacher)
    # parameter count, pinned here so the student bound is checked offline before any download
    params: int
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class TokenizerSpec:
    id: str                    # where the tokenizer is loaded from (usually the teacher's)
    fingerprint: str = ""      # quasar_model.tokenization.tokenizer_fingerprint; "" = not pinned (localnet)


@dataclass(frozen=True)
class StudentSpec:
    model_type: str
    vocab_size: int            # exact: KL needs the teacher's ids
    max_total_params: int
    max_layers: int
    max_hidden: int
    # Active parameters (per token: routed experts counted k of E) at most this times teacher.params.
    # A student that computes the teacher's function holds every teacher weight active on every
    # token, so a ratio below 1 refuses the teacher (and any student built around it) on the meta
    # device; counting active rather than total parameters leaves room for large sparse MoE students.
    max_active_params_vs_teacher: float
    max_loops: int = 4

    def max_active_params(self, teacher_params: int) -> int:
        return int(self.max_active_params_vs_teacher * teacher_params)


@dataclass(frozen=True)
class HeldoutSpec:
    dataset: str               # "local" (quasar_model.corpus heldout split) or a Hub dataset name
    # the dataset's pinned commit (40 hex); "local" = this machine's local corpus (localnet); the
    # local corpus can be pinned too, by the first 40 hex of its fingerprint (eval.heldout_data)
    revision: str
    split: str
    text_field: str
    documents: int             # drawn per round by the seed from every data file of the split
    seq_len: int               # tokens per document (longer ones are truncated)
    topk: int                  # teacher top-k kept per position
    temperature: float = 1.0


# keys that once were part of the format, and why they went away: named in the error, not "unknown"
REMOVED = {
    "heldout.pool": "removed: the held-out documents are no longer a fixed pool (the first N documents of the "
                    "split), which let miners precompute the teacher's outputs on every document a round could "
                    "use; they are drawn by the round seed from every data file of the dataset at "
                    "heldout.revision. Delete the key and pin heldout.revision",
}


@dataclass(frozen=True)
class RecallSpec:
    context_len: int           # 1x; the tasks also run at every multiple in `lengths`
    families: tuple[str, ...] = FAMILIES
    lengths: tuple[int, ...] = (1, 2, 4)
    depth_bins: int = 10
    items_per_cell: int = 1
    prefill_chunk: int = 1024  # tokens per forward during prefill (memory flat in context length)
    max_answer_tokens: int = 16
    # surface forms of the items (eval.recall_forms): "round" draws wording, alphabets, filler and
    # delimiters from the round seed, so a model trained on the public defaults gains nothing;
    # "fixed" (what a file without the key means) is the public defaults, as every round before had
    forms: str = "fixed"


@dataclass(frozen=True)
class ScoreSpec:
    weights: dict[str, float]  # axis -> weight, summing to 1: "kl", "ce", "recall"
    margin: float              # a challenger must beat the leader's composite by more than this
    bootstrap_resamples: int = 1000
    confidence: float = 0.95   # one-sided: the lower bound of the improvement's interval
    ema_alpha: float = 0.3     # weight of this round in the per-hotkey score EMA
    functional_copy_threshold: float = 0.9    # fingerprint similarity above which a later model is a copy
    # similarity to the teacher's readings above which a submission is the teacher: stricter than the
    # copy gate, because an honest student improves by approaching the teacher (the size bound is
    # what keeps teacher-sized models out)
    teacher_threshold: float = 0.999
    fingerprint_probes: int = 32              # probe sequences in the logit fingerprint
    degenerate_max_repeat: float = 0.5        # share of greedy output a single repeated n-gram may fill


@dataclass(frozen=True)
class ScheduleSpec:
    cadence_blocks: int        # a validator round every this many blocks
    eval_delay_blocks: int     # commitments younger than this at the sync block wait a round
    weights_top_k: int = 1     # how many ranked miners get weight (the leader first)


@dataclass(frozen=True)
class BudgetSpec:
    """What one submission's evaluation may cost (eval.budget has the plan and the FLOP estimate)."""
    tokens: int                # most tokens (prefill + decode, every axis) the plan may run per submission
    seconds: float             # wall-clock limit of one submission's evaluation (load + score) on reference_gpu;
    #                            validators on slower hardware scale it (quasar validator --eval-time-scale)
    reference_gpu: str = ""    # the hardware `seconds` is sized for ("" = this machine's CPU, localnet)
    # most FLOPs (eval.budget's estimate for the student's config under this plan) a submission may
    # cost, checked at fetch on the meta device: what the parameter caps do not see (loops, attention
    # width, recurrent states) cannot make a legal student overrun `seconds`; 0 = no cap
    max_flops: float = 0.0


@dataclass(frozen=True)
class Competition:
    version: int
    name: str
    netuid: int
    teacher: TeacherSpec
    tokenizer: TokenizerSpec
    student: StudentSpec
    heldout: HeldoutSpec
    recall: RecallSpec
    score: ScoreSpec
    schedule: ScheduleSpec
    budget: BudgetSpec
    notes: str = ""
    # package -> exact version every validator must run (eval.stack); {} = not pinned (localnet)
    eval_stack: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def unpinned(self) -> list[str]:
        """What a real network cannot leave open: anything that lets two validators (or a validator
        and the Hub a week later) score the same submission differently. [] = fully pinned."""
        out = []
        if not _is_commit(self.teacher.revision):
            out.append(f"teacher.revision is {self.teacher.revision!r}, not a 40-hex commit")
        if not self.tokenizer.fingerprint:
            out.append("tokenizer.fingerprint is empty")
        if not self.eval_stack:
            out.append("eval_stack is empty")
        if not _is_commit(self.heldout.revision):
            out.append(f"heldout.revision is {self.heldout.revision!r}, not a 40-hex commit of dataset "
                       f"{self.heldout.dataset!r}")
        return out

    @property
    def digest(self) -> str:
        raw = self.to_dict()
        if not raw["eval_stack"]:  # files from before eval_stack keep their digest (stored rounds resume)
            del raw["eval_stack"]
        if raw["recall"]["forms"] == "fixed":  # likewise files from before recall.forms
            del raw["recall"]["forms"]
        blob = json.dumps(raw, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def check(self) -> "Competition":
        def need(ok: bool, path: str, why: str):
            if not ok:
                raise CompetitionError(f"{path}: {why}")

        need(self.version == FORMAT_VERSION, "version", f"this toolkit reads version {FORMAT_VERSION}, got {self.version}")
        for path, v in [("student.vocab_size", self.student.vocab_size), ("student.max_total_params", self.student.max_total_params),
                        ("student.max_layers", self.student.max_layers), ("student.max_hidden", self.student.max_hidden),
                        ("heldout.documents", self.heldout.documents), ("heldout.seq_len", self.heldout.seq_len),
                        ("heldout.topk", self.heldout.topk), ("recall.context_len", self.recall.context_len),
                        ("recall.depth_bins", self.recall.depth_bins), ("recall.items_per_cell", self.recall.items_per_cell),
                        ("recall.prefill_chunk", self.recall.prefill_chunk), ("recall.max_answer_tokens", self.recall.max_answer_tokens),
                        ("score.bootstrap_resamples", self.score.bootstrap_resamples),
                        ("score.fingerprint_probes", self.score.fingerprint_probes),
                        ("schedule.cadence_blocks", self.schedule.cadence_blocks), ("schedule.weights_top_k", self.schedule.weights_top_k)]:
            need(v >= 1, path, f"must be >= 1, got {v}")
        need(self.teacher.params >= 1, "teacher.params", f"must be >= 1 (the teacher's parameter count), got {self.teacher.params}")
        need(0 < self.student.max_active_params_vs_teacher <= 1, "student.max_active_params_vs_teacher",
             f"must be in (0, 1]: above 1 a student can hold the whole teacher, got {self.student.max_active_params_vs_teacher}")
        need(self.heldout.topk <= self.student.vocab_size, "heldout.topk", "larger than the vocabulary")
        need(self.heldout.temperature > 0, "heldout.temperature", "must be > 0")
        need(bool(self.heldout.revision.strip()), "heldout.revision",
             "empty: name the dataset's commit (40 hex), or 'local' for the local corpus")
        need(self.heldout.revision != "local" or self.heldout.dataset == "local", "heldout.revision",
             f"'local' names the local corpus, but heldout.dataset is {self.heldout.dataset!r}: pin its commit")
        need(self.schedule.eval_delay_blocks >= 0, "schedule.eval_delay_blocks", "must be >= 0")
        unknown = set(self.recall.families) - set(FAMILIES)
        need(not unknown and len(self.recall.families) > 0, "recall.families",
             f"unknown {sorted(unknown)}; known: {list(FAMILIES)}" if unknown else "empty")
        need(self.recall.forms in ("fixed", "round"), "recall.forms",
             f"must be 'fixed' (the public default forms) or 'round' (drawn per round), got {self.recall.forms!r}")
        need(len(self.recall.lengths) > 0 and all(m >= 1 for m in self.recall.lengths), "recall.lengths",
             f"need multiples >= 1, got {list(self.recall.lengths)}")
        axes = {"kl", "ce", "recall"}
        need(set(self.score.weights) <= axes, "score.weights", f"unknown axes {sorted(set(self.score.weights) - axes)}")
        need(all(w >= 0 for w in self.score.weights.values()), "score.weights", "weights must be >= 0")
        need(abs(sum(self.score.weights.values()) - 1) < 1e-9, "score.weights", f"must sum to 1, got {sum(self.score.weights.values())}")
        need(self.score.margin >= 0, "score.margin", "must be >= 0")
        need(0.5 <= self.score.confidence < 1, "score.confidence", "must be in [0.5, 1)")
        need(0 < self.score.ema_alpha <= 1, "score.ema_alpha", "must be in (0, 1]")
        need(0 < self.score.functional_copy_threshold <= 1, "score.functional_copy_threshold", "must be in (0, 1]")
        need(0 < self.score.teacher_threshold <= 1, "score.teacher_threshold", "must be in (0, 1]")
        need(0 < self.score.degenerate_max_repeat <= 1, "score.degenerate_max_repeat", "must be in (0, 1]")
        need(self.budget.tokens >= 1, "budget.tokens", f"must be >= 1, got {self.budget.tokens}")
        need(self.budget.seconds > 0, "budget.seconds", f"must be > 0, got {self.budget.seconds}")
        need(self.budget.max_flops >= 0, "budget.max_flops", f"must be >= 0 (0 = no cap), got {self.budget.max_flops}")
        planned = planned_tokens(self)
        need(planned <= self.budget.tokens, "budget.tokens",
             f"the evaluation plan runs {planned:,} tokens per submission, over the budget of {self.budget.tokens:,} "
             "(eval.budget: held-out documents x seq_len + recall prompts and answers + fingerprint probes + "
             "continuations); shrink heldout/recall or raise the budget")
        for package, version in self.eval_stack.items():
            need(bool(package.strip()) and bool(version.strip()) and "+" not in version, f"eval_stack.{package}",
                 f"need a package name and an exact public version (no +local part), got {version!r}")
        return self


def _is_commit(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _build(cls, raw, path: str):
    """raw JSON value -> an instance of the annotated type `cls`, naming the key path of any mismatch."""
    where = path or "<top level>"
    if dataclasses.is_dataclass(cls):
        if not isinstance(raw, dict):
            raise CompetitionError(f"{where}: expected an object, got {type(raw).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if f"{path}.{key}" in REMOVED:
                raise CompetitionError(f"{path}.{key}: {REMOVED[f'{path}.{key}']}")
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise CompetitionError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
        kwargs = {}
        for name, f in fields.items():
            sub = f"{path}.{name}" if path else name
            if name in raw:
                kwargs[name] = _build(hints[name], raw[name], sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CompetitionError(f"{sub}: missing")
        return cls(**kwargs)
    origin = typing.get_origin(cls)
    if origin is tuple:
        if not isinstance(raw, (list, tuple)):
            raise CompetitionError(f"{where}: expected a list, got {type(raw).__name__}")
        (item,) = {a for a in typing.get_args(cls) if a is not Ellipsis}
        return tuple(_build(item, v, f"{path}[{i}]") for i, v in enumerate(raw))
    if origin is dict:
        kt, vt = typing.get_args(cls)
        if not isinstance(raw, dict):
            raise CompetitionError(f"{where}: expected an object, got {type(raw).__name__}")
        return {_build(kt, k, path): _build(vt, v, f"{path}.{k}") for k, v in raw.items()}
    if cls is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if cls in (int, float, str) and (type(raw) is cls):
        return raw
    raise CompetitionError(f"{where}: expected {cls.__name__}, got {type(raw).__name__} {raw!r:.40}")


def parse_competition(raw: dict) -> Competition:
    return _build(Competition, raw, "").check()


def load_competition(name_or_path: str | os.PathLike) -> Competition:
    """A shipped competition by name (`localnet`, `sn24`) or a JSON/YAML file."""
    path = Path(name_or_path)
    # a shipped name wins over a directory of the same name (`quasar localnet` works in ./localnet)
    if not path.is_file() and (SHIPPED / f"{name_or_path}.json").exists():
        path = SHIPPED / f"{name_or_path}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in SHIPPED.glob("*.json"))
        raise CompetitionError(f"competition {str(name_or_path)!r}: no such file, and not a shipped name {shipped}")

    try:
        raw = read_file(path)  # JSON, or YAML by extension: the same reader as distill configs
    except ValueError as e:
        raise CompetitionError(str(e)) from None
    try:
        return parse_competition(raw)
    except CompetitionError as e:
        raise CompetitionError(f"{path}: {e}") from None
