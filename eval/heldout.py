"""Held-out scoring: seeded documents, the teacher's top-k on them (cached), student KL and CE.

    seed --draw----> documents: rows drawn uniformly over every data file of the dataset at its pinned
                     revision (eval.heldout_data), never a fixed pool such as its first N documents
         --tokenise--> ids, the first seq_len tokens of each
         --teacher---> top-k log-probs + tail mass per position, in a content-addressed teacher cache
    student(ids) ---> per document: forward KL on the k+1 buckets, CE of the actual next tokens

The teacher cache is found through an index entry named by a hash of everything that determines
its content (teacher id/revision/dtype, tokenizer, k, temperature, the token ids themselves), so a
second validator with the same seed, or an offline replay of a stored round, reuses it and never
loads the teacher. On a miss the teacher is loaded (through a callable, only then), the cache is
captured, and the teacher's own CE per document is stored beside it: it puts the student's CE in
context and costs one extra teacher forward per document, once per round.

KL is the competition's distillation target: per position KL(p || q) over the teacher's k ids and
one tail bucket (quasar_model.teacher_outputs.buckets), at the competition temperature, averaged over the
document's positions. CE is the student's full-softmax cross-entropy at temperature 1. Both are
nats per token. Positions 0..T-2 are scored (position t predicts token t+1).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from eval.heldout_data import draw_rows, open_source
from quasar_model.atomic import write_atomic
from quasar_model.progress import progress_bar
from quasar_model.teacher_outputs.cache import open_teacher_cache
from quasar_model.teacher_outputs.capture import capture_teacher_cache

from quasar_model.teacher_outputs.buckets import bucket_kd, student_buckets, teacher_buckets

INDEX_DIR = "heldout"   # under the cache root: <key>.json -> which teacher cache, and teacher CE
CAPTURE_DIR = "teacher"  # under the cache root: the teacher caches themselves
HEAD_CHUNK = 1024       # positions per LM-head matmul: [chunk, V] fp32 is 1 GB at V = 250k


@dataclass(frozen=True)
class HeldoutDoc:
    index: int               # the document's global row over the dataset's data files (in path order)
    input_ids: list[int]     # [T], 2 <= T <= seq_len
    origin: str = ""         # "<data file>#<row in it>"


@dataclass
class HeldoutSet:
    seed: int
    docs: list[HeldoutDoc]
    data_fingerprint: str    # sha256 over the token ids, in order
    key: str                 # content address of the teacher cache
    cache: object            # quasar_model.teacher_outputs.cache.TeacherCache, row i <-> docs[i]
    teacher_ce: list[float] | None  # per document; None when the cache came without it


@dataclass(frozen=True)
class DocScore:
    kl: float | None         # nats/token; None when scored without a teacher
    ce: float                # nats/token
    tokens: int              # positions scored (T - 1)


# -----------------------------------------------------------------------------
# documents

def _seeded_rng(seed: int, purpose: str) -> random.Random:
    # a sha256-derived stream: Python's own seeding of ints is stable, but hashing the purpose in
    # keeps the document sample independent of anything else drawn from the same round seed
    return random.Random(int.from_bytes(hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:8], "big"))


def draw_documents(source, seed: int, n: int, tokenizer, seq_len: int) -> list[HeldoutDoc]:
    """n documents drawn by the seed from every row of every data file of `source`
    (eval.heldout_data: a Hub dataset at a pinned revision, or the local corpus), each cut to seq_len
    tokens; a document with fewer than two tokens (nothing to predict) is passed over for the next
    draw. Only the drawn documents are read and tokenised."""
    if seq_len < 2:
        raise ValueError(f"heldout.seq_len must be >= 2 (one position predicting one token), got {seq_len}")

    def ids(text: str) -> list[int] | None:
        t = list(tokenizer.encode(text))[:seq_len]
        return t if len(t) >= 2 else None

    drawn = draw_rows(source, n, ids, _seeded_rng(seed, "heldout"))
    return [HeldoutDoc(d.index, d.value, f"{d.path}#{d.row}") for d in drawn]


def heldout_source(spec, *, cache_root=None, endpoint: str | None = None):
    """The data source a competition's `heldout` section names (eval.heldout_data.open_source)."""
    return open_source(spec.dataset, spec.split, spec.text_field, spec.revision, cache_root=cache_root,
                       endpoint=endpoint)


def data_fingerprint(docs: Sequence[HeldoutDoc]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(len(d.input_ids).to_bytes(8, "big"))
        h.update(json.dumps(d.input_ids, separators=(",", ":")).encode())
    return h.hexdigest()


def cache_key(teacher: dict, k: int, temperature: float, data_fp: str) -> str:
    """Content address of a teacher cache: what the teacher was and what it was run on."""
    blob = json.dumps(dict(teacher=teacher, k=k, temperature=temperature, data=data_fp), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# -----------------------------------------------------------------------------
# the teacher cache: look up, else capture

def _write_json_atomic(path: Path, obj) -> None:
    """Concurrent validators never read half an index entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _open_checked(path: Path, docs: Sequence[HeldoutDoc], k: int, vocab_size: int | None, tok_fp: str | None):
    cache = open_teacher_cache(path, tokenizer_fingerprint=tok_fp or None, k=k, vocab_size=vocab_size)
    if len(cache) != len(docs):
        raise ValueError(f"teacher cache {path}: {len(cache)} sequences, the held-out set has {len(docs)}")
    for i, d in enumerate(docs):
        got = [int(t) for t in cache[i].input_ids]
        if got != d.input_ids:
            raise ValueError(f"teacher cache {path}: sequence {i} holds other tokens than held-out document "
                             f"{d.index}; the cache does not belong to this held-out set")
    return cache


def prepare_heldout(docs: Sequence[HeldoutDoc], seed: int, *, teacher: dict, k: int, temperature: float,
                    cache_root: str | os.PathLike, load_teacher: Callable[[], tuple[object, object]],
                    vocab_size: int | None = None, tokenizer_fingerprint: str | None = None,
                    device=None, progress: bool = False) -> HeldoutSet:
    """The held-out set with its teacher cache: reused when one with the same content address is
    indexed under cache_root, else captured by the teacher that `load_teacher()` returns.

    teacher: a JSON-able identity, e.g. {"id", "revision", "dtype", "tokenizer"}: part of the key.
    """
    root = Path(cache_root)
    fp = data_fingerprint(docs)
    key = cache_key(teacher, k, temperature, fp)
    index = root / INDEX_DIR / f"{key}.json"
    if index.exists():
        entry = json.loads(index.read_text())
        path = root / entry["teacher_cache"]
        if path.exists():
            cache = _open_checked(path, docs, k, vocab_size, tokenizer_fingerprint)
            return HeldoutSet(seed, list(docs), fp, key, cache, entry.get("teacher_ce"))
        # the index outlived its cache (someone cleaned the capture dir): capture again

    model, tok = load_teacher()
    path = Path(capture_teacher_cache(
        model, tok, [d.input_ids for d in docs], root / CAPTURE_DIR, k=k, temperature=temperature,
        teacher_id=str(teacher.get("id")), teacher_revision=str(teacher.get("revision")),
        data_fingerprint=fp, progress=progress))
    teacher_ce = [s.ce for s in score_documents(model, docs, None, temperature, device=device, progress=progress,
                                                desc="teacher CE")]
    rel = os.path.relpath(path, root)  # relative: a cache root can be moved or shared as a whole
    _write_json_atomic(index, dict(key=key, teacher=teacher, k=k, temperature=temperature, data_fingerprint=fp,
                                   seed=seed, documents=[d.origin or d.index for d in docs], teacher_cache=rel,
                                   teacher_ce=teacher_ce))
    cache = _open_checked(path, docs, k, vocab_size, tokenizer_fingerprint)
    return HeldoutSet(seed, list(docs), fp, key, cache, teacher_ce)


# -----------------------------------------------------------------------------
# scoring a model

def _logit_chunks(model, ids: torch.Tensor, chunk: int):
    """ids [1, T] -> yields (start, logits [c, V] fp32) over the positions, c <= chunk."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", model)
    if head is None or body is model:
        # no separable LM head: the model's own full logits, once (a [T, V] tensor: only models
        # outside the Hugging Face causal-LM layout end up here)
        logits = model(input_ids=ids, use_cache=False).logits[0]              # [T, V]
        for a in range(0, logits.shape[0], chunk):
            yield a, logits[a:a + chunk].float()
        return
    # Gemma's soft cap z = cap * tanh(z / cap) is elementwise: it applies chunk by chunk
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    h = body(input_ids=ids, use_cache=False).last_hidden_state[0]             # [T, D]
    for a in range(0, h.shape[0], chunk):
        z = head(h[a:a + chunk]).float()                                       # [c, V]
        yield a, (z.div_(cap).tanh_().mul_(cap) if cap else z)


@torch.no_grad()
def score_document(model, input_ids: Sequence[int], captured=None, temperature: float = 1.0, *,
                   device=None, chunk: int = HEAD_CHUNK) -> DocScore:
    """KL (when `captured`, the teacher's CapturedSequence for these ids, is given) and CE of one document."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=dev)       # [1, T]
    T = ids.shape[1]
    labels = ids[0, 1:]                                                        # [T-1]
    kl_sum, ce_sum = 0.0, 0.0
    for a, z in _logit_chunks(model, ids, chunk):
        b = min(a + z.shape[0], T - 1)   # the last position has no next token
        if b <= a:
            break
        z = z[: b - a]                                                         # [c, V]
        ls1 = F.log_softmax(z, dim=-1)                                         # [c, V] at temperature 1
        ce_sum -= float(ls1.gather(1, labels[a:b, None]).sum())
        if captured is not None:
            tid = torch.as_tensor(captured.topk_ids[a:b], device=dev).long()            # [c, k]
            tlp = torch.as_tensor(captured.topk_logprobs[a:b], device=dev).float()      # [c, k]
            tail = torch.as_tensor(captured.tail_mass[a:b], device=dev).float()         # [c]
            if int(tid.max()) >= z.shape[1]:
                raise ValueError(f"teacher top-k holds id {int(tid.max())} but the model's vocabulary has "
                                 f"{z.shape[1]} ids: student and teacher must share the tokenizer")
            # at temperature 1 the CE's log-softmax serves: one [c, V] tensor fewer
            lsm = ls1 if temperature == 1.0 else F.log_softmax(z.div_(temperature), dim=-1)
            ls = student_buckets(lsm.gather(1, tid))                           # [c, k+1]
            lt = teacher_buckets(tlp, tail)                                    # [c, k+1]
            kl_sum += float(bucket_kd(ls, lt, "fkl").sum())
    n = T - 1
    return DocScore(kl_sum / n if captured is not None else None, ce_sum / n, n)


def score_documents(model, docs: Sequence[HeldoutDoc], cache=None, temperature: float = 1.0, *, device=None,
                    progress: bool = False, desc: str = "held-out", chunk: int = HEAD_CHUNK) -> list[DocScore]:
    if hasattr(model, "eval"):
        model.eval()
    out = []
    for i, d in enumerate(progress_bar(docs, desc=desc, enabled=progress, leave=False)):
        out.append(score_document(model, d.input_ids, None if cache is None else cache[i], temperature,
                                  device=device, chunk=chunk))
    return out


def score_heldout(model, heldout: HeldoutSet, temperature: float, *, device=None,
                  progress: bool = False) -> list[DocScore]:
    return score_documents(model, heldout.docs, heldout.cache, temperature, device=device, progress=progress)


__all__ = ["HeldoutDoc", "HeldoutSet", "DocScore", "draw_documents", "heldout_source", "data_fingerprint",
           "cache_key", "prepare_heldout", "score_document", "score_documents", "score_heldout"]
