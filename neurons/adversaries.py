"""Checkpoints an adversarial miner publishes (localnet's attackers; spec "Adversaries every scoring
change must be tested against"). Each maker writes a checkpoint directory (weights, config,
tokenizer files; no manifest: publishing writes it) and returns it; validators must give each 0.

    copy          the victim's published checkpoint, byte for byte        -> gate exact_copy
    near-copy     the victim's checkpoint fine-tuned a few steps on the corpus (a new hash, the same
                  function)                                                -> gate functional_copy
    crash         the victim's checkpoint with an lm_head of +-3e38: finite, so it passes every fetch
                  check, but its logits overflow (issue 11, class-1 attack b) -> rejected at evaluate
    teacher       the competition's teacher, structurally initialised into a Quasar-Long student
                  without --replace (`quasar init-student`): it computes the teacher's function
                                                                          -> refused at fetch by the
                  active-parameter ratio (student.max_active_params_vs_teacher), else gate teacher

`needs_victim` names the makers that start from another miner's published checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from eval.competition import Competition
from quasar_model.corpus import local_split

# The makers import torch, transformers and the model themselves: the miner imports this module,
# and `quasar --help` the miner, so none of that may load before an adversary runs.

HUGE = 3e38          # finite in float32 (max 3.4e38); any product of two of them overflows
NEAR_COPY_STEPS = 5  # the README's "fine-tuned 5 steps" copies: 0.988-0.994 similar to their source
NEAR_COPY_LR = 1e-3


def _fresh(src: Path, dst: Path) -> Path:
    """`dst` as a copy of the checkpoint `src` without its manifest (a copier's files, its own manifest)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("manifest.json"))
    return dst


def exact_copy(victim: Path, dst: Path, competition: Competition | None = None) -> Path:
    return _fresh(victim, dst)


def near_copy(victim: Path, dst: Path, competition: Competition | None = None, *, steps: int = NEAR_COPY_STEPS,
              lr: float = NEAR_COPY_LR, seed: int = 0, batch: int = 4, length: int = 64) -> Path:
    """The victim fine-tuned `steps` AdamW steps of next-token CE on random windows of the local
    corpus's train split, with the victim's own tokenizer: enough to change every weight (and the
    hash), far too little to change what the model computes."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from quasar_model import QuasarLongForCausalLM

    tok = AutoTokenizer.from_pretrained(victim)
    model = QuasarLongForCausalLM.from_pretrained(victim, dtype=torch.float32).train()
    eos = tok.eos_token_id
    stream = torch.tensor([t for d in local_split("train") for t in tok.encode(d, add_special_tokens=False) + [eos]])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - length - 1, (batch,), generator=g).tolist()
        ids = torch.stack([stream[s:s + length + 1] for s in starts])
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _fresh(victim, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    model.eval().save_pretrained(dst)
    return dst


def crash(victim: Path, dst: Path, competition: Competition | None = None, *, seed: int = 0) -> Path:
    """The victim with its output projection (the tied embedding when there is no lm_head) set to
    +-HUGE at random: every weight finite, every logit inf - inf = NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    _fresh(victim, dst)
    (weights,) = sorted(dst.glob("*.safetensors"))  # save_pretrained writes one file for a localnet student
    tensors = load_file(weights)
    key = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    g = torch.Generator().manual_seed(seed)
    w = tensors[key]
    tensors[key] = torch.where(torch.rand(w.shape, generator=g) < 0.5, -HUGE, HUGE).to(w.dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst


def teacher(victim: Path | None, dst: Path, competition: Competition) -> Path:
    """`quasar init-student --teacher T` without --replace: a Quasar-Long checkpoint holding the
    competition's teacher's weights, computing its function (the branches start switched off)."""
    import torch

    from quasar_model.conversion import init_student
    from eval.evaluate import teacher_location
    from quasar_model.teacher_outputs.capture import load_teacher

    location, revision = teacher_location(competition)
    model, tok = load_teacher(location, revision=revision, dtype="float32")
    torch.manual_seed(0)
    student = init_student(model).eval()
    if dst.exists():
        shutil.rmtree(dst)
    student.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


MAKERS = {"copy": exact_copy, "near-copy": near_copy, "crash": crash, "teacher": teacher}
needs_victim = {"copy", "near-copy", "crash"}
