"""The smallest student that learns recall from the curriculum alone, and its training loop.

Used where a from-scratch recall run must be cheap: the CI test that a curriculum-trained student
scores on the validator's recall items (tests/test_recall_learned.py) and
benchmarks/bench_recall_curriculum.py --student recall. Choices that made copying learnable in a few
hundred single-thread CPU steps (3 layers, width 64, 16 rows of 192 tokens; answer CE of the curriculum;
2 layers also learn, a little later and less steadily on the fixed forms):

- tied embeddings: copying a token is then close to an identity map through attention (a small
  effect on its own: induction on random tokens was still near chance after 300 steps either way,
  CE 6.76 tied vs 6.92 untied; not ablated in the full setup);
- no q/k norm and a larger init (0.08) (with q/k norm on it learned about as fast);
- RoPE everywhere, attention only, no MoE, no loops, and an engram layer at layer 0 (hashed bigrams
  and trigrams behind a short causal conv): it hands attention the previous tokens, which copying a
  digit string needs (one digit of context is ambiguous), so layer 0 need not first learn a
  previous-token head. It is what makes the difference: without it the same 500 steps left the
  validator's passkeys at exact match 0 and answer-token accuracy 0.35 (with it: 0.9-1.0);
- a constant learning rate (1e-2) after a 50-step warmup: the copy circuit appears abruptly around
  step 250-300, and with a cosine decay over 300 steps it had not yet appeared.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from quasar_model import QuasarLongConfig

from .recall_curriculum import DocMaker, curriculum_length, recall_batch

# passkey and copy practice, induction on random tokens and on digit strings (digit_share)
RECALL_STUDENT_FAMILIES = ("passkey", "passkey", "passkey", "copy", "induction", "induction")


def recall_student_config(vocab_size: int, *, hidden: int = 64, layers: int = 3, heads: int = 4,
                          **overrides) -> QuasarLongConfig:
    """The student above; `overrides` replace any of its fields (benchmarks/bench_recall_arch.py's variants)."""
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=hidden // heads, intermediate_size=2 * hidden, num_experts=0,
        first_k_dense_replace=layers, hybrid_attention_layers=[], use_nope=False, long_context_mode="rope",
        partial_rotary_factor=1.0, num_loops=1, use_looped_injection=False, use_qk_norm=False,
        initializer_range=0.08, tie_word_embeddings=True, engram_layers=[0], engram_dim=hidden,
        engram_num_heads=2, engram_slots=2053, engram_ngram_orders=[2, 3], engram_residual_scale=1.0)
    return QuasarLongConfig.preset("tiny", **{**fields, **overrides})


def train_recall(model, maker: DocMaker, *, steps: int, rows: int = 16, seq_len: int = 192, min_len: int = 64,
                 ramp: float = 0.3, lr: float = 1e-2, warmup: int = 50, decay: str = "constant", seed: int = 0,
                 device="cpu", after_step=None) -> None:
    """AdamW on the answer-span CE of curriculum rows (recall_batch of (seed, step)): linear warmup,
    then constant (decay "constant") or a cosine to a tenth ("cosine"); document length grows from
    min_len to seq_len over the first `ramp` of the steps. after_step(step, loss) after each step."""
    if decay not in ("constant", "cosine"):
        raise ValueError(f"decay {decay!r}: choose constant or cosine")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * \
                (1.0 if decay == "constant" else 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        b = recall_batch(maker, rows=rows, seq_len=seq_len, seed=seed, step=step,
                         length=curriculum_length(step, steps, min_len, seq_len, ramp))
        logits = model(input_ids=b["input_ids"].to(device), position_ids=b["position_ids"].to(device),
                       use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].to(device).flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if after_step is not None:
            after_step(step + 1, loss.item())
    model.eval()


__all__ = ["RECALL_STUDENT_FAMILIES", "recall_student_config", "train_recall"]
