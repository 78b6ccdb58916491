"""What a distillation run starts from: its teacher caches (checked against the config and each
other), the teacher's tokenizer (checked against the caches), and the student (fresh from a preset,
or loaded; optionally frozen but for its hybrid branches)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from quasar_model import QuasarLongConfig, QuasarLongForCausalLM
from quasar_model.teacher_outputs.cache import TeacherCacheError, open_teacher_cache
from quasar_model.tokenization import tokenizer_fingerprint

from .config import DistillConfig


def resolve_cache_dir(path: str | os.PathLike) -> Path:
    """A cache directory, or a directory holding exactly one (what `quasar teacher-cache --out` makes)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"teacher cache {str(path)!r}: no such directory (make one with `quasar teacher-cache`)")
    try:
        open_teacher_cache(path, verify=False)
        return path
    except TeacherCacheError:
        pass
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            open_teacher_cache(sub, verify=False)
            found.append(sub)
        except TeacherCacheError:
            continue
    if len(found) != 1:
        what = "no teacher cache" if not found else f"{len(found)} teacher caches ({[p.name for p in found]})"
        raise ValueError(f"teacher cache {str(path)!r}: holds {what}; name the cache directory itself")
    return found[0]


def open_caches(cfg: DistillConfig):
    """(train cache, held-out cache or None), checked against each other."""
    train = open_teacher_cache(resolve_cache_dir(cfg.data.train_cache))
    m = train.meta
    if cfg.loss.temperature is not None and not math.isclose(cfg.loss.temperature, m.temperature):
        raise ValueError(f"config loss.temperature={cfg.loss.temperature} but the teacher cache was captured "
                         f"at temperature {m.temperature}: its log-probs are only valid at that temperature "
                         "(leave loss.temperature unset, or capture a new cache)")
    heldout = None
    if cfg.data.heldout_cache:
        heldout = open_teacher_cache(resolve_cache_dir(cfg.data.heldout_cache),
                                     tokenizer_fingerprint=m.tokenizer_fingerprint, vocab_size=m.vocab_size)
        h = heldout.meta
        for key in ("teacher_id", "teacher_revision", "temperature"):
            if getattr(h, key) != getattr(m, key):
                raise ValueError(f"held-out teacher cache has {key}={getattr(h, key)!r} but the training "
                                 f"cache has {getattr(m, key)!r}: both must come from the same teacher")
        if h.data_fingerprint == m.data_fingerprint:
            raise ValueError("the held-out teacher cache was captured from the same data as the training "
                             "cache: held-out KL needs text the student does not train on")
    return train, heldout


def load_tokenizer(cfg: DistillConfig, meta):
    """The teacher's tokenizer (exported with the student), checked against the cache's fingerprint."""
    from transformers import AutoTokenizer

    name = cfg.data.tokenizer or meta.teacher_id
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer {name!r} to export with the student ({e}); "
                         "set data.tokenizer to a local tokenizer directory") from e
    fp = tokenizer_fingerprint(tok)
    if fp != meta.tokenizer_fingerprint:
        raise ValueError(f"tokenizer {name!r} (fingerprint {fp[:12]}) is not the one the teacher cache was "
                         f"captured with ({meta.tokenizer_fingerprint[:12]})")
    return tok


def build_student(cfg: DistillConfig, vocab_size: int, tokenizer=None) -> nn.Module:
    """A fresh student from the preset (+ overrides), or the checkpoint named by student.init_from."""
    if cfg.student.init_from:
        # master weights in torch's default dtype: float32, unless a caller sets another (the
        # equivalence tests run in float64)
        model = QuasarLongForCausalLM.from_pretrained(cfg.student.init_from, dtype=torch.get_default_dtype())
    else:
        special = {}
        if tokenizer is not None:
            special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id)
        kw = {"vocab_size": vocab_size, **special, **cfg.student.overrides}
        model = QuasarLongForCausalLM(QuasarLongConfig.preset(cfg.student.preset, **kw))
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"student vocab_size={model.config.vocab_size} is smaller than the teacher's "
                         f"{vocab_size}: the student must be able to emit every teacher id")
    if cfg.student.trainable == "branches":
        freeze_all_but_branches(model)
    return model


def freeze_all_but_branches(model) -> list[str]:
    """requires_grad only on the hybrid layers' branches and their gates (a, g, c, adapter).

    Structural distillation's first phase: the trunk copied from the teacher stays the teacher's,
    and only what is new learns. Which parameters those are is the model's to say
    (QuasarLongForCausalLM.branch_parameters). Returns the names left trainable.
    """
    model.requires_grad_(False)
    names = []
    for name, p in model.branch_parameters():
        p.requires_grad_(True)
        names.append(name)
    if not names:
        raise ValueError("student.trainable=branches, but the student has no hybrid layers (no branches to train)")
    return names
