"""Where a round's held-out documents come from: drawn by the round seed from every data file of a
dataset at a pinned revision, one (file, row) at a time, never "the first N documents".

    source.files() --> every data file of the split with its row count, in path order
    seed ----draw----> global row r uniform over all rows (file = where r falls, offset = r - file start)
         --read-----> that row's text (only that file's row group is read, and the text is cached)
         --tokenise-> kept when it has >= 2 tokens, else the next draw (deterministically)

A row is uniform over the whole dataset (a file is weighted by its rows), and rows are drawn without
replacement. Two validators with the same seed, competition and source read the same files and
rows, so they hold the same documents; nobody holds them before the seed exists, because the seed
comes from a block hash and the draw covers every file. Memorising any fixed set of documents (the
first N, one file, a sample) covers the held-out set only in proportion to its share of the rows.

Sources:
- `HubSource`: a Hugging Face Hub dataset at a revision (resolved once to its commit, which keys the
  cache). The split's files are its parquet files (a file whose name starts with the split name, or
  that lies under a folder named like the split, as the Hub names them); each file's row counts come
  from its parquet footer, read with an HTTP range request, so no file is downloaded whole. A drawn
  row reads only its row group's text column (range requests again). Everything read is kept under
  the cache root, keyed by (dataset, commit, file): a second round, a second validator sharing the
  cache, or an offline replay reads nothing from the network for rows it already has.
  Cost: once per (dataset, commit) one footer per data file; per round at most `documents` row
  groups' text columns (pyarrow reads a column chunk whole, so a dataset written with very large
  row groups costs that much per drawn document) and the footers of the files they lie in.
- `LocalSource`: the local corpus (quasar_model.corpus) split into fixed shards of `LOCAL_SHARD_DOCS`
  documents: the same draw over "files", without a network. Its revision is "local" (this machine's
  corpus, unchecked: localnet) or the first 40 hex of the split's corpus fingerprint, checked.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from quasar_model.atomic import write_atomic
from quasar_model.corpus import fingerprint, local_split

LOCAL_SHARD_DOCS = 8       # local corpus documents per "file" (its held-out split has a few dozen)
FOOTER_PROBE = 64 << 10    # bytes read from a parquet file's end: footer and its length, usually at once
FOOTER_WORKERS = 8         # footers fetched at once while indexing a dataset's files
DATA_DIR = "heldout-data"  # under the cache root
HTTP_TIMEOUT = 60.0
COMMIT = re.compile(r"[0-9a-f]{40}")


class HeldoutDataError(ValueError):
    pass


@dataclass(frozen=True)
class DataFile:
    path: str                          # inside the dataset repository (local: a shard name)
    rows: int
    row_groups: tuple[int, ...] = ()   # rows per parquet row group; () for a local shard
    size: int = 0                      # bytes


@dataclass(frozen=True)
class Draw:
    index: int      # global row number over the files in path order
    path: str       # its file
    row: int        # its row inside the file
    value: object   # what `keep` made of the row's text


def is_commit(revision: str) -> bool:
    return bool(COMMIT.fullmatch(revision or ""))


def split_files(paths: Sequence[str], split: str) -> list[str]:
    """The parquet files of `split` among a repository's paths, as the Hub lays splits out:
    `.../train-00000-of-00042.parquet`, `.../train.parquet`, `train/...parquet`."""
    name = re.compile(rf"{re.escape(split)}([-._0-9].*)?\.parquet")
    out = []
    for p in paths:
        parts = p.split("/")
        if p.endswith(".parquet") and (name.fullmatch(parts[-1]) or split in parts[:-1]):
            out.append(p)
    return sorted(out)


# -----------------------------------------------------------------------------
# the draw

def draw_rows(source, n: int, keep, rng) -> list[Draw]:
    """Rows drawn by `rng` (seeded by the round) uniformly without replacement over every row of every
    file of `source`, in draw order; `keep(text)` makes a row's value, None to pass the row over;
    until n rows are kept."""
    files = source.files()
    starts, total = [], 0
    for f in files:
        starts.append(total)
        total += f.rows
    if total == 0:
        raise HeldoutDataError(f"{source.describe()}: no rows in {len(files)} data files")
    seen: set[int] = set()
    kept: list[Draw] = []
    while len(kept) < n:
        if len(seen) >= total:
            raise HeldoutDataError(f"{source.describe()}: {len(kept)} usable documents of {total} rows, "
                                   f"the competition asks for {n}")
        batch = []
        want = min(n - len(kept), total - len(seen))
        while len(batch) < want:
            g = rng.randrange(total)
            if g not in seen:
                seen.add(g)
                batch.append(g)
        wanted: dict[int, list[int]] = {}
        for g in batch:
            fi = bisect.bisect_right(starts, g) - 1
            wanted.setdefault(fi, []).append(g - starts[fi])
        texts = {fi: source.read(files[fi], sorted(rows)) for fi, rows in sorted(wanted.items())}
        for g in batch:   # in draw order: the result does not depend on how reads were grouped
            fi = bisect.bisect_right(starts, g) - 1
            value = keep(texts[fi][g - starts[fi]])
            if value is not None:
                kept.append(Draw(g, files[fi].path, g - starts[fi], value))
                if len(kept) == n:
                    break
    return kept


def open_source(dataset: str, split: str, text_field: str, revision: str, *, cache_root=None,
                endpoint: str | None = None, token: str | None = None):
    """The source a competition's `heldout` section names: "local" or a Hub dataset."""
    if dataset == "local":
        return LocalSource(split, revision)
    if cache_root is None:
        raise HeldoutDataError("a Hub dataset needs a cache root for what it reads")
    return HubSource(dataset, split, text_field, revision, cache_root=cache_root, endpoint=endpoint, token=token)


# -----------------------------------------------------------------------------
# the local corpus

def local_revision(split: str) -> str:
    """What pins the local corpus: its split's fingerprint (CPython's pydoc topics differ by version)."""
    return fingerprint(local_split(split))[:40]


class LocalSource:
    def __init__(self, split: str, revision: str):
        self.split, self.revision = split, revision
        self.docs = local_split(split)
        if revision != "local":
            have = local_revision(split)
            if revision != have:
                raise HeldoutDataError(
                    f"heldout.revision {revision!r}: this machine's local corpus ({split!r} split) is revision "
                    f"{have!r} (another Python's pydoc topics?); 'local' takes whatever this machine has")

    def describe(self) -> str:
        return f"local corpus split {self.split!r}"

    def files(self) -> list[DataFile]:
        n = LOCAL_SHARD_DOCS
        return [DataFile(f"{self.split}-{i // n:05d}", len(self.docs[i:i + n])) for i in range(0, len(self.docs), n)]

    def read(self, f: DataFile, rows: Sequence[int]) -> dict[int, str]:
        first = int(f.path.rsplit("-", 1)[1]) * LOCAL_SHARD_DOCS
        return {r: self.docs[first + r] for r in rows}


# -----------------------------------------------------------------------------
# a Hub dataset

class HubSource:
    """A Hub dataset's split at a pinned revision; see the module docstring."""

    def __init__(self, dataset: str, split: str, text_field: str, revision: str, *, cache_root,
                 endpoint: str | None = None, token: str | None = None):
        from huggingface_hub import HfApi

        self.dataset, self.split, self.text_field, self.revision = dataset, split, text_field, revision
        self.endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
        self.token = token
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.root = Path(cache_root) / DATA_DIR / quote(dataset, safe="")
        self.commit = revision if is_commit(revision) else None   # a branch or tag is resolved on first use
        self._files: list[DataFile] | None = None
        self._footers: dict[str, object] = {}   # path -> FileMetaData of files rows were read from

    def describe(self) -> str:
        return f"dataset {self.dataset!r} split {self.split!r} at revision {self.revision!r}"

    # -- the commit and the file index -----------------------------------------------------------

    def _resolve(self) -> str:
        if self.commit is None:
            try:
                self.commit = self.api.dataset_info(self.dataset, revision=self.revision).sha
            except Exception as e:
                raise HeldoutDataError(f"{self.describe()}: cannot resolve the revision to a commit: "
                                       f"{type(e).__name__}: {e}") from None
        return self.commit

    def _dir(self) -> Path:
        return self.root / self._resolve()

    def files(self) -> list[DataFile]:
        if self._files is None:
            index = self._dir() / f"index-{quote(self.split, safe='')}-{quote(self.text_field, safe='')}.json"
            if index.exists():
                self._files = [DataFile(d["path"], d["rows"], tuple(d["row_groups"]), d["size"])
                               for d in json.loads(index.read_text())["files"]]
            else:
                self._files = self._index()
                _write_atomic(index, json.dumps(dict(dataset=self.dataset, commit=self.commit, split=self.split,
                                                     text_field=self.text_field,
                                                     files=[asdict(f) for f in self._files])).encode())
        return self._files

    def _index(self) -> list[DataFile]:
        from huggingface_hub.hf_api import RepoFile

        commit = self._resolve()
        try:
            tree = [e for e in self.api.list_repo_tree(self.dataset, repo_type="dataset", revision=commit,
                                                       recursive=True) if isinstance(e, RepoFile)]
        except Exception as e:
            raise HeldoutDataError(f"{self.describe()}: cannot list the files of commit {commit}: "
                                   f"{type(e).__name__}: {e}") from None
        sizes = {e.path: int(e.size) for e in tree}
        paths = split_files(list(sizes), self.split)
        if not paths:
            parquet = sorted(p for p in sizes if p.endswith(".parquet"))
            raise HeldoutDataError(f"{self.describe()}: no parquet data files of split {self.split!r} at commit "
                                   f"{commit} ({len(sizes)} files, parquet: {parquet[:5]}{' ...' if len(parquet) > 5 else ''})")
        from concurrent.futures import ThreadPoolExecutor

        # thousands of files on a web corpus: their footers are fetched side by side (order kept by map)
        with ThreadPoolExecutor(FOOTER_WORKERS) as pool:
            return list(pool.map(lambda p: self._footer(p, sizes[p]), paths))

    def _metadata(self, path: str, size: int):
        """A parquet file's footer (pyarrow FileMetaData), read from its end by range requests."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if size < 12:
            raise HeldoutDataError(f"{self.describe()}: data file {path!r} has {size} bytes, not a parquet file")
        tail = self._get(path, max(0, size - FOOTER_PROBE), size)
        if tail[-4:] != b"PAR1":
            raise HeldoutDataError(f"{self.describe()}: data file {path!r} does not end like a parquet file")
        need = int.from_bytes(tail[-8:-4], "little") + 8
        if need > size:
            raise HeldoutDataError(f"{self.describe()}: data file {path!r} has a footer longer than the file")
        if need > len(tail):
            tail = self._get(path, size - need, size)
        try:
            return pq.read_metadata(pa.BufferReader(tail))
        except Exception as e:
            raise HeldoutDataError(f"{self.describe()}: data file {path!r}: unreadable parquet footer: {e}") from None

    def _footer(self, path: str, size: int) -> DataFile:
        md = self._metadata(path, size)
        names = list(md.schema.to_arrow_schema().names)
        if self.text_field not in names:
            raise HeldoutDataError(f"{self.describe()}: data file {path!r} has no text field {self.text_field!r}; "
                                   f"fields present: {sorted(names)}")
        groups = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
        return DataFile(path, md.num_rows, groups, size)

    # -- rows ------------------------------------------------------------------------------------

    def _row_dir(self, f: DataFile) -> Path:
        return self._dir() / "rows" / hashlib.sha256(f"{f.path}\0{self.text_field}".encode()).hexdigest()[:32]

    def read(self, f: DataFile, rows: Sequence[int]) -> dict[int, str]:
        d = self._row_dir(f)
        out, missing = {}, []
        for r in rows:
            p = d / f"{r}.txt"
            if p.exists():
                out[r] = p.read_bytes().decode("utf-8")
            else:
                missing.append(r)
        if missing:
            got = self._read_rows(f, missing)
            for r, text in got.items():
                _write_atomic(d / f"{r}.txt", text.encode("utf-8"))
            out.update(got)
        return out

    def _read_rows(self, f: DataFile, rows: Sequence[int]) -> dict[int, str]:
        import pyarrow.parquet as pq

        starts, s = [], 0
        for g in f.row_groups:
            starts.append(s)
            s += g
        by_group: dict[int, list[int]] = {}
        for r in rows:
            by_group.setdefault(bisect.bisect_right(starts, r) - 1, []).append(r)
        if f.path not in self._footers:   # once per file and source: a round touches at most `documents` files
            self._footers[f.path] = self._metadata(f.path, f.size)
        pf = pq.ParquetFile(_RangeFile(self, f.path, f.size), metadata=self._footers[f.path])
        out = {}
        for g, rs in sorted(by_group.items()):
            column = pf.read_row_group(g, columns=[self.text_field]).column(0)
            for r in rs:
                value = column[r - starts[g]].as_py()
                if not isinstance(value, str):
                    raise HeldoutDataError(f"{self.describe()}: field {self.text_field!r} of row {r} of {f.path!r} "
                                           f"is {type(value).__name__}, not text")
                out[r] = value
        return out

    def _get(self, path: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file of the pinned commit, by an HTTP range request."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.dataset, path, repo_type="dataset", revision=self._resolve(), endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token)
        headers["Range"] = f"bytes={start}-{end - 1}"
        try:
            r = get_session().get(url, headers=headers, timeout=HTTP_TIMEOUT)
            hf_raise_for_status(r)
        except Exception as e:
            raise HeldoutDataError(f"{self.describe()}: reading bytes {start}-{end} of {path!r} failed: "
                                   f"{type(e).__name__}: {e}") from None
        body = r.content
        if r.status_code == 200 and len(body) > end - start:   # a server without ranges sent the whole file
            body = body[start:end]
        if len(body) != end - start:
            raise HeldoutDataError(f"{self.describe()}: asked {path!r} for {end - start} bytes at {start}, "
                                   f"got {len(body)}")
        return body


class _RangeFile:
    """A read-only, seekable file over a Hub file's HTTP range requests: pyarrow reads one row
    group's column chunk through it without the rest of the file."""

    def __init__(self, source: HubSource, path: str, size: int):
        self.source, self.path, self.size, self.pos = source, path, size, 0
        self.closed = False

    def readable(self):
        return True

    def seekable(self):
        return True

    def writable(self):
        return False

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def read(self, n=-1):
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        data = self.source._get(self.path, self.pos, end)
        self.pos = end
        return data

    def close(self):
        self.closed = True


def _write_atomic(path: Path, data: bytes) -> None:
    """Into the shared download cache, made on first use; a concurrent validator never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


__all__ = ["HeldoutDataError", "DataFile", "Draw", "is_commit", "split_files", "draw_rows", "open_source",
           "local_revision", "LocalSource", "HubSource", "LOCAL_SHARD_DOCS"]
