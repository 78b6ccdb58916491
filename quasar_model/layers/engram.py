"""Engram: conditional n-gram memory.

For each order n and head, the last n canonical token ids are hashed (XOR of id * odd multiplier,
mod a prime distinct per table) into an embedding table; the lookups concatenate to e. A scalar
gate sigma(signed_sqrt(<RMSNorm(h), RMSNorm(W_K e)> / sqrt(D))) decides how much of W_V e to add,
then a short depthwise causal conv; the layer adds engram_residual_scale * y to h.

A lag reaching before the current document (position id < lag) hashes a sentinel id instead, so
packed documents and left padding never read each other's tokens.
"""
from __future__ import annotations

import math
import random

import torch
from torch import nn
from transformers import initialization as init

from .norm import RMSNorm


def primes_from(start: int, count: int) -> list[int]:
    out, n = [], max(start, 2)
    while len(out) < count:
        if all(n % p for p in range(2, int(math.isqrt(n)) + 1)):
            out.append(n)
        n += 1
    return out


def signed_sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.sqrt(x.abs() + 1e-6)


class Engram(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.orders, self.n_heads = list(config.engram_ngram_orders), config.engram_num_heads
        self.max_lag = max(self.orders) - 1
        self.sentinel = config.vocab_size
        self.residual_scale, self.kernel = config.engram_residual_scale, config.engram_conv_kernel
        self.n_tables, self.layer_idx = len(self.orders) * self.n_heads, layer_idx
        primes, offsets, mult = self._hash_constants(config.engram_slots)
        # One embedding holds every table; each table is an offset range of `prime` rows.
        # The constants are a pure function of the config, so they are rebuilt, never saved.
        for name, value in zip(("primes", "offsets", "multipliers"), (primes, offsets, mult)):
            self.register_buffer(name, torch.tensor(value), persistent=False)
        # The canonical map is data (a miner may fold case/whitespace variants together), so it is saved.
        self.register_buffer("canonical_ids", torch.arange(config.vocab_size + 1), persistent=True)
        self.slots = config.engram_slots
        self.table = nn.Embedding(int(sum(primes)), config.engram_dim // self.n_heads)
        e_dim = len(self.orders) * config.engram_dim
        self.key_proj = nn.Linear(e_dim, config.hidden_size, bias=False)
        self.value_proj = nn.Linear(e_dim, config.hidden_size, bias=False)
        self.h_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.conv_weight = nn.Parameter(torch.empty(config.hidden_size, self.kernel))

    def _hash_constants(self, slots: int):
        # plain Python values: under from_pretrained's meta-device construction tensors hold no data
        primes = primes_from(max(slots // self.n_tables, 2), self.n_tables)
        offsets = [sum(primes[:i]) for i in range(self.n_tables)]
        rng = random.Random(0x5EED + self.layer_idx)
        mult = [[rng.randrange(1, 2**31 - 1) | 1 for _ in range(self.max_lag + 1)] for _ in range(self.n_tables)]
        return primes, offsets, mult

    def reset_parameters(self):
        for buf, value in zip((self.primes, self.offsets, self.multipliers), self._hash_constants(self.slots)):
            init.copy_(buf, torch.tensor(value, device=buf.device))
        init.copy_(self.canonical_ids, torch.arange(self.canonical_ids.numel(), device=self.canonical_ids.device))
        init.normal_(self.conv_weight, std=0.02)

    def hash_ids(self, ids: torch.Tensor, prev_ids: torch.Tensor | None, position_ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> row indices into `table`, [B, T, n_tables]."""
        B, T = ids.shape
        if prev_ids is None or prev_ids.shape[1] < self.max_lag:  # too little history: pad with the sentinel
            have = 0 if prev_ids is None else prev_ids.shape[1]
            pad = ids.new_full((B, self.max_lag - have), self.sentinel)
            prev_ids = pad if prev_ids is None else torch.cat([pad, prev_ids], dim=1)
        prev_ids = prev_ids[:, prev_ids.shape[1] - self.max_lag:]
        ext = self.canonical_ids[torch.cat([prev_ids, ids], dim=1)]  # [B, max_lag + T]
        rows = []
        for n in self.orders:
            for h in range(self.n_heads):
                t = len(rows)
                acc = torch.zeros_like(ids)
                for lag in range(n):
                    tok = ext[:, self.max_lag - lag: self.max_lag - lag + T]
                    tok = torch.where(position_ids >= lag, tok, self.sentinel)
                    acc = acc ^ (tok * self.multipliers[t, lag])
                rows.append(acc.remainder(self.primes[t]) + self.offsets[t])
        return torch.stack(rows, dim=-1)

    def forward(self, h, ids, prev_ids, position_ids, state: dict | None = None):
        B, T, D = h.shape
        e = self.table(self.hash_ids(ids, prev_ids, position_ids)).flatten(2).to(h.dtype)  # [B, T, e_dim]
        score = (self.h_norm(h) * self.k_norm(self.key_proj(e))).sum(-1, keepdim=True) / math.sqrt(D)
        y = torch.sigmoid(signed_sqrt(score.float())).to(h.dtype) * self.value_proj(e)
        # Depthwise causal conv over the last `kernel` gated values, not crossing a document start.
        past = state.get("conv") if state is not None else None
        if past is None:
            past = y.new_zeros(B, self.kernel - 1, D)
        ext = torch.cat([past, y], dim=1)
        conv = torch.zeros_like(y)
        for j in range(self.kernel):
            valid = (position_ids >= j)[..., None].to(y.dtype)
            conv = conv + ext[:, self.kernel - 1 - j: self.kernel - 1 - j + T] * self.conv_weight[:, j] * valid
        if state is not None:
            state["conv"] = ext[:, -(self.kernel - 1):] if self.kernel > 1 else past
        return self.residual_scale * (y + conv)
