"""What a checkpoint's files must look like, read without torch: strict JSON and safetensors headers.

In eval because both `quasar eval` (a checkpoint's layout, before torch loads) and the validator's
submission checks (neurons.checks, neurons.manifest) read files this way, and neurons composes eval.
Refusals raise `LayoutError` naming the file and the problem; the validator turns it into a
rejection at its own stage.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100 << 20  # safetensors' own loader refuses headers over 100 MB
# safetensors dtype -> bytes per element, for the dtypes a weight may have.
FLOAT_DTYPES = {"F32": 4, "BF16": 2, "F16": 2}
# Non-float tensors (integer buffers such as engram's canonical_ids) must keep the meta model's
# exact dtype; these are the ones we know the width of.
INT_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class LayoutError(ValueError):
    """A file that is not what a checkpoint may hold; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def strict_json_loads(raw: bytes, what: str):
    """Parse untrusted JSON bytes: strict UTF-8, no NaN/Infinity, no repeated keys.

    Repeated keys are refused because two parsers may keep different copies of one (the miner's
    tooling and ours would then disagree about the file). Oversized integers, deep nesting and
    bad encodings all become a LayoutError naming `what`.
    """
    def no_duplicates(pairs):
        counts = Counter(k for k, _ in pairs)  # linear: a 100 MiB header may hold millions of keys
        if len(counts) != len(pairs):
            repeated = sorted(k for k, n in counts.items() if n > 1)
            raise LayoutError(f"{what} repeats the key(s) {repeated[:5]}")
        return dict(pairs)

    def no_constants(token: str):
        raise LayoutError(f"{what} contains the non-JSON number {token}")

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except LayoutError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LayoutError(f"{what} is not valid UTF-8 JSON: {str(e)[:200]}") from None


def read_safetensors_header(path: Path, file_name: str, max_header_bytes: int = MAX_HEADER_BYTES) -> list[TensorInfo]:
    """The tensors a safetensors file declares, after checking its layout; reads only the header.

    Format: 8-byte little-endian header length N, N bytes of JSON, then the data region. Every
    tensor must have an allowed dtype, a shape, and [begin, end) offsets whose length is exactly
    numel * itemsize; together the tensors must tile the data region with no gap, overlap or
    trailing bytes (as safetensors itself requires), so no hidden payload rides along.
    """
    def bad(why: str):
        return LayoutError(f"{file_name}: {why}")

    file_size = path.stat().st_size
    if file_size < 8:
        raise bad(f"file is {file_size} bytes, too short for a safetensors header")
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > max_header_bytes:
            raise bad(f"header length {header_len} is over the {max_header_bytes}-byte cap "
                      "(what this config's tensors need, with slack)")
        if 8 + header_len > file_size:
            raise bad(f"header length {header_len} runs past the end of the {file_size}-byte file (truncated?)")
        raw = f.read(header_len)
    if len(raw) != header_len:
        raise bad("header shorter than its declared length (truncated?)")
    header = strict_json_loads(raw, f"{file_name} header")
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")

    tensors = []
    for name, spec in header.items():
        shown = repr(name[:120])
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {shown} entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in FLOAT_DTYPES and dtype not in INT_DTYPES:
            raise bad(f"tensor {shown} has dtype {str(dtype)[:20]!r}; weights must be one of {sorted(FLOAT_DTYPES)}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {shown} has an invalid shape {str(shape)[:80]}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {shown} has invalid data_offsets {str(offsets)[:80]}")
        nbytes = math.prod(shape) * {**FLOAT_DTYPES, **INT_DTYPES}[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {shown} offsets span {offsets[1] - offsets[0]} bytes, "
                      f"its shape {shape} {dtype} needs {nbytes}")
        tensors.append(TensorInfo(name, file_name, dtype, tuple(shape), offsets[0], offsets[1]))

    data_len = file_size - 8 - header_len
    cursor = 0
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin != cursor:
            what = "overlaps the previous tensor" if t.begin < cursor else f"leaves a gap at byte {cursor}"
            raise bad(f"tensor {t.name[:120]!r} {what} (data offsets must tile the data region)")
        cursor = t.end
    if cursor != data_len:
        if cursor > data_len:
            raise bad(f"tensors need {cursor} data bytes but the file has {data_len} (truncated?)")
        raise bad(f"{data_len - cursor} trailing bytes after the last tensor")
    return tensors


def check_checkpoint_files(checkpoint) -> None:
    """ValueError naming what makes `checkpoint` unreadable, found without torch: not a directory, no
    or unparsable config.json, no *.safetensors, a weights file whose header or length is broken
    (truncated). Only layout: the evaluation itself checks the contents."""
    d, shown = Path(checkpoint), repr(str(checkpoint))
    if not d.is_dir():
        raise ValueError(f"checkpoint {shown}: {'no such directory' if not d.exists() else 'not a directory'}")
    config = d / "config.json"
    if not config.is_file():
        raise ValueError(f"checkpoint {shown}: no config.json (is this a checkpoint directory?)")
    try:
        raw = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {shown}: config.json is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ValueError(f"checkpoint {shown}: config.json has no model_type (is this a checkpoint directory?)")
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"checkpoint {shown}: no *.safetensors weights (model.safetensors is missing)")
    for w in weights:
        try:
            read_safetensors_header(w, w.name)
        except LayoutError as e:
            raise ValueError(f"checkpoint {shown}: {e}") from None
