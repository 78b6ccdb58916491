"""The local real-text corpus: what this project trains and evaluates on when nothing can be downloaded.

Every CPython ships the language reference as prose in `pydoc_data.topics` (about 460 KB of
English with code examples). It is real text written by people, present on every machine that
runs this project, and needs no network: localnet, the tests and the tiny teacher all use it.
On the real network the competition file names a Hub dataset instead.

Documents are paragraphs grouped up to about `DOC_CHARS` characters, in a fixed order; the
held-out split is chosen by a hash of each document's text, so it does not move when documents
are added or reordered, and no document is ever in both splits.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from quasar_model.atomic import write_atomic

DOC_CHARS = 1500
HELDOUT_PERCENT = 10


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def local_documents() -> list[str]:
    """All documents of the local corpus, in a fixed order (topic name, then position)."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        current = ""
        for para in _paragraphs(topics[name]):
            if current and len(current) + len(para) > DOC_CHARS:
                docs.append(current)
                current = ""
            current = f"{current}\n\n{para}" if current else para
        if current:
            docs.append(current)
    return docs


def _is_heldout(text: str) -> bool:
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def local_split(split: str) -> list[str]:
    """`train` or `heldout` documents of the local corpus."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'heldout'")
    want = split == "heldout"
    return [d for d in local_documents() if _is_heldout(d) == want]


def fingerprint(docs: list[str]) -> str:
    """sha256 over the documents in order: names exactly the text a cache or model was built from."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode()
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def write_jsonl(path: str | os.PathLike, docs: list[str]) -> Path:
    """One `{"text": ...}` per line: the format `datasets.load_dataset("json", ...)` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
