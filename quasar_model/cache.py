"""The hybrid cache: attention K/V and branch recurrent states, keyed by (loop, layer).

With loops > 1 the same layer runs once per loop pass on different hidden states, so each pass
keeps its own K/V and recurrent state; keying by (loop, layer) is what keeps decoding exact.
Recurrent states summarise the whole prefix, so unlike K/V they cannot be cropped.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class QuasarLongCache(Cache):
    is_compileable = False

    def __init__(self):
        super().__init__(layers=[])
        self.entries: dict[tuple[int, int], dict] = {}
        self.seen_tokens = 0
        self.token_history: torch.Tensor | None = None  # last few input ids, for engram's n-grams

    def entry(self, loop: int, layer: int) -> dict:
        return self.entries.setdefault((loop, layer), {})

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, *args, **kwargs):
        raise NotImplementedError("QuasarLongCache builds its own attention masks")

    def __len__(self) -> int:
        return len(self.entries)

    def _apply(self, fn):
        self.entries = {k: _map_tensors(v, fn) for k, v in self.entries.items()}
        if self.token_history is not None:
            self.token_history = fn(self.token_history)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._apply(lambda t: t[indices])

    def crop(self, max_length: int):
        raise ValueError("QuasarLongCache cannot be cropped: recurrent branch states summarise the whole prefix")

    def reset(self):
        self.entries.clear()
        self.seen_tokens = 0
        self.token_history = None
