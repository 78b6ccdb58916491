"""Teacher cache: a teacher's sparse outputs on a token stream, on disk, named by its content.

Layout of one cache, `out_root/<cache_id>/`:

    manifest.json               meta + one record per shard (file, sha256, bytes, counts, first index)
    shard-00000.safetensors     consecutive sequences, concatenated along tokens (N rows, S sequences):
        input_ids      int32 [N]          the tokens the teacher read
        topk_ids       int32 [N, k]       its k most likely next tokens, most likely first
        topk_logprobs  [N, k]             their log-probs at the capture temperature (fp32, or fp16/bf16)
        tail_mass      fp32  [N]          probability of every other real token (kept fp32: it can be tiny)
        offsets        int64 [S + 1]      sequence s is rows offsets[s]:offsets[s+1]
        index          int64 [S]          each sequence's global index (its place in the capture order)

Row t of a sequence is the teacher's distribution over the token AFTER input_ids[t].

cache_id = sha256 of the canonical manifest (JSON, sorted keys, no whitespace). The manifest names
every shard's sha256, so the id names the content bit for bit: another teacher, tokenizer, data,
k, temperature or storage dtype gives another id. The shard layout depends only on the sequence
lengths and `shard_tokens` (a shard closes as soon as it holds >= shard_tokens tokens), never on
how many processes captured it, so a torchrun capture has the same id as a single-process one.

A cache is written into a temporary directory next to its final place and renamed when complete:
a reader never sees half a cache, and two writers of the same content both end with one copy.
A capture (quasar_model.teacher_outputs.capture.capture_teacher_cache) writes into `out_root/.partial-<key>/` instead,
named by what it captures (the meta and shard_tokens), and records each finished shard there
(`shard-NNNNN.safetensors.json`: its manifest record and a digest of its input tokens): stopped at
any point, it keeps only finished shards, and the same capture run again skips them. Shard bytes
depend only on their sequences, so a resumed cache is byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from quasar_model.teacher_outputs import TeacherCacheError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 1 << 20          # ~0.5 GB per shard at k=64 with fp32 log-probs
LOGPROB_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HASH_BLOCK = 1 << 24

__all__ = [
    "FORMAT_VERSION", "DEFAULT_SHARD_TOKENS", "LOGPROB_DTYPES",
    "TeacherCacheError", "CaptureInterrupted", "CapturedSequence", "TeacherCacheMeta", "ShardInfo",
    "TeacherCacheWriter", "TeacherCache", "open_teacher_cache",
    "shard_is_full", "write_shard", "finalize_cache", "manifest_id", "partial_dir", "write_shard_record",
    "read_shard_record", "discard_unfinished",
]


class CaptureInterrupted(KeyboardInterrupt):
    """A capture stopped by Ctrl-C (or a signal turned into one): `done` of `total` shards (total None
    when the segment count was not known) are kept in `partial`, None when nothing was kept."""

    def __init__(self, done: int, total: int | None, partial: Path | None):
        self.done, self.total, self.partial = done, total, partial
        of = f" of {total}" if total is not None else ""
        super().__init__(f"capture interrupted: {done}{of} shards finished, kept in {partial}" if partial
                         else "capture interrupted before its first shard was finished")


@dataclass
class CapturedSequence:
    index: int                      # global position of the sequence in the capture order
    input_ids: torch.Tensor         # [T] int64
    topk_ids: torch.Tensor          # [T, k] int64, most likely first
    topk_logprobs: torch.Tensor     # [T, k] float32, log softmax(z / temperature) at those ids
    tail_mass: torch.Tensor         # [T] float32, 1 - sum(exp(topk_logprobs)), computed stably

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class TeacherCacheMeta:
    teacher_id: str
    teacher_revision: str | None
    tokenizer_fingerprint: str      # quasar_model.tokenization.tokenizer_fingerprint of the teacher's tokenizer
    vocab_size: int                 # real vocab size: every stored id is < this (never a padded LM-head row)
    k: int
    temperature: float
    data_fingerprint: str
    logprob_dtype: str = "float32"  # storage dtype of topk_logprobs; readers always get float32
    format_version: int = FORMAT_VERSION
    num_sequences: int = 0          # counts: filled in when the cache is closed
    num_tokens: int = 0

    def __post_init__(self):
        # canonical types: 1 and 1.0 must not hash to two cache ids
        self.k, self.vocab_size = int(self.k), int(self.vocab_size)
        self.temperature = float(self.temperature)
        self.num_sequences, self.num_tokens = int(self.num_sequences), int(self.num_tokens)
        self.format_version = int(self.format_version)
        if self.teacher_revision is not None:
            self.teacher_revision = str(self.teacher_revision)
        if self.k < 1:
            raise ValueError(f"k: must be >= 1, got {self.k}")
        if self.vocab_size < self.k:
            raise ValueError(f"vocab_size: {self.vocab_size} is smaller than k={self.k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype: {self.logprob_dtype!r} is not one of {sorted(LOGPROB_DTYPES)}")


@dataclass
class ShardInfo:
    file: str
    sha256: str
    bytes: int
    num_sequences: int
    num_tokens: int
    first_index: int


def shard_is_full(num_tokens: int, shard_tokens: int) -> bool:
    """The one rule that closes a shard (shared by the writer and the distributed capture's planner)."""
    return num_tokens >= shard_tokens


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_id(manifest: dict) -> str:
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _shard_name(shard_no: int) -> str:
    return f"shard-{shard_no:05d}.safetensors"


# -----------------------------------------------------------------------------
# writing

def _check_sequence(seq: CapturedSequence, k: int, vocab_size: int):
    T = seq.input_ids.shape[0] if seq.input_ids.dim() == 1 else -1
    if T < 1:
        raise ValueError(f"sequence {seq.index}: input_ids must be a non-empty 1-d tensor, "
                         f"got shape {list(seq.input_ids.shape)}")
    for name, t, shape in (("topk_ids", seq.topk_ids, (T, k)), ("topk_logprobs", seq.topk_logprobs, (T, k)),
                           ("tail_mass", seq.tail_mass, (T,))):
        if tuple(t.shape) != shape:
            what = " (k mismatch)" if t.dim() == 2 and t.shape[0] == T else ""
            raise ValueError(f"sequence {seq.index}: {name} has shape {list(t.shape)}, expected "
                             f"{list(shape)} for T={T}, k={k}{what}")
    hi = int(seq.topk_ids.max())
    if hi >= vocab_size or int(seq.topk_ids.min()) < 0:
        raise ValueError(f"sequence {seq.index}: topk_ids has id {hi} outside the real vocab "
                         f"[0, {vocab_size}) (vocab mismatch, or a padded LM-head row in the top-k)")


def write_shard(directory: str | os.PathLike, shard_no: int, seqs: list[CapturedSequence],
                logprob_dtype: str = "float32") -> ShardInfo:
    """Write consecutive sequences as one safetensors shard; return its manifest record."""
    if not seqs:
        raise ValueError("write_shard: a shard needs at least one sequence")
    for a, b in zip(seqs, seqs[1:]):
        if b.index != a.index + 1:
            raise ValueError(f"write_shard: sequence indices must be consecutive, got {a.index} then {b.index}")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    tensors = {
        "input_ids": torch.cat([s.input_ids for s in seqs]).to(torch.int32),
        "topk_ids": torch.cat([s.topk_ids for s in seqs]).to(torch.int32),
        "topk_logprobs": torch.cat([s.topk_logprobs for s in seqs]).to(LOGPROB_DTYPES[logprob_dtype]),
        "tail_mass": torch.cat([s.tail_mass for s in seqs]).to(torch.float32),
        "offsets": offsets,
        "index": torch.tensor([s.index for s in seqs], dtype=torch.int64),
    }
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    path = Path(directory) / _shard_name(shard_no)
    save_file(tensors, str(path))   # no metadata: bytes depend on the tensors only
    return ShardInfo(file=path.name, sha256=_file_sha256(path), bytes=path.stat().st_size,
                     num_sequences=len(seqs), num_tokens=int(offsets[-1]), first_index=seqs[0].index)


def finalize_cache(tmp_dir: str | os.PathLike, out_root: str | os.PathLike, meta: TeacherCacheMeta,
                   shards: list[ShardInfo]) -> Path:
    """Write the manifest into tmp_dir (holding exactly `shards`) and rename it to out_root/<cache_id>."""
    tmp_dir, out_root = Path(tmp_dir), Path(out_root)
    expected = 0
    for s in shards:
        if s.first_index != expected:
            raise ValueError(f"finalize_cache: shard {s.file} starts at sequence {s.first_index}, "
                             f"expected {expected}: shards must cover the sequences in order")
        expected += s.num_sequences
    meta = TeacherCacheMeta(**{**asdict(meta), "num_sequences": expected,
                               "num_tokens": sum(s.num_tokens for s in shards)})
    manifest = {"meta": asdict(meta), "shards": [asdict(s) for s in shards]}
    (tmp_dir / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")
    final = out_root / manifest_id(manifest)
    try:
        os.rename(tmp_dir, final)       # atomic on one filesystem
    except OSError:
        if not (final / MANIFEST).exists():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)  # same content already there: keep that copy
    return final


def partial_dir(out_root: str | os.PathLike, meta: TeacherCacheMeta, shard_tokens: int) -> Path:
    """The resumable capture's directory for this meta and shard size (created if absent)."""
    key = hashlib.sha256(_canonical({"meta": asdict(meta), "shard_tokens": int(shard_tokens)})).hexdigest()
    path = Path(out_root) / f".partial-{key[:20]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _record_path(directory: Path, shard_no: int) -> Path:
    return Path(directory) / f"{_shard_name(shard_no)}.json"


def write_shard_record(directory: str | os.PathLike, info: ShardInfo, inputs: str) -> None:
    """Mark a written shard finished (atomically: the record is what a resumed capture trusts)."""
    path = Path(directory) / f"{info.file}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**asdict(info), "inputs": inputs}))
    os.replace(tmp, path)


def read_shard_record(directory: str | os.PathLike, shard_no: int, inputs: str | None = None) -> ShardInfo | None:
    """The record of a finished shard, or None when there is none, it is for other inputs (a digest
    other than `inputs`, when given) or its file is missing or of another size."""
    path = _record_path(Path(directory), shard_no)
    try:
        rec = json.loads(path.read_text())
        found = rec.pop("inputs", None)
        info = ShardInfo(**rec)
        size = (Path(directory) / info.file).stat().st_size
    except (OSError, ValueError, TypeError):
        return None
    if (inputs is not None and found != inputs) or size != info.bytes or info.file != _shard_name(shard_no):
        return None
    return info


def discard_unfinished(directory: str | os.PathLike, keep: set[str] | None = None) -> int:
    """Delete what no record vouches for (a shard cut short, a record's temp file) and, with `keep`,
    every file not named in it; returns how many shards stay finished."""
    directory = Path(directory)
    finished = {f.name[:-len(".json")] for f in directory.glob("shard-*.safetensors.json")}
    for f in directory.iterdir():
        vouched = f.name in finished or f.name[:-len(".json")] in finished
        if not vouched or (keep is not None and f.name not in keep and f.name[:-len(".json")] not in keep):
            f.unlink(missing_ok=True)
    return len(finished if keep is None else finished & keep)


def make_tmp_dir(out_root: str | os.PathLike) -> Path:
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".tmp-teacher-cache-", dir=out_root))


class TeacherCacheWriter:
    """Append sequences in capture order; close() names the cache by its content and returns its path.

        with TeacherCacheWriter(root, meta) as w:
            for seq in captured:
                w.add(seq)
        path = w.path
    """

    def __init__(self, out_root: str | os.PathLike, meta: TeacherCacheMeta,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens: must be >= 1, got {shard_tokens}")
        self.out_root, self.meta, self.shard_tokens = Path(out_root), meta, shard_tokens
        self._tmp = make_tmp_dir(out_root)
        self._buf: list[CapturedSequence] = []
        self._buf_tokens = 0
        self._shards: list[ShardInfo] = []
        self._next = 0
        self.path: Path | None = None

    def add(self, seq: CapturedSequence):
        if self.path is not None:
            raise RuntimeError("TeacherCacheWriter: add() after close()")
        if seq.index != self._next:
            raise ValueError(f"TeacherCacheWriter: expected sequence index {self._next}, got {seq.index} "
                             "(sequences must be added in capture order)")
        _check_sequence(seq, self.meta.k, self.meta.vocab_size)
        self._buf.append(seq)
        self._buf_tokens += len(seq)
        self._next += 1
        if shard_is_full(self._buf_tokens, self.shard_tokens):
            self._flush()

    def _flush(self):
        if self._buf:
            self._shards.append(write_shard(self._tmp, len(self._shards), self._buf, self.meta.logprob_dtype))
            self._buf, self._buf_tokens = [], 0

    def close(self) -> Path:
        if self.path is None:
            self._flush()
            self.path = finalize_cache(self._tmp, self.out_root, self.meta, self._shards)
        return self.path

    def abort(self):
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -----------------------------------------------------------------------------
# reading

_SHARD_KEYS = ("input_ids", "topk_ids", "topk_logprobs", "tail_mass", "offsets", "index")


class TeacherCache:
    """A verified cache on disk. Sequences load one shard at a time (the last one stays in memory)."""

    def __init__(self, path: Path, meta: TeacherCacheMeta, shards: list[ShardInfo]):
        self.path, self.meta, self.shards = path, meta, shards
        self.cache_id = path.name
        self._starts = [s.first_index for s in shards]
        self._loaded: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return self.meta.num_sequences

    @property
    def num_tokens(self) -> int:
        return self.meta.num_tokens

    def __repr__(self):
        m = self.meta
        return (f"TeacherCache({self.cache_id[:12]}, teacher={m.teacher_id!r}, k={m.k}, T={m.temperature}, "
                f"{m.num_sequences} sequences, {m.num_tokens} tokens, {len(self.shards)} shards)")

    def _shard(self, j: int) -> dict:
        """Shard j's tensors as stored, checked against the manifest (the last one stays loaded)."""
        if self._loaded is not None and self._loaded[0] == j:
            return self._loaded[1]
        info = self.shards[j]
        try:
            t = st_load((self.path / info.file).read_bytes())
        except FileNotFoundError:
            raise TeacherCacheError(f"teacher cache {self.path}: shard {info.file} is missing") from None
        except Exception as e:   # safetensors raises its own error type on a damaged header
            raise TeacherCacheError(f"teacher cache {self.path}: shard {info.file} is corrupted "
                                    f"(unreadable safetensors: {e})") from None
        self._check(info, t)
        t["offsets_list"] = t["offsets"].tolist()
        self._loaded = (j, t)
        return t

    def _check(self, info: ShardInfo, t: dict):
        def bad(why):
            return TeacherCacheError(f"teacher cache {self.path}: shard {info.file} is corrupted ({why})")

        missing = [n for n in _SHARD_KEYS if n not in t]
        if missing:
            raise bad(f"missing tensors {missing}")
        N, S, k = info.num_tokens, info.num_sequences, self.meta.k
        if t["topk_ids"].dim() != 2 or t["topk_ids"].shape[1] != k:
            raise TeacherCacheError(f"teacher cache {self.path}: shard {info.file} stores "
                                    f"{list(t['topk_ids'].shape)} top-k ids, but the manifest says k={k} "
                                    "(k mismatch)")
        shapes = {"input_ids": (N,), "topk_ids": (N, k), "topk_logprobs": (N, k), "tail_mass": (N,),
                  "offsets": (S + 1,), "index": (S,)}
        for n, shape in shapes.items():
            if tuple(t[n].shape) != shape:
                raise bad(f"{n} has shape {list(t[n].shape)}, manifest implies {list(shape)}")
        if t["topk_logprobs"].dtype != LOGPROB_DTYPES[self.meta.logprob_dtype]:
            raise bad(f"topk_logprobs stored as {t['topk_logprobs'].dtype}, manifest says {self.meta.logprob_dtype}")
        offsets = t["offsets"].tolist()
        if offsets[0] != 0 or offsets[-1] != N or any(b <= a for a, b in zip(offsets, offsets[1:])):
            raise bad("offsets do not split the rows into non-empty sequences")
        if t["index"].tolist() != list(range(info.first_index, info.first_index + S)):
            raise bad(f"sequence indices are not {info.first_index}..{info.first_index + S - 1}")
        if N and (int(t["topk_ids"].max()) >= self.meta.vocab_size or int(t["topk_ids"].min()) < 0):
            raise TeacherCacheError(f"teacher cache {self.path}: shard {info.file} has token ids outside "
                                    f"the recorded vocab [0, {self.meta.vocab_size}) (vocab mismatch)")

    def _sequence(self, j: int, s: int) -> CapturedSequence:
        # widen one sequence at a time: the shard itself stays in its compact stored dtypes
        t = self._shard(j)
        a, b = t["offsets_list"][s], t["offsets_list"][s + 1]
        return CapturedSequence(index=self.shards[j].first_index + s, input_ids=t["input_ids"][a:b].long(),
                                topk_ids=t["topk_ids"][a:b].long(), topk_logprobs=t["topk_logprobs"][a:b].float(),
                                tail_mass=t["tail_mass"][a:b].clone())

    def __getitem__(self, i: int) -> CapturedSequence:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"teacher cache has {n} sequences, index {i} is out of range")
        j = bisect.bisect_right(self._starts, i) - 1
        return self._sequence(j, i - self.shards[j].first_index)

    def iter_sequences(self, start: int = 0) -> Iterator[CapturedSequence]:
        """Sequences start, start+1, ... in capture order, streaming shard by shard (one in memory)."""
        if start >= len(self):
            return
        j0 = bisect.bisect_right(self._starts, max(start, 0)) - 1
        for j in range(j0, len(self.shards)):
            info = self.shards[j]
            for s in range(max(start - info.first_index, 0), info.num_sequences):
                yield self._sequence(j, s)

    def __iter__(self):
        return self.iter_sequences()

    def verify(self):
        """Recompute every shard's sha256 and size against the manifest (reads the whole cache)."""
        _check_shard_files(self.path, self.shards, hashes=True)


def _check_shard_files(path: Path, shards: list[ShardInfo], hashes: bool):
    for s in shards:
        f = path / s.file
        if not f.exists():
            raise TeacherCacheError(f"teacher cache {path}: shard {s.file} is missing")
        size = f.stat().st_size
        if size < s.bytes:
            raise TeacherCacheError(f"teacher cache {path}: shard {s.file} is truncated "
                                    f"({size} bytes, manifest says {s.bytes})")
        if size != s.bytes:
            raise TeacherCacheError(f"teacher cache {path}: shard {s.file} is corrupted "
                                    f"(size {size} bytes, manifest says {s.bytes})")
        if hashes and (digest := _file_sha256(f)) != s.sha256:
            raise TeacherCacheError(f"teacher cache {path}: shard {s.file} is corrupted (sha256 {digest[:16]}... "
                                    f"does not match the manifest's {s.sha256[:16]}...)")


def open_teacher_cache(path: str | os.PathLike, *, tokenizer_fingerprint: str | None = None,
                       k: int | None = None, vocab_size: int | None = None,
                       verify: bool = True) -> TeacherCache:
    """Open out_root/<cache_id>, checking it is intact and fits the caller.

    tokenizer_fingerprint / k / vocab_size: what the caller will use the cache with (None = any).
    verify: hash every shard now (reads the whole cache once); without it only sizes are checked.
    Raises TeacherCacheError naming the problem.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise TeacherCacheError(f"teacher cache {path}: no {MANIFEST} (not a teacher cache, or an unfinished one)")
    try:
        manifest = json.loads(mpath.read_text())
        meta_d = manifest["meta"]
        if meta_d.get("format_version") != FORMAT_VERSION:
            raise TeacherCacheError(f"teacher cache {path}: format_version {meta_d.get('format_version')}, "
                                    f"this code reads version {FORMAT_VERSION}")
        meta = TeacherCacheMeta(**{f.name: meta_d[f.name] for f in fields(TeacherCacheMeta)})
        shards = [ShardInfo(**s) for s in manifest["shards"]]
    except TeacherCacheError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise TeacherCacheError(f"teacher cache {path}: unreadable manifest ({type(e).__name__}: {e})") from None
    if manifest_id(manifest) != path.name:
        raise TeacherCacheError(f"teacher cache {path}: the manifest's hash {manifest_id(manifest)[:16]}... does "
                                f"not match the directory name (cache id) {path.name[:16]}...: the manifest was "
                                "edited or the directory renamed")
    if tokenizer_fingerprint is not None and tokenizer_fingerprint != meta.tokenizer_fingerprint:
        raise TeacherCacheError(f"teacher cache {path} was captured with another tokenizer: its tokenizer "
                                f"fingerprint is {meta.tokenizer_fingerprint[:16]}..., yours is "
                                f"{tokenizer_fingerprint[:16]}... (map vocabularies with quasar_model.tokenization.VocabMap, "
                                "or capture with this tokenizer)")
    if k is not None and k != meta.k:
        raise TeacherCacheError(f"teacher cache {path}: k mismatch: the cache stores k={meta.k} ids per "
                                f"position, {k} were asked for")
    if vocab_size is not None and vocab_size != meta.vocab_size:
        raise TeacherCacheError(f"teacher cache {path}: vocab mismatch: the cache's real vocab size is "
                                f"{meta.vocab_size}, {vocab_size} were expected")
    if sum(s.num_sequences for s in shards) != meta.num_sequences or \
            sum(s.num_tokens for s in shards) != meta.num_tokens:
        raise TeacherCacheError(f"teacher cache {path}: manifest counts do not add up over its shards")
    _check_shard_files(path, shards, hashes=verify)
    return TeacherCache(path, meta, shards)
