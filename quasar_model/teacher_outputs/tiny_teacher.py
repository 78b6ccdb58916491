"""A tiny teacher the project trains itself: a byte-level BPE tokenizer and a small Qwen3 LM.

Localnet, the tests and the CPU benchmarks need a teacher that knows something (distilling
random weights teaches nothing measurable) but nothing can be downloaded. So a ~1 M parameter
`Qwen3ForCausalLM` is trained for about a CPU-minute on the local corpus's train split. It is a
plain Hugging Face checkpoint: every teacher code path (loading by path, capture, cache) runs on
it exactly as on a real Qwen.

The result is cached under `$QUASAR_CACHE` (default `~/.cache/quasar`) in a directory named by a
hash of the recipe and the corpus, written atomically so concurrent callers never see half a
checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

from quasar_model import corpus
from quasar_model.paths import cache_root
from quasar_model.progress import progress_bar

# The teacher's one name: competitions' teacher and tokenizer ids, distill configs' teacher.model,
# `--teacher`. (The student preset "tiny" is another thing: a QuasarLongConfig size.)
TINY_TEACHER = "tiny-teacher"
# what configs and commands said before; still read, with a warning naming TINY_TEACHER
DEPRECATED_NAME = "tiny"
EOS = "<|endoftext|>"

RECIPE = dict(
    vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, intermediate_size=384,
    seq_len=128, batch_size=8, steps=700, lr=3e-3, warmup=30, weight_decay=0.01, seed=0,
)


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE: any text round-trips, like Qwen's and GLM's tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def recipe_id(recipe: dict = RECIPE) -> str:
    blob = json.dumps({"recipe": recipe, "corpus": corpus.fingerprint(corpus.local_split("train"))},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _token_stream(tokenizer, docs: list[str]):
    import torch

    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer.encode(d, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def train_teacher(out_dir: str | os.PathLike, recipe: dict = RECIPE, progress: bool = True) -> Path:
    """Train tokenizer and model from scratch into `out_dir` (a Hugging Face checkpoint)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    r = dict(recipe)
    docs = corpus.local_split("train")
    tokenizer = train_tokenizer(docs, r["vocab_size"])
    stream = _token_stream(tokenizer, docs)

    torch.manual_seed(r["seed"])
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=r["hidden_size"], num_hidden_layers=r["num_hidden_layers"],
        num_attention_heads=r["num_attention_heads"], num_key_value_heads=r["num_key_value_heads"],
        head_dim=r["head_dim"], intermediate_size=r["intermediate_size"], max_position_embeddings=4096,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"], betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(r["seed"])
    T, B, steps = r["seq_len"], r["batch_size"], r["steps"]

    def lr_at(step):
        if step < r["warmup"]:
            return r["lr"] * (step + 1) / r["warmup"]
        t = (step - r["warmup"]) / max(1, steps - r["warmup"])
        return r["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    bar = progress_bar(range(steps), desc="tiny teacher", enabled=progress, leave=False)
    for step in bar:
        starts = torch.randint(0, len(stream) - T - 1, (B,), generator=gen)
        batch = torch.stack([stream[s:s + T + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = _next_token_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "recipe.json").write_text(json.dumps({"recipe": r, "final_loss": loss.item()}, indent=1))
    return out_dir


def _next_token_loss(model, batch):
    import torch.nn.functional as F

    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def tiny_teacher(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The cached tiny teacher's directory, training it first if this machine has none yet."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / f"tiny-teacher-{recipe_id()}"
    if (final / "recipe.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-teacher-", dir=root))
    try:
        train_teacher(tmp, progress=progress)
        try:
            os.rename(tmp, final)  # atomic; loses the race harmlessly if another process won it
        except OSError:
            if not (final / "recipe.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_teacher(name: str, progress: bool = True) -> str:
    """A teacher as named on the command line or in a config -> what `load_teacher` takes.

    TINY_TEACHER is the project's own teacher (trained here on first use); anything else passes through.
    """
    if name == DEPRECATED_NAME:
        logging.getLogger("quasar_model").warning(
            f"teacher {DEPRECATED_NAME!r} is deprecated; name it {TINY_TEACHER!r}")
        name = TINY_TEACHER
    return str(tiny_teacher(progress=progress)) if name == TINY_TEACHER else name
