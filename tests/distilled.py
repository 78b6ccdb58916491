"""Tiny students distilled from the tiny teacher in a few CPU-seconds, for tests that need trained models.

Full-vocabulary forward KL against the live teacher on random windows of the local corpus's train
split, AdamW, linear warmup then cosine to a tenth: bad students, but students, and a fine-tuned
copy of one is exactly what a copier would make.
"""
import math

import torch
import torch.nn.functional as F


def train_stream(tokenizer) -> torch.Tensor:
    """The corpus train split as one token stream, documents separated by EOS (a HF tokenizer)."""
    from quasar_model.corpus import local_split

    eos = tokenizer.eos_token_id
    return torch.tensor([t for d in local_split("train") for t in tokenizer.encode(d, add_special_tokens=False) + [eos]])


def distill(model, teacher, stream: torch.Tensor, steps: int, lr: float, seed: int, warmup: int = 10,
            batch: int = 8, length: int = 64):
    """`model` trained in place for `steps` steps; returned in eval mode."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        starts = torch.randint(0, len(stream) - length, (batch,), generator=g).tolist()
        ids = torch.stack([stream[s:s + length] for s in starts])                    # [B, T]
        with torch.no_grad():
            lt = F.log_softmax(teacher(ids).logits, -1).flatten(0, 1)               # [B*T, V]
        ls = F.log_softmax(model(ids, use_cache=False).logits, -1).flatten(0, 1)
        loss = F.kl_div(ls, lt, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()
