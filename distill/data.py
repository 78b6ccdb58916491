"""Training data: texts through `datasets`, tokenised into segments, packed into fixed-length rows.

    texts --tokenise--> segments (one document, or a <= L piece of one; EOS ends each document)
          --teacher---> a teacher cache: per segment its ids + the teacher's top-k for every position
          --pack------> rows [B, L]: whole segments side by side, position ids restarting at 0 for each

A segment is never split across rows: the teacher saw it whole, so the student must too. Position
ids that restart make the student's attention block-diagonal and reset its recurrent branches, so
one row holding several segments computes exactly what the segments would compute alone. Labels
(next token, for the optional CE term) stop at each segment's end: no loss crosses a boundary.

Order is deterministic: epoch e visits the segments in a permutation drawn from (seed, e), packed
greedily in that order. The loader's position (epoch, offset into that permutation) is all a
checkpoint needs to resume the exact same stream of rows.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .losses import IGNORE_INDEX

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


# -----------------------------------------------------------------------------
# texts

def _local_files(path: Path) -> tuple[str, list[str]]:
    """A file or a directory -> (datasets builder name, sorted files). One file type per source."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.suffix in FILE_BUILDERS and not p.name.startswith(".")]
    if not files:
        raise ValueError(f"data source {str(path)!r}: no {sorted(FILE_BUILDERS)} files found")
    builders = {FILE_BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise ValueError(f"data source {str(path)!r}: mixes file types {sorted({p.suffix for p in files})}; "
                         "point at one kind of file")
    return builders.pop(), [str(p) for p in files]


def load_texts(source: str | os.PathLike, *, split: str = "train", text_field: str = "text",
               streaming: bool | None = None, config_name: str | None = None) -> Iterator[str]:
    """Yield the text of every record of a dataset, in its stored order.

    source: a local .jsonl/.json/.txt/.parquet file or a directory of them (a .txt file is one
    document), or a Hugging Face Hub dataset name. streaming=None streams (reads record by record,
    no arrow cache); pass False to let `datasets` materialise and cache the split. A record without
    `text_field` raises ValueError naming the field and the fields the dataset has.
    """
    import datasets

    path = Path(source)
    if path.exists():
        builder, files = _local_files(path)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files={split: files}, split=split,
                                   streaming=True if streaming is None else streaming, **kwargs)
    elif _looks_like_path(str(source)):
        raise ValueError(f"data source {str(source)!r}: no such file or directory")
    else:   # a Hub dataset: stream it, a full download of a pretraining corpus is never wanted
        ds = datasets.load_dataset(str(source), config_name, split=split,
                                   streaming=True if streaming is None else streaming)
    names = list(ds.features) if ds.features is not None else None
    if names is not None and text_field not in names:
        raise ValueError(_no_field(source, text_field, names))
    for i, record in enumerate(ds):
        if text_field not in record:
            raise ValueError(_no_field(source, text_field, list(record)) + f" (record {i})")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"data source {str(source)!r}: field {text_field!r} of record {i} is "
                             f"{type(text).__name__}, not text")
        yield text


def _looks_like_path(s: str) -> bool:
    # Hub names are "name" or "owner/name"; anything else that does not exist is a missing file
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or Path(s).suffix in FILE_BUILDERS


def _no_field(source, field: str, present: list[str]) -> str:
    return (f"data source {str(source)!r} has no text field {field!r}; fields present: {sorted(present)} "
            f"(choose one with text_field=... / --text-field)")


# -----------------------------------------------------------------------------
# tokenising

def tokenize_segments(texts: Iterable[str], tokenizer, seq_len: int) -> Iterator[list[int]]:
    """Each document -> its ids + EOS, cut into segments of at most seq_len tokens (empty docs skipped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len: must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id: documents need an end-of-text token between them")
    for text in texts:
        if not text:
            continue
        ids = tokenizer.encode(text, add_special_tokens=False) + [eos]
        for start in range(0, len(ids), seq_len):
            yield ids[start:start + seq_len]


# -----------------------------------------------------------------------------
# packing

@dataclass
class DataPosition:
    """Where the loader is: the next segment to read is perm(epoch)[offset]."""
    epoch: int = 0
    offset: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(int(d["epoch"]), int(d["offset"]))


@dataclass
class PackedBatch:
    input_ids: torch.Tensor       # [B, L] int64, pad id after the last segment of a row
    position_ids: torch.Tensor    # [B, L] int64, 0.. per segment (padding is one more "segment")
    labels: torch.Tensor          # [B, L] int64, next token inside the segment, else IGNORE_INDEX
    mask: torch.Tensor            # [B, L] bool, True where the teacher's distribution is a target
    topk_ids: torch.Tensor        # [B, L, k] int64
    topk_logprobs: torch.Tensor   # [B, L, k] fp32
    tail: torch.Tensor            # [B, L] fp32 teacher mass outside its top-k

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device) -> "PackedBatch":
        return PackedBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


def sequence_lengths(cache) -> list[int]:
    """Token count of every sequence of a teacher cache (its index when it has one)."""
    lengths = getattr(cache, "lengths", None)
    if lengths is not None:
        return [int(n) for n in (lengths() if callable(lengths) else lengths)]
    return [int(cache[i].input_ids.shape[0]) for i in range(len(cache))]


def cache_blocks(cache) -> list[tuple[int, int]] | None:
    """(first index, count) of each shard of a sharded cache, else None."""
    shards = getattr(cache, "shards", None)
    if not shards:
        return None
    return [(int(s.first_index), int(s.num_sequences)) for s in shards]


def epoch_order(n: int, seed: int, epoch: int, blocks: list[tuple[int, int]] | None = None) -> list[int]:
    """The segment order of one epoch: a permutation that depends on (seed, epoch) only.

    With blocks (a sharded cache), the shards are visited in a random order and the sequences of
    each shard in a random order: a reader then loads every shard once per epoch instead of
    once per sequence.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))
    if not blocks or len(blocks) == 1:
        return torch.randperm(n, generator=g).tolist()
    order = []
    for j in torch.randperm(len(blocks), generator=g).tolist():
        first, count = blocks[j]
        order.extend((first + torch.randperm(count, generator=g)).tolist())
    return order


def pack_row(seqs: Sequence, seq_len: int, k: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Captured sequences (total <= seq_len tokens) -> one row of every PackedBatch field, padded."""
    ids, pos, lab, msk, tids, tlp, tail = [], [], [], [], [], [], []
    for s in seqs:
        T = s.input_ids.shape[0]
        ids.append(s.input_ids.long())
        pos.append(torch.arange(T))
        # the label of position t is token t+1 of the same segment; the last position has none
        lab.append(torch.cat([s.input_ids[1:].long(), torch.tensor([IGNORE_INDEX])]))
        msk.append(torch.ones(T, dtype=torch.bool))
        tids.append(s.topk_ids.long())
        tlp.append(s.topk_logprobs.float())
        tail.append(s.tail_mass.float())
    pad = seq_len - sum(t.shape[0] for t in ids)
    if pad < 0:
        raise ValueError(f"segments of {seq_len + -pad} tokens do not fit a row of seq_len={seq_len}")
    if pad:
        # padding is a separate "document" (positions from 0) so it never attends into real tokens
        ids.append(torch.full((pad,), pad_id, dtype=torch.long))
        pos.append(torch.arange(pad))
        lab.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
        msk.append(torch.zeros(pad, dtype=torch.bool))
        tids.append(torch.arange(k).expand(pad, k))     # distinct in-range ids: masked, never read
        tlp.append(torch.full((pad, k), -math.log(k + 1)))
        tail.append(torch.full((pad,), 1.0 / (k + 1)))
    cat = lambda xs: torch.cat(xs, dim=0)  # noqa: E731
    return dict(input_ids=cat(ids), position_ids=cat(pos), labels=cat(lab), mask=cat(msk),
                topk_ids=cat(tids), topk_logprobs=cat(tlp), tail=cat(tail))


class PackedLoader:
    """Endless, deterministic, resumable stream of packed batches from a teacher cache.

    Every rank plans the same global batches of `batch_size` rows (planning needs only the
    sequence lengths) and reads only its own rows, rank::world_size: the ranks' shares are
    disjoint and together are exactly what one process would read.
    """

    def __init__(self, cache, seq_len: int, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, pad_id: int = 0, shuffle: bool = True,
                 lengths: list[int] | None = None):
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} rows must divide evenly over {world_size} ranks")
        self.cache, self.seq_len, self.batch_size, self.seed = cache, seq_len, batch_size, seed
        self.rank, self.world_size, self.pad_id, self.shuffle = rank, world_size, pad_id, shuffle
        self.lengths = sequence_lengths(cache) if lengths is None else lengths
        if not self.lengths:
            raise ValueError("the teacher cache holds no sequences")
        longest = max(self.lengths)
        if longest > seq_len:
            raise ValueError(f"the teacher cache has a {longest}-token sequence, longer than seq_len="
                             f"{seq_len}; capture it with --seq-len <= {seq_len} or raise data.seq_len")
        self.blocks = cache_blocks(cache) if lengths is None else None
        if self.blocks is not None and sum(c for _, c in self.blocks) != len(self.lengths):
            self.blocks = None
        self.k = int(cache[0].topk_ids.shape[-1])
        self.position = DataPosition()
        self._order: tuple[int, list[int]] | None = None   # (epoch, permutation), memoised

    def _perm(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            n = len(self.lengths)
            self._order = (epoch, epoch_order(n, self.seed, epoch, self.blocks) if self.shuffle
                           else list(range(n)))
        return self._order[1]

    def plan_rows(self, n_rows: int, position: DataPosition,
                  stop_at_epoch_end: bool = False) -> tuple[list[list[int]], DataPosition]:
        """The next n_rows rows (lists of sequence indices) from `position`, and the position after."""
        epoch, offset = position.epoch, position.offset
        rows, row, used = [], [], 0
        while len(rows) < n_rows:
            perm = self._perm(epoch)
            if offset == len(perm):   # an epoch ends a row: rows never mix two epochs
                if row:
                    rows.append(row)
                    row, used = [], 0
                epoch, offset = epoch + 1, 0
                if stop_at_epoch_end:
                    break
                continue
            i = perm[offset]
            if used + self.lengths[i] > self.seq_len:
                rows.append(row)
                row, used = [], 0
                continue
            row.append(i)
            used += self.lengths[i]
            offset += 1
        # a row closes only when the next segment does not fit (or the epoch ends), so no
        # half-planned row is left over: `offset` is exactly the first segment not yet used
        return rows, DataPosition(epoch, offset)

    def next_batch(self) -> PackedBatch:
        """This rank's rows of the next global batch; advances the position."""
        rows, self.position = self.plan_rows(self.batch_size, self.position)
        mine = rows[self.rank::self.world_size]
        packed = [pack_row([self.cache[i] for i in r], self.seq_len, self.k, self.pad_id) for r in mine]
        return PackedBatch(**{f: torch.stack([p[f] for p in packed]) for f in packed[0]})

    def state_dict(self) -> dict:
        return self.position.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition.from_dict(state)


def iterate_once(cache, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 pad_id: int = 0, max_sequences: int | None = None) -> Iterator[PackedBatch]:
    """One ordered pass over a cache (evaluation): every sequence exactly once, this rank's rows."""
    loader = PackedLoader(cache, seq_len, batch_size, seed=0, shuffle=False)   # plans only
    if max_sequences is not None:
        loader.lengths = loader.lengths[:max_sequences]
    while loader.position.epoch == 0:
        rows, loader.position = loader.plan_rows(batch_size, loader.position, stop_at_epoch_end=True)
        if not rows:
            break
        # the last batch may be short; pad it with empty rows so every rank runs the same steps
        rows += [[] for _ in range(-len(rows) % world_size)]
        mine = rows[rank::world_size]
        packed = [pack_row([cache[i] for i in r], seq_len, loader.k, pad_id) for r in mine]
        yield PackedBatch(**{f: torch.stack([p[f] for p in packed]) for f in packed[0]})
