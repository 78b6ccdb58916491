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

The model is anything called as `model(input_ids=[1, t], cache=cache, use_cache=True,
logits_to_keep=1)` returning `.logits` [1, 1, V] and `.cache` (the cache to pass next; Hugging
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
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
    if len(prompt_ids) == 0:
        raise ValueError("cannot prefill an empty prompt: there is no position to predict from")
    dev = _device_of(model, device)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=dev)    # [1, T]
    cache, logits = None, None
    for a in range(0, ids.shape[1], chunk):
        # logits_to_keep=1: only the last position's logits are ever read, and a chunk's full
        # [chunk, V] logits would dominate memory with a 250k vocabulary
        out = model(input_ids=ids[:, a:a + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits
    return logits[0, -1].float(), cache


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


def run_recall(model, items: Sequence[TaskItem], *, prefill_chunk: int, max_answer_tokens: int,
               device=None, progress: bool = False) -> list[RecallOutcome]:
    """Every item in order, one at a time (prompts differ in length; batch 1 keeps memory flat)."""
    from tqdm import tqdm

    if max_answer_tokens < 1:
        raise ValueError(f"max_answer_tokens must be >= 1, got {max_answer_tokens}")
    if hasattr(model, "eval"):
        model.eval()
    results = []
    for iid, it in tqdm(list(zip(item_ids(items), items)), desc="recall", disable=not progress, leave=False):
        if not it.answer_ids:
            raise ValueError(f"recall item {iid} has an empty answer span: nothing to grade")
        target = list(it.answer_ids[:max_answer_tokens])
        cont = greedy_decode(model, it.prompt_ids, len(target), prefill_chunk=prefill_chunk, device=device,
                             target=target)
        results.append(RecallOutcome(iid, it.family, it.length_bin, it.depth_bin, len(it.prompt_ids),
                                     cont == target, cont, target, len(it.answer_ids) > max_answer_tokens))
    return results


__all__ = ["RecallOutcome", "item_ids", "prefill", "greedy_decode", "run_recall"]
