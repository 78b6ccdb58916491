"""The student and its KD loss as one module (what DDP/FSDP wrap), and the held-out KL measured with it.

Wrapped state dicts key the student's weights under `student.`; exports and checkpoints hold the
student's own keys (`student_state_dict` / `engine_state_dict` convert).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel
from .data import PackedBatch, iterate_once
from .losses import IGNORE_INDEX, chunked_kd_loss, hidden_mse

PREFIX = "student."     # where KDStudent keeps the student: its state-dict keys start with this


class KDStudent(nn.Module):
    """Student forward on packed rows and the sparse KD loss against the cached teacher.

    Returns the mean loss over the batch's target positions. Wrapping the loss inside the module
    means the LM head is used inside the wrapped forward, which FSDP needs (it gathers the root's
    parameters for the duration of its forward and backward).

    With hidden_targets (the live teacher's outputs of the layers paired with `hidden_layers`),
    the loss adds hidden_mse_weight * the mean over pairs of the teacher-normalised MSE between
    the student's and the teacher's layer outputs, over the same target positions; the last value
    is kept in `last_hidden_mse` for logging.
    """

    def __init__(self, student: nn.Module, *, kind="fkl", beta=0.5, temperature=1.0, ce_weight=0.0,
                 kd_t2_scale=False, chunk_size=1024, hidden_layers=(), hidden_mse_weight=0.0):
        super().__init__()
        self.student = student
        self.kind, self.beta, self.temperature = kind, beta, temperature
        self.ce_weight, self.kd_t2_scale, self.chunk_size = ce_weight, kd_t2_scale, chunk_size
        self.hidden_layers, self.hidden_mse_weight = list(hidden_layers), hidden_mse_weight
        self.last_hidden_mse: torch.Tensor | None = None

    def forward(self, input_ids, position_ids, topk_ids, topk_logprobs, tail, mask, labels,
                kind: str | None = None, ce_weight: float | None = None, hidden_targets=None,
                recall_ids=None, recall_position_ids=None, recall_labels=None):
        """With recall_* (curriculum rows, distill/recall_curriculum.py), one forward runs both sets of
        rows and it returns (KD loss, summed CE over the recall answer tokens)."""
        if recall_ids is not None:
            n = input_ids.shape[0]
            input_ids = torch.cat([input_ids, recall_ids])
            position_ids = torch.cat([position_ids, recall_position_ids])
        kind = self.kind if kind is None else kind
        ce_weight = self.ce_weight if ce_weight is None else ce_weight
        # position ids restart per packed segment: block-diagonal attention, branch states reset
        out = self.student.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                 output_hidden_states=hidden_targets is not None)
        h = out.last_hidden_state                                                        # [B, L, D]
        recall_sum = None
        if recall_ids is not None:
            h, h_rec = h[:n], h[n:]
            recall_sum = self._answer_ce_sum(h_rec, recall_labels)
        mse = None
        if hidden_targets is not None:
            # hidden_states[i + 1] is layer i's output (the last one normed, as the teacher's is); the
            # targets cover the cache rows only (recall rows, after them, have no teacher)
            mse = torch.stack([hidden_mse(out.hidden_states[i + 1][:len(t)], t, mask=mask, normalize=True)
                               for i, t in zip(self.hidden_layers, hidden_targets, strict=True)]).mean()
            self.last_hidden_mse = mse.detach()
        w = self.student.lm_head.weight                                                  # [V, D]
        dev = h.device.type
        if torch.is_autocast_enabled(dev):
            # the sparse loss runs its own LM-head matmuls: give it the autocast dtype explicitly
            dt = torch.get_autocast_dtype(dev)
            h, w = h.to(dt), w.to(dt)
        else:
            w = w.to(h.dtype)
        loss = chunked_kd_loss(h, w, topk_ids, topk_logprobs, mask=mask,
                               labels=labels if ce_weight > 0 else None, kind=kind, beta=self.beta,
                               temperature=self.temperature, ce_weight=ce_weight, chunk_size=self.chunk_size,
                               tail=tail, kd_t2_scale=self.kd_t2_scale)
        loss = loss if mse is None else loss + self.hidden_mse_weight * mse
        return loss if recall_sum is None else (loss, recall_sum)

    def _answer_ce_sum(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token CE at the labelled (answer) positions only: a few per document, so their
        logits are computed for those rows alone, never [B, L, V]."""
        keep = labels != IGNORE_INDEX
        hs = h[keep]                                                                     # [N, D]
        logits = hs @ self.student.lm_head.weight.to(hs.dtype).T                         # [N, V]
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum")


def batch_loss(model: nn.Module, b: PackedBatch, **kw):
    """model (a KDStudent, or one wrapped by DDP/FSDP) on a packed batch: its loss (or (loss, recall CE sum))."""
    return model(b.input_ids, b.position_ids, b.topk_ids, b.topk_logprobs, b.tail, b.mask, b.labels, **kw)


@torch.no_grad()
def heldout_kl(model: nn.Module, cache, *, seq_len: int, batch_size: int = 8, temperature: float | None = None,
               max_sequences: int | None = None, env: parallel.DistEnv | None = None,
               autocast_dtype: torch.dtype | None = None) -> float:
    """Mean forward KL(teacher || student) per position over a teacher cache, on the k+1 buckets.

    model: a QuasarLongForCausalLM, or a (wrapped) KDStudent. Every rank evaluates its share of
    the rows and the sums are all-reduced, so the value does not depend on the number of ranks.
    """
    env = env or parallel.DistEnv(device=next(model.parameters()).device)
    if not isinstance(model, (KDStudent, nn.parallel.DistributedDataParallel)):
        model = KDStudent(model, temperature=temperature or cache.meta.temperature)
    was_training = model.training
    model.eval()      # eval: MoE layers do not count these tokens as load
    total, count = 0.0, 0.0
    try:
        for b in iterate_once(cache, seq_len, batch_size, rank=env.rank, world_size=env.world_size,
                              max_sequences=max_sequences):
            b = b.to(env.device)
            with torch.autocast(env.device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                kl = batch_loss(model, b, kind="fkl", ce_weight=0.0)
            total += float(kl) * b.n_tokens
            count += b.n_tokens
    finally:
        model.train(was_training)
    total, count = env.all_reduce_sum(total), env.all_reduce_sum(count)
    return float(total / count.clamp(min=1))


def student_state_dict(engine_sd: dict) -> dict:
    """A KDStudent's state dict -> the student's own (what save_pretrained and checkpoints hold)."""
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in engine_sd.items()}


def engine_state_dict(student_sd: dict) -> dict:
    """The inverse of student_state_dict."""
    return {f"{PREFIX}{k}": v for k, v in student_sd.items()}
