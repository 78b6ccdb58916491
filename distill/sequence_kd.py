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
import inspect
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from quasar_model.corpus import write_jsonl
from quasar_model.teacher_outputs.cache import CapturedSequence, TeacherCacheMeta, TeacherCacheWriter
from quasar_model.tokenization import real_vocab_size, tokenizer_fingerprint

TEXT_TEACHER_ID = "text-only"


def is_text_cache(meta) -> bool:
    return meta.teacher_id == TEXT_TEACHER_ID


def write_text_cache(tokenizer, segments: Iterable[list[int]], out_root: str | os.PathLike, *,
                     data_fingerprint: str, source: str = "") -> Path:
    """Student-tokenised segments -> a cache whose row t is the one-hot token t+1 (last row: itself)."""
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


# -----------------------------------------------------------------------------
# the teacher's generations: what the student trains on

def _row_seed(seed: int, i: int) -> int:
    # one generator per prompt: the text of prompt i does not depend on batching or the other prompts
    return int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") >> 1


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        ids.update(e if isinstance(e, (list, tuple)) else [] if e is None else [e])
    return ids


@torch.no_grad()
def generate_teacher_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, *,
                           temperature: float = 1.0, seed: int = 0, include_prompt: bool = True) -> list[str]:
    """Sample a continuation of each prompt from the teacher (HF causal LM + its HF tokenizer).

    temperature 0 = greedy. Deterministic for a given seed: prompt i samples with its own generator
    seeded from (seed, i). Returns prompt + continuation (include_prompt) or the continuation alone,
    decoded without special tokens, ready for write_teacher_texts.
    """
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and temperature ({temperature}) must be >= 0")
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    # only the last position's logits are needed; older/remote models may not take logits_to_keep
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    texts = []
    for i, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt)["input_ids"]
        if not prompt_ids:
            raise ValueError(f"generate_teacher_texts: prompt {i} is empty and the tokenizer adds no BOS")
        gen = torch.Generator().manual_seed(_row_seed(seed, i))
        x = torch.tensor([prompt_ids], device=device)
        cache, new = None, []
        for _ in range(max_new_tokens):
            out = model(input_ids=x, cache=cache, use_cache=True, **last_only)
            cache = out.cache
            z = out.logits[0, -1].float().cpu()                          # [V]
            if temperature == 0:
                nxt = int(z.argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(z / temperature, -1), 1, generator=gen))
            if nxt in eos:
                break
            new.append(nxt)
            x = torch.tensor([[nxt]], device=device)
        ids = prompt_ids + new if include_prompt else new
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def write_teacher_texts(path: str | os.PathLike, texts: Sequence[str]) -> Path:
    """The generations as a `{"text": ...}` jsonl dataset (what the trainer reads for plain CE)."""
    return write_jsonl(path, list(texts))
