"""Structural distillation (stage 1 of the Quasar-10B recipe): hidden-state MSE against a live teacher.

A student built from the teacher's own weights (quasar_model.conversion, the `init-student`
command) trains layer by layer against the teacher's outputs, plus CE/KD: `layer_map` pairs the
student's layers with the teacher's, and `LiveTeacher` runs the teacher beside the student.
"""
from __future__ import annotations

import torch
from torch import nn


def layer_map(n_student: int, n_teacher: int, pairs: list | None = None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs whose outputs the hidden-state MSE matches.

    Default: every layer to itself when the depths agree, else student layer i to teacher layer
    round((i + 1) * n_teacher / n_student) - 1 (the last layers always meet).
    """
    if pairs is None:
        return [(i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]
    out = []
    for p in pairs:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p)):
            raise ValueError(f"teacher.layers: each entry must be a [student_layer, teacher_layer] pair, got {p!r}")
        s, t = p
        if not 0 <= s < n_student:
            raise ValueError(f"teacher.layers: student layer {s} out of range [0, {n_student})")
        if not 0 <= t < n_teacher:
            raise ValueError(f"teacher.layers: teacher layer {t} out of range [0, {n_teacher})")
        out.append((s, t))
    if not out:
        raise ValueError("teacher.layers: empty; leave it unset for the default map")
    return out


# -----------------------------------------------------------------------------
# the live teacher of hidden-state MSE

class LiveTeacher:
    """A frozen teacher run beside the student: its outputs of the layers paired with the student's.

    Runs only the decoder (no LM head: the top-k targets come from the teacher cache). Packed rows
    (position ids restarting per document) get Hugging Face's block-diagonal packed-sequence mask.
    Every rank holds a whole replica (FSDP shards the student only): a teacher that does not fit
    beside the student on one GPU cannot be the live teacher; distill from its cache with KD alone.
    """

    def __init__(self, model: nn.Module, pairs: list[tuple[int, int]]):
        self.model, self.pairs = model, pairs
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.pairs]

    @torch.no_grad()
    def hidden_targets(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
        # input_ids, position_ids [B, L] -> one [B, L, D] per pair (hidden_states[i + 1] = layer i's output)
        # use_cache=False matters: Hugging Face builds the packed-sequence mask only without a cache
        hs = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                          output_hidden_states=True).hidden_states
        return [hs[t + 1] for _, t in self.pairs]


def load_live_teacher(tcfg, meta, student_config, device) -> LiveTeacher:
    """The config's teacher section -> a LiveTeacher, checked against the cache and the student.

    tcfg: distill.config.TeacherSection; meta: the training cache's TeacherCacheMeta.
    """
    import warnings

    from quasar_model.teacher_outputs.capture import load_teacher
    from quasar_model.teacher_outputs.tiny_teacher import resolve_teacher
    from quasar_model.tokenization import tokenizer_fingerprint

    name = resolve_teacher(tcfg.model)
    model, tok = load_teacher(name, revision=tcfg.revision, dtype=tcfg.dtype, device=str(device))
    fp = tokenizer_fingerprint(tok)
    if fp != meta.tokenizer_fingerprint:
        raise ValueError(f"teacher.model {tcfg.model!r} has tokenizer fingerprint {fp[:12]}, the training cache "
                         f"{meta.tokenizer_fingerprint[:12]}: hidden states and KD targets must come from the "
                         "same tokenisation")
    if name != meta.teacher_id and tcfg.model != meta.teacher_id:
        warnings.warn(f"teacher.model {tcfg.model!r} is not the cache's teacher {meta.teacher_id!r}: the "
                      "hidden-state targets and the top-k targets come from different models", stacklevel=2)
    if model.config.hidden_size != student_config.hidden_size:
        raise ValueError(f"teacher hidden_size={model.config.hidden_size} but the student's is "
                         f"{student_config.hidden_size}: hidden-state MSE compares the residual streams "
                         "directly (build the student with `quasar init-student`)")
    pairs = layer_map(student_config.num_hidden_layers, model.config.num_hidden_layers, tcfg.layers)
    return LiveTeacher(model, pairs)
