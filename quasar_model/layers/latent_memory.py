"""Persistent latent memory (Quasar 3B): a slot bank written once per 64-token segment.

Hidden states -> RMSNorm -> project to z; each completed segment is pooled to one vector by a
learned query; a saliency gate (max over the segment of sigmoid(W h), bias -5) scales the write;
A = softmax(z M^T / sqrt(m)), M <- decay * M + A^T (z * saliency). Tokens read the memory as it
stood when their segment began, softmax(q M^T / sqrt(m)) M, through a gate whose bias starts at
-10, so a fresh memory is silent. A partial segment waits in the cache until it completes, which
is what keeps decoding equal to the full forward.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init

from .norm import RMSNorm


class LatentMemory(nn.Module):
    def __init__(self, config):
        super().__init__()
        m, hidden = config.latent_memory_dim, config.hidden_size
        self.dim, self.segment, self.decay = m, config.latent_memory_segment, config.latent_memory_decay
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.write_proj = nn.Linear(hidden, m, bias=False)
        self.pool_query = nn.Parameter(torch.empty(m))
        self.saliency = nn.Linear(hidden, 1, bias=True)
        self.memory_init = nn.Parameter(torch.empty(config.latent_memory_slots, m))
        self.read_proj = nn.Linear(hidden, m, bias=False)
        self.out_proj = nn.Linear(m, hidden, bias=False)
        self.gate = nn.Linear(hidden, 1, bias=True)
        self.reset_parameters()

    def reset_parameters(self):
        init.normal_(self.pool_query, std=0.02)
        init.normal_(self.memory_init, std=0.02)
        init.constant_(self.saliency.bias, -5.0)
        init.constant_(self.gate.bias, -10.0)

    def _write(self, M, z, sal):
        # M [B, S, m]; z [B, L, m] one full segment; sal [B, L]
        w = torch.softmax(z @ self.pool_query / math.sqrt(self.dim), dim=-1)  # [B, L]
        pooled = (w[..., None] * z).sum(1)  # [B, m]
        strength = sal.max(dim=1).values[:, None]  # [B, 1]
        A = torch.softmax(torch.einsum("bm,bsm->bs", pooled, M) / math.sqrt(self.dim), dim=-1)
        return self.decay * M + A[..., None] * (pooled * strength)[:, None, :]

    def forward(self, x, state: dict | None = None):
        # x [B, T, hidden] (the mixer input) -> read [B, T, hidden]
        B, T, _ = x.shape
        xn = self.norm(x)
        z, sal = self.write_proj(xn).float(), torch.sigmoid(self.saliency(x).float())[..., 0]
        q = self.read_proj(xn).float()
        M = state.get("M") if state is not None else None
        if M is None:
            M = self.memory_init.float().expand(B, -1, -1)
            buf_z, buf_s = z.new_zeros(B, 0, self.dim), z.new_zeros(B, 0)
        else:
            buf_z, buf_s = state["buf_z"], state["buf_s"]
        Z, S = torch.cat([buf_z, z], 1), torch.cat([buf_s, sal], 1)
        p = buf_z.shape[1]
        reads = []
        for start in range(0, p + T, self.segment):
            end = min(start + self.segment, p + T)
            lo, hi = max(start, p) - p, end - p  # this segment's share of the new tokens
            if hi > lo:
                att = torch.softmax(q[:, lo:hi] @ M.transpose(1, 2) / math.sqrt(self.dim), dim=-1)
                reads.append(att @ M)
            if end - start == self.segment:
                M = self._write(M, Z[:, start:end], S[:, start:end])
        done = ((p + T) // self.segment) * self.segment
        if state is not None:
            state["M"], state["buf_z"], state["buf_s"] = M, Z[:, done:], S[:, done:]
        read = self.out_proj(torch.cat(reads, 1).to(x.dtype))
        return torch.sigmoid(self.gate(x)) * read
