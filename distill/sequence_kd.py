"""Sequence-level KD: the fallback when teacher and student tokenizers share too little vocabulary.

    teacher generations (text)  --student tokenizer-->  a "text cache"  --trainer, loss.ce_weight=1-->  student

The student is trained with plain cross-entropy on what the teacher wrote (Kim & Rush's
sequence-level distillation), so no token ids are ever compared across vocabularies. The text is
stored in the same sharded, content-addressed cache format as teacher outputs, so packing,
resume and torchrun work unchanged: each position's "teacher" is the one-hot next token (k=1,
log-prob 0), which is exactly the CE target. The trainer refuses a text cache unless
`loss.ce_weight=1`, because a KD term against a one-hot row at a segment's last position (which
has no next token) would train on nothing real.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import torch

from quasar_model.teacher_outputs.cache import CapturedSequence, TeacherCacheMeta, TeacherCacheWriter

TEXT_TEACHER_ID = "text-only"


def is_text_cache(meta) -> bool:
    return meta.teacher_id == TEXT_TEACHER_ID


def write_text_cache(tokenizer, segments: Iterable[list[int]], out_root: str | os.PathLike, *,
                     data_fingerprint: str, source: str = "") -> Path:
    """Student-tokenised segments -> a cache whose row t is the one-hot token t+1 (last row: itself)."""
    from quasar_model.tokenization import real_vocab_size, tokenizer_fingerprint

    meta = TeacherCacheMeta(teacher_id=TEXT_TEACHER_ID, teacher_revision=source or None,
                            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                            vocab_size=real_vocab_size(tokenizer), k=1, temperature=1.0,
                            data_fingerprint=data_fingerprint)
    writer = TeacherCacheWriter(out_root, meta)
    n = 0
    for i, seg in enumerate(segments):
        ids = torch.tensor(seg, dtype=torch.long)                         # [T]
        if ids.numel() < 2:
            continue  # nothing to predict
        nxt = torch.cat([ids[1:], ids[-1:]])                             # [T] next token (last: a placeholder)
        writer.add(CapturedSequence(index=n, input_ids=ids, topk_ids=nxt[:, None],
                                    topk_logprobs=torch.zeros(ids.numel(), 1), tail_mass=torch.zeros(ids.numel())))
        n += 1
    if n == 0:
        writer.abort()
        raise ValueError("no segment of 2 or more tokens: the text cache would be empty")
    return writer.close()


def text_fingerprint(texts: list[str], seq_len: int) -> str:
    h = hashlib.sha256(f"text-cache|seq_len={seq_len}|".encode())
    for t in texts:
        b = t.encode()
        h.update(len(b).to_bytes(8, "big") + b)
    return h.hexdigest()
