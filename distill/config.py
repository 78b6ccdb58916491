"""DistillConfig: everything one distillation run needs, from a JSON/YAML file plus `key=value` overrides.

    cfg = load_config("configs/distill_tiny.json", ["optim.lr=1e-3", "steps=200"])

Overrides are dotted paths into the sections (`optim.lr`, `loss.kind`, `student.overrides.num_loops`);
values are parsed as the field's type (JSON for lists and dicts, `none`/`null` for optional fields).
An unknown key, a value of the wrong type, or an out-of-range setting fails with a message naming the
key. Relative paths are taken relative to the working directory, as with any command-line tool.
Keys starting with "_" are ignored (comments in JSON).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field

from quasar_model.devices import check_spelling
from quasar_model.files import read_file

from .recall_curriculum import FAMILIES

# torch's dtype names are the code's spelling; the short forms are read at the config boundary only
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def canonical_dtype(value):
    """A dtype name as the code spells it ("bf16" -> "bfloat16"); anything else unchanged, for check() to judge."""
    return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


@dataclass
class StudentSection:
    preset: str = "tiny"                                  # a QuasarLongConfig preset
    overrides: dict = field(default_factory=dict)        # QuasarLongConfig fields over the preset
    init_from: str | None = None                          # a save_pretrained dir instead of fresh weights
    trainable: str = "all"                                # all | branches (hybrid branches and their gates only)


@dataclass
class DataSection:
    train_cache: str = ""                 # teacher cache dir (`quasar teacher-cache --out`)
    heldout_cache: str | None = None      # teacher cache of held-out text, for the KL evaluation
    seq_len: int = 128                    # row length L; every cached sequence must fit
    batch_size: int = 8                   # rows per micro-step, over all ranks together
    grad_accum: int = 1                   # micro-steps per optimizer step
    tokenizer: str | None = None          # exported with the student; default: the cache's teacher


@dataclass
class OptimSection:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1             # cosine floor, as a fraction of lr
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0                # max global grad norm; 0 = off
    engram_lr_multiplier: float | None = None   # None: the student config's engram_lr_multiplier


@dataclass
class LossSection:
    kind: str = "fkl"                     # fkl | rkl | jsd
    beta: float = 0.5                     # JSD mixing weight
    temperature: float | None = None      # None: the cache's capture temperature (the only valid one)
    ce_weight: float = 0.0                # mix of next-token CE on the real text
    hidden_mse_weight: float = 0.0        # layer-wise hidden-state MSE against the live teacher (teacher.model)
    kd_t2_scale: bool = False
    chunk_size: int = 1024                # LM-head tokens per chunk in the sparse loss


@dataclass
class TeacherSection:
    """The live teacher for hidden-state MSE (structural distillation); caches hold no hidden states."""
    model: str | None = None              # Hub name or local checkpoint; "tiny-teacher" = the project's own ("tiny": old, warned)
    revision: str | None = None
    dtype: str = "auto"                   # auto | float32 | bfloat16 | float16
    layers: list | None = None            # [[student_layer, teacher_layer], ...]; None: distill.structural.layer_map


@dataclass
class RecallSection:
    """The recall curriculum (distill/recall_curriculum.py): procedural long-context recall documents
    in every step, trained by cross-entropy on their answer spans (no teacher covers that text)."""
    mix: float = 0.0                      # share of each step's data.batch_size rows that are recall documents; 0 = off
    weight: float = 1.0                   # weight of their answer-span CE next to the KD loss
    families: list | None = None          # None: all of distill.recall_curriculum.FAMILIES
    min_len: int = 64                     # document length (tokens) at step 0 of the length curriculum
    max_len: int | None = None            # document length at the end of the ramp; None: data.seq_len
    ramp: float = 0.5                     # share of the steps over which the length grows (0: max_len throughout)


@dataclass
class DistillConfig:
    student: StudentSection = field(default_factory=StudentSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    recall: RecallSection = field(default_factory=RecallSection)
    steps: int = 100                      # optimizer steps
    output_dir: str = "runs/distill"
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    dtype: str = "bfloat16"               # autocast dtype on CUDA (bfloat16 | float32); CPU always runs float32
    parallel: str = "ddp"                 # under torchrun: ddp | fsdp (FSDP2 fully_shard)
    log_every: int = 1
    eval_every: int = 0                   # steps between held-out KL evaluations; 0 = start and end only
    eval_sequences: int | None = None     # cap on held-out sequences per evaluation
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = True                   # continue from output_dir's latest checkpoint if there is one
    progress: bool = True

    def check(self) -> "DistillConfig":
        def fail(key, why):
            raise ValueError(f"config {key}: {why} (got {_get(self, key)!r})")

        self.dtype, self.teacher.dtype = canonical_dtype(self.dtype), canonical_dtype(self.teacher.dtype)

        for key in ("steps", "data.seq_len", "data.batch_size", "data.grad_accum", "log_every",
                    "checkpoint_every", "keep_checkpoints", "loss.chunk_size"):
            if _get(self, key) < 1:
                fail(key, "must be >= 1")
        for key in ("optim.warmup_steps", "eval_every", "optim.weight_decay", "optim.grad_clip",
                    "loss.hidden_mse_weight"):
            if _get(self, key) < 0:
                fail(key, "must be >= 0")
        if self.data.seq_len < 2:
            fail("data.seq_len", "must be >= 2")
        if not self.data.train_cache:
            fail("data.train_cache", "must name a teacher cache directory (from `quasar teacher-cache`)")
        if not self.optim.lr > 0:
            fail("optim.lr", "must be > 0")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            fail("optim.min_lr_ratio", "must be in [0, 1]")
        for key in ("optim.beta1", "optim.beta2"):
            if not 0 <= _get(self, key) < 1:
                fail(key, "must be in [0, 1)")
        if self.optim.engram_lr_multiplier is not None and not self.optim.engram_lr_multiplier > 0:
            fail("optim.engram_lr_multiplier", "must be > 0")
        from quasar_model.teacher_outputs.buckets import KINDS  # here, not at the top: reading a config file must not import torch

        if self.loss.kind not in KINDS:
            fail("loss.kind", f"must be one of {KINDS}")
        if self.loss.kind == "jsd" and not 0 < self.loss.beta < 1:
            fail("loss.beta", "must be in (0, 1) for kind=jsd")
        if self.loss.temperature is not None and not self.loss.temperature > 0:
            fail("loss.temperature", "must be > 0")
        if not 0 <= self.loss.ce_weight <= 1:
            fail("loss.ce_weight", "must be in [0, 1]")
        if self.loss.hidden_mse_weight > 0 and not self.teacher.model:
            fail("teacher.model", "must name the live teacher when loss.hidden_mse_weight > 0 (a teacher "
                 "cache keeps top-k log-probs, not hidden states)")
        if self.teacher.dtype not in ("auto", "float32", "bfloat16", "float16"):
            fail("teacher.dtype", "must be auto, float32, bfloat16 or float16")
        if self.student.trainable not in ("all", "branches"):
            fail("student.trainable", "must be all or branches")
        if self.dtype not in ("bfloat16", "float32"):
            fail("dtype", "must be bfloat16 or float32 (bf16, fp32)")
        if self.parallel not in ("ddp", "fsdp"):
            fail("parallel", "must be ddp or fsdp")
        try:
            check_spelling(self.device)
        except ValueError:
            fail("device", "must be auto, cpu, cuda or cuda:N")
        self._check_recall(fail)
        from quasar_model.configuration_quasar_long import PRESETS  # here: it loads torch, as KINDS does
        if self.student.preset not in PRESETS:
            fail("student.preset", f"unknown preset; known: {sorted(PRESETS)}")
        return self

    def _check_recall(self, fail) -> None:
        r = self.recall
        if not 0 <= r.mix < 1:
            fail("recall.mix", "must be in [0, 1) (a share of data.batch_size rows; some must stay teacher data)")
        if r.mix == 0:
            return
        n = self.recall_rows
        if n < 1 or n >= self.data.batch_size:
            fail("recall.mix", f"gives {n} of data.batch_size={self.data.batch_size} rows; need at least one "
                 "recall row and one teacher-cache row")
        if not r.weight > 0:
            fail("recall.weight", "must be > 0")
        if r.families is not None and (not r.families or any(f not in FAMILIES for f in r.families)):
            fail("recall.families", f"must be a non-empty list from {list(FAMILIES)}")
        if not 16 <= r.min_len <= self.data.seq_len:
            fail("recall.min_len", f"must be in [16, data.seq_len={self.data.seq_len}]")
        if r.max_len is not None and not r.min_len <= r.max_len <= self.data.seq_len:
            fail("recall.max_len", f"must be in [recall.min_len, data.seq_len={self.data.seq_len}]")
        if not 0 <= r.ramp <= 1:
            fail("recall.ramp", "must be in [0, 1]")

    @property
    def recall_rows(self) -> int:
        """Rows of each micro-step's global batch that are recall documents (the rest: teacher cache)."""
        return max(1, round(self.recall.mix * self.data.batch_size)) if self.recall.mix > 0 else 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -----------------------------------------------------------------------------
# building from dicts, files and overrides, with type checks

def _get(obj, key: str):
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _allowed(tp) -> tuple[list, bool]:
    """A type hint -> (its non-None member types, whether None is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def _check_value(key: str, value, tp):
    members, optional = _allowed(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"config {key}: may not be null")
    for t in members:
        if dataclasses.is_dataclass(t):
            if isinstance(value, dict):
                return _build(t, value, key)
            continue
        t0 = typing.get_origin(t) or t
        if t0 is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t0 is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t0 in (str, bool, dict, list) and isinstance(value, t0):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in members) + (" or null" if optional else "")
    raise ValueError(f"config {key}: expected {names}, got {type(value).__name__} {value!r}")


def _unknown(key: str, name: str, cls) -> ValueError:
    known = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"config {key}: unknown key{hint} (known: {', '.join(known)})")


def _build(cls, d: dict, prefix: str = ""):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in d.items():
        key = f"{prefix}.{name}" if prefix else name
        if name.startswith("_"):          # "_comment" keys: notes in JSON files, which have no comments
            continue
        if name not in names:
            raise _unknown(key, name, cls)
        kwargs[name] = _check_value(key, value, hints[name])
    return cls(**kwargs)


def _parse(key: str, text: str, tp):
    """A command-line string -> a value of the field's type (or a clear error)."""
    members, optional = _allowed(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    for t in members:
        t0 = typing.get_origin(t) or t
        try:
            if t0 is bool:
                low = text.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                continue
            if t0 is int:
                return int(text)
            if t0 is float:
                return float(text)
            if t0 in (dict, list):
                value = json.loads(text)
                if isinstance(value, t0):
                    return value
                continue
            if t0 is str:
                return text
        except ValueError:
            continue
    names = " or ".join(getattr(t, "__name__", str(t)) for t in members) + (" or none" if optional else "")
    raise ValueError(f"config override {key}={text}: expected {names}")


def json_or_text(text: str):
    """A command-line value for a free-form field: its JSON value if it parses, else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(cfg: DistillConfig, item: str) -> None:
    """Set one `dotted.key=value` in place; the value is parsed as the field's type."""
    if "=" not in item:
        raise ValueError(f"config override {item!r}: expected key=value (e.g. optim.lr=1e-3)")
    key, text = item.split("=", 1)
    key = key.strip()
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if isinstance(obj, dict):       # free-form dict (student.overrides): JSON value or raw string
            if i != len(parts) - 1:
                raise ValueError(f"config override {key}: {'.'.join(parts[:i])} entries are not nested")
            obj[part] = json_or_text(text)
            return
        if part not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown(here, part, type(obj))
        tp = _hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(_allowed(tp)[0][0]):
                raise ValueError(f"config override {key}: is a section; set one of its keys ({key}.<name>=...)")
            setattr(obj, part, _parse(key, text, tp))
            return
        obj = getattr(obj, part)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = (), *, check: bool = True,
                **fields) -> DistillConfig:
    """File (optional), then keyword sections/fields (dicts for sections), then dotted overrides.
    check=False: each value's type is checked, the whole config is not (a preflight reading the
    student section before the miner fills in its data paths)."""
    d = read_file(path) if path is not None else {}
    for name, value in fields.items():
        if isinstance(value, dict) and isinstance(d.get(name), dict):
            d[name] = {**d[name], **value}
        else:
            d[name] = value
    cfg = _build(DistillConfig, d)
    for item in overrides:
        apply_override(cfg, item)
    return cfg.check() if check else cfg
