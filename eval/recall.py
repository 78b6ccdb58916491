"""Long-context recall: run TaskItems on a causal LM and grade them by greedy exact match.

Per item: prefill the prompt `prefill_chunk` tokens per forward through the model's cache (a
QuasarLongCache: attention K/V plus fixed-size recurrent states), so activation memory is set by
the chunk, not by the context length; then decode greedily, one token per forward. The item
scores 1 when the decoded tokens equal the answer span, else 0. Decoding stops at the first wrong
token: the score cannot change after it, and a wrong model costs one decode step instead of many.

The answer span is the item's answer_ids cut to `max_answer_tokens` (the competition's decode
budget). With a small vocabulary (localnet's 1024-token BPE) a multi-part answer can be longer
than the budget; such items are graded on the first `max_answer_tokens` tokens and flagged
`truncated`, so a report can say how many were.

With `batch_size` > 1, items whose prompts have the same length (a round's forms fit every prompt
of a length bin to exactly its target length, eval.recall_tasks) run together: one [B, chunk]
forward per prefill chunk and one [B, 1] forward per decode step, no padding, so each row computes
what it computes alone; a row stops being graded at its first wrong token, and the batch stops when
no row is still matching. Outcomes equal the one-at-a-time path (tests/test_evaluate.py) as far as
the kernels round alike: a batched matmul may round differently from a single row, which can only
flip a greedy token at a near-tie, so score_model keeps batch 1 unless the evaluator asks (a replay
should use the batch size of the round it replays). Items do not share a haystack (each item is an
independent draw, which is what the paired bootstrap over items assumes; assoc_recall already asks
several questions of one haystack inside one item), so there is no common prefill to share.

The model is anything called as `model(input_ids=[B, t], cache=cache, use_cache=True,
logits_to_keep=1)` returning `.logits` [B, 1, V] and `.cache` (B = 1 unless batching) (the cache to pass next; Hugging
Face's names since transformers 5.24): a QuasarLongForCausalLM, a Hugging Face decoder (a teacher
used as a reference), or a test double. The first call passes cache=None and the model makes its
own cache.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from eval.recall_tasks import TaskItem
from quasar_model.progress import progress_bar


@dataclass(frozen=True)
class RecallOutcome:
    item_id: str             # "family/L<length_bin>/d<depth_bin>/i<index>", stable across runs
    family: str
    length_bin: int
    depth_bin: int
    prompt_tokens: int
    correct: bool
    continuation: list[int]  # greedy tokens, up to and including the first wrong one
    target: list[int]        # the graded answer span
    truncated: bool          # the answer was longer than max_answer_tokens


def item_ids(items: Sequence[TaskItem]) -> list[str]:
    """Stable ids: the cell plus the item's rank among items of that cell, in list order."""
    seen: Counter = Counter()
    out = []
    for it in items:
        cell = (it.family, it.length_bin, it.depth_bin)
        out.append(f"{it.family}/L{it.length_bin}/d{it.depth_bin}/i{seen[cell]}")
        seen[cell] += 1
    return out


def _device_of(model, device):
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def prefill(model, prompt_ids: Sequence[int], chunk: int, device=None):
    """Run the prompt through the model `chunk` tokens at a time.

    Returns (logits [V] fp32 for the token after the prompt, the cache to continue from).
    """
    logits, cache = prefill_batch(model, [prompt_ids], chunk, device)
    return logits[0], cache


@torch.no_grad()
def prefill_batch(model, prompts: Sequence[Sequence[int]], chunk: int, device=None):
    """`prefill` of several prompts of one length at once: (logits [B, V] fp32, the batch's cache)."""
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
    if not prompts or len(prompts[0]) == 0:
        raise ValueError("cannot prefill an empty prompt: there is no position to predict from")
    if len({len(p) for p in prompts}) != 1:
        raise ValueError(f"a prefill batch needs prompts of one length, got {sorted({len(p) for p in prompts})}")
    dev = _device_of(model, device)
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=dev)    # [B, T]
    cache, logits = None, None
    for a in range(0, ids.shape[1], chunk):
        # logits_to_keep=1: only the last position's logits are ever read, and a chunk's full
        # [chunk, V] logits would dominate memory with a 250k vocabulary
        out = model(input_ids=ids[:, a:a + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits
    return logits[:, -1].float(), cache


@torch.no_grad()
def greedy_decode(model, prompt_ids: Sequence[int], n_tokens: int, *, prefill_chunk: int, device=None,
                  target: Sequence[int] | None = None) -> list[int]:
    """Greedy continuation of `n_tokens` tokens; with `target`, stop after the first token that
    differs from it (the exact-match grade is already decided)."""
    dev = _device_of(model, device)
    logits, cache = prefill(model, prompt_ids, prefill_chunk, dev)
    out: list[int] = []
    for i in range(n_tokens):
        tok = int(torch.argmax(logits))  # ties go to the lowest id: deterministic
        out.append(tok)
        if i + 1 == n_tokens or (target is not None and tok != target[i]):
            break
        step = model(input_ids=torch.tensor([[tok]], device=dev), cache=cache, use_cache=True, logits_to_keep=1)
        cache, logits = step.cache, step.logits[0, -1].float()
    return out


@torch.no_grad()
def greedy_decode_batch(model, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *,
                        prefill_chunk: int, device=None) -> list[list[int]]:
    """`greedy_decode(..., target=t)` of several prompts of one length at once: each row's
    continuation, up to and including its first wrong token (or its whole target)."""
    dev = _device_of(model, device)
    logits, cache = prefill_batch(model, prompts, prefill_chunk, dev)
    outs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))   # rows still matching their target
    while live:
        toks = torch.argmax(logits, dim=-1).tolist()   # ties go to the lowest id, as in greedy_decode
        for r in live:
            outs[r].append(toks[r])
        live = [r for r in live if toks[r] == targets[r][len(outs[r]) - 1] and len(outs[r]) < len(targets[r])]
        if not live:
            break
        # every row steps (a finished row's tokens are never read): the batch keeps one shape
        step = model(input_ids=torch.tensor([[t] for t in toks], device=dev), cache=cache, use_cache=True,
                     logits_to_keep=1)
        cache, logits = step.cache, step.logits[:, -1].float()
    return outs


def _batches(items: Sequence[TaskItem], batch_size: int) -> list[list[int]]:
    """Item indices grouped by prompt length (first-seen order), at most batch_size per group."""
    if batch_size == 1:
        return [[i] for i in range(len(items))]
    by_len: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_len.setdefault(len(it.prompt_ids), []).append(i)
    return [idx[a:a + batch_size] for idx in by_len.values() for a in range(0, len(idx), batch_size)]


def run_recall(model, items: Sequence[TaskItem], *, prefill_chunk: int, max_answer_tokens: int,
               device=None, progress: bool = False, batch_size: int = 1) -> list[RecallOutcome]:
    """Every item, graded; outcomes in item order. batch_size 1: one item at a time (memory flat in
    the number of items); more: items of equal prompt length run batch_size at a time."""
    if max_answer_tokens < 1:
        raise ValueError(f"max_answer_tokens must be >= 1, got {max_answer_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if hasattr(model, "eval"):
        model.eval()
    ids = item_ids(items)
    targets = []
    for iid, it in zip(ids, items):
        if not it.answer_ids:
            raise ValueError(f"recall item {iid} has an empty answer span: nothing to grade")
        targets.append(list(it.answer_ids[:max_answer_tokens]))
    conts: list[list[int] | None] = [None] * len(items)
    with progress_bar(total=len(items), desc="recall", unit="item", enabled=progress, leave=False) as bar:
        for batch in _batches(items, batch_size):
            if len(batch) == 1:
                (i,) = batch
                conts[i] = greedy_decode(model, items[i].prompt_ids, len(targets[i]), prefill_chunk=prefill_chunk,
                                         device=device, target=targets[i])
            else:
                outs = greedy_decode_batch(model, [items[i].prompt_ids for i in batch], [targets[i] for i in batch],
                                           prefill_chunk=prefill_chunk, device=device)
                for i, c in zip(batch, outs):
                    conts[i] = c
            bar.update(len(batch))
    return [RecallOutcome(iid, it.family, it.length_bin, it.depth_bin, len(it.prompt_ids), c == t, c, t,
                          len(it.answer_ids) > max_answer_tokens)
            for iid, it, c, t in zip(ids, items, conts, targets)]


__all__ = ["RecallOutcome", "item_ids", "prefill", "prefill_batch", "greedy_decode", "greedy_decode_batch",
           "run_recall"]
