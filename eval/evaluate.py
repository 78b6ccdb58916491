"""Score one checkpoint exactly as a validator does: held-out KL/CE, recall, fingerprint, continuations.

    competition + seed --prepare_round--> RoundInputs (tokenizer, held-out set + teacher cache,
                                          recall items, fingerprint probes): built once per round
    RoundInputs + model --score_model---> SubmissionResult (per-item values, fingerprint, continuations)

`evaluate_checkpoint` does both for one model. A validator scoring many submissions in a round
prepares once and calls `score_model` per submission, so every submission sees the same items.

Items and their ids (eval.results): "heldout/<i>" on axes kl and ce (the i-th sampled document;
its ce item carries the teacher's CE when known), "recall/<family>/L<len>/d<depth>/i<n>" on recall.
Gates are not applied here: the result holds what they read (fingerprint, continuations), and the
scoring rule decides. The continuations are greedy outputs from prefixes of the round's held-out
documents: natural text, fresh every round, so a model cannot be tuned to look sane on fixed prompts.

"tiny-teacher" in a competition's teacher or tokenizer id means quasar_model.teacher_outputs.tiny_teacher (trained on
this machine on first use); any other id is a Hugging Face repo or a local checkpoint directory.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# the shape of the fingerprint probes and continuations lives with the token plan (eval.budget)
from eval.budget import CONT_PROMPT, CONT_TOKENS, CONTINUATIONS, PROBE_LEN
from eval.competition import Competition, load_competition
from eval.gates import fingerprint_ids, fingerprint_probes, fingerprint_similarity, logit_fingerprint, without_teacher
from eval.heldout import HeldoutSet, draw_documents, heldout_source, prepare_heldout, score_heldout
from eval.recall import greedy_decode, run_recall
from eval.recall_tasks import TaskItem, generate_items
from eval.results import ItemResult, SubmissionResult
import quasar_model
from quasar_model.atomic import write_atomic
from quasar_model.paths import cache_root as quasar_cache_root
from quasar_model.teacher_outputs.capture import load_teacher
from quasar_model.teacher_outputs.tiny_teacher import TINY_TEACHER, tiny_teacher
from quasar_model.tokenization import PlainTextTokenizer, tokenizer_fingerprint


# -----------------------------------------------------------------------------
# what the competition names

def _as_competition(competition) -> Competition:
    return competition if isinstance(competition, Competition) else load_competition(competition)


def teacher_location(competition: Competition) -> tuple[str, str | None]:
    """(path or repo id, revision) of the teacher; the tiny teacher is trained here on first use."""
    t = competition.teacher
    if t.id == TINY_TEACHER:
        return str(tiny_teacher(progress=False)), None
    return t.id, t.revision


def resolve_tokenizer(competition: Competition):
    """The competition's tokenizer (a Hugging Face tokenizer), checked against its pinned fingerprint."""
    from transformers import AutoTokenizer

    spec = competition.tokenizer
    if spec.id == TINY_TEACHER:
        tok = AutoTokenizer.from_pretrained(tiny_teacher(progress=False))
    else:
        revision = competition.teacher.revision if spec.id == competition.teacher.id else None
        tok = AutoTokenizer.from_pretrained(spec.id, revision=revision)
    if spec.fingerprint:
        got = tokenizer_fingerprint(tok)
        if got != spec.fingerprint:
            raise ValueError(f"tokenizer {spec.id!r}: fingerprint {got} differs from the competition's pinned "
                             f"{spec.fingerprint}; this is not the tokenizer the competition scores with")
    return tok


def _teacher_identity(competition: Competition, location: str) -> dict:
    # the tiny teacher's directory name carries its recipe hash: a new recipe is a new teacher
    tid = Path(location).name if competition.teacher.id == TINY_TEACHER else competition.teacher.id
    return dict(id=tid, revision=competition.teacher.revision, dtype=competition.teacher.dtype,
                tokenizer=competition.tokenizer.id, tokenizer_fingerprint=competition.tokenizer.fingerprint)


def recall_items(competition: Competition, seed: int, tokenizer) -> list[TaskItem]:
    r = competition.recall
    return generate_items(seed, tokenizer, r.context_len, r.families, r.lengths, r.depth_bins, r.items_per_cell,
                          forms=r.forms)


def default_cache_root() -> Path:
    return quasar_cache_root() / "eval"


# Model names round their sizes ("9B"): a pin within this of the loaded teacher's count describes
# it; further off, the competition file names another teacher and the student bound is wrong.
TEACHER_PARAMS_TOLERANCE = 0.10


def check_teacher_params(competition: Competition, teacher) -> None:
    """Refuse to score with a teacher whose parameter count is not the competition's `teacher.params`."""
    pinned = competition.teacher.params
    got = sum(p.numel() for p in teacher.parameters())
    if abs(got - pinned) > TEACHER_PARAMS_TOLERANCE * pinned:
        raise ValueError(f"teacher {competition.teacher.id!r} has {got:,} parameters, the competition pins "
                         f"teacher.params={pinned:,}: the student bound (student.max_active_params_vs_teacher) "
                         "would be computed for another model; fix teacher.params")


# -----------------------------------------------------------------------------
# one round's inputs

@dataclass
class RoundInputs:
    competition: Competition
    seed: int
    tokenizer: PlainTextTokenizer
    heldout: HeldoutSet
    items: list[TaskItem]
    probes: torch.Tensor    # [fingerprint_probes, PROBE_LEN], from the seed
    fp_ids: torch.Tensor    # [fingerprint_probes, FP_POSITIONS, ids]: vocabulary ids read (eval.gates.fingerprint_ids)
    teacher_fingerprint: torch.Tensor  # the teacher's own fingerprint on the same probes and ids


def _teacher_fingerprint(comp: Competition, seed: int, probes: torch.Tensor, identity: dict, cache_root: Path,
                         load_teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, the teacher's fingerprint) on this round's probes, cached by content like the held-out
    outputs so a restart or a replay does not load the teacher again."""
    blob = json.dumps(dict(teacher=identity, seed=seed, probes=probes.tolist()), sort_keys=True)
    path = cache_root / "fingerprint" / f"{hashlib.sha256(blob.encode()).hexdigest()}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["ids"], saved["teacher"]
    teacher = load_teacher()
    ids = fingerprint_ids(teacher, probes, seed, comp.student.vocab_size)
    fp = logit_fingerprint(teacher, probes, ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save({"ids": ids, "teacher": fp}, tmp))  # concurrent validators share it
    return ids, fp


def prepare_round(competition, seed: int, *, cache_root=None, device="cpu", progress: bool = False,
                  hf_endpoint: str | None = None) -> RoundInputs:
    """Everything a round scores submissions on, derived from (competition, seed) alone.

    hf_endpoint: where a Hub dataset's files are read (default: HF_ENDPOINT, else the Hub)."""
    comp = _as_competition(competition)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    tok = PlainTextTokenizer(resolve_tokenizer(comp))
    h = comp.heldout
    root = Path(cache_root or default_cache_root())
    source = heldout_source(h, cache_root=root, endpoint=hf_endpoint)
    docs = draw_documents(source, seed, h.documents, tok, h.seq_len)
    location, revision = teacher_location(comp)
    loaded = []

    def load():  # at most once per round, and only on a cache miss
        if not loaded:
            loaded.append(load_teacher(location, revision=revision, dtype=comp.teacher.dtype, device=device))
            check_teacher_params(comp, loaded[0][0])
        return loaded[0]

    identity = _teacher_identity(comp, location)
    heldout = prepare_heldout(docs, seed, teacher=identity, k=h.topk,
                              temperature=h.temperature, cache_root=root,
                              load_teacher=load,
                              tokenizer_fingerprint=comp.tokenizer.fingerprint or None, device=device,
                              progress=progress)
    items = recall_items(comp, seed, tok)
    probes = fingerprint_probes(comp.score.fingerprint_probes, PROBE_LEN, comp.student.vocab_size, seed)
    ids, teacher_fp = _teacher_fingerprint(comp, seed, probes, identity, root, lambda: load()[0])
    return RoundInputs(comp, seed, tok, heldout, items, probes, ids, teacher_fp)


# -----------------------------------------------------------------------------
# one submission

def continuations(model, heldout: HeldoutSet, *, prefill_chunk: int, device=None) -> list[list[int]]:
    """Greedy output after the first CONT_PROMPT tokens of the first CONTINUATIONS held-out documents."""
    out = []
    for d in heldout.docs[:CONTINUATIONS]:
        prompt = d.input_ids[: max(1, min(CONT_PROMPT, len(d.input_ids) // 2))]
        out.append(greedy_decode(model, prompt, CONT_TOKENS, prefill_chunk=prefill_chunk, device=device))
    return out


def score_model(model, inputs: RoundInputs, *, hotkey: str = "local", model_hash: str | None = None,
                commit_block: int = 0, device=None, progress: bool = False, recall_batch: int = 1) -> SubmissionResult:
    """recall_batch: recall items of equal length run this many per forward (eval.recall); the
    outcomes do not depend on it, only speed and memory do."""
    comp = inputs.competition
    model.eval()
    items: list[ItemResult] = []
    docs = score_heldout(model, inputs.heldout, comp.heldout.temperature, device=device, progress=progress)
    tce = inputs.heldout.teacher_ce
    for i, s in enumerate(docs):
        items.append(ItemResult("kl", f"heldout/{i}", s.kl))
        items.append(ItemResult("ce", f"heldout/{i}", s.ce, None if tce is None else tce[i]))
    r = comp.recall
    for o in run_recall(model, inputs.items, prefill_chunk=r.prefill_chunk, max_answer_tokens=r.max_answer_tokens,
                        device=device, progress=progress, batch_size=recall_batch):
        items.append(ItemResult("recall", f"recall/{o.item_id}", 1.0 if o.correct else 0.0, truncated=o.truncated))
    raw = logit_fingerprint(model, inputs.probes, inputs.fp_ids)
    conts = continuations(model, inputs.heldout, prefill_chunk=r.prefill_chunk, device=device)
    if torch.isfinite(raw).all():
        teacher_sim = fingerprint_similarity(raw, inputs.teacher_fingerprint)
        fp = without_teacher(raw, inputs.teacher_fingerprint)  # what the copy gate compares (eval.gates)
    else:  # an overflowing model has no similarity; the scoring rule decides what it is worth
        teacher_sim, fp = None, raw
    return SubmissionResult(hotkey, model_hash or state_dict_hash(model), commit_block, items, fp, conts,
                            teacher_similarity=teacher_sim)


# -----------------------------------------------------------------------------
# checkpoints

def checkpoint_hash(path: str | os.PathLike) -> str:
    """The manifest's model hash when the checkpoint has one, else sha256 over its safetensors files."""
    path = Path(path)
    manifest = path / "manifest.json"
    if manifest.is_file():
        mh = json.loads(manifest.read_text()).get("model_hash")
        if isinstance(mh, str) and mh:
            return mh
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def state_dict_hash(model) -> str:
    """A hash of an in-memory model's weights (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_student(path: str | os.PathLike, competition: Competition, device="cpu", kernel_backend: str = "auto"):
    """A submission directory -> the model, built by this library from safetensors only (no code).

    kernel_backend: the evaluator's choice ("auto": Triton on CUDA, PyTorch elsewhere), overriding
    the checkpoint's: a miner must not pick the code path its model is scored with."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quasar_model.register()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no config.json (is this a checkpoint directory?)")
    cfg = AutoConfig.from_pretrained(path)
    want = competition.student
    if cfg.model_type != want.model_type:
        raise ValueError(f"checkpoint {str(path)!r}: model_type {cfg.model_type!r}, the competition scores "
                         f"{want.model_type!r}")
    if cfg.vocab_size != want.vocab_size:
        raise ValueError(f"checkpoint {str(path)!r}: vocab_size {cfg.vocab_size}, the competition's tokenizer "
                         f"has {want.vocab_size}; KL needs the teacher's ids")
    cfg.kernel_backend = kernel_backend
    model = AutoModelForCausalLM.from_pretrained(path, config=cfg, use_safetensors=True, dtype="auto")
    return model.to(device).eval()


def evaluate_checkpoint(model_or_path, competition, seed: int, *, cache_root=None, device="cpu",
                        progress: bool = False, hotkey: str = "local", model_hash: str | None = None,
                        commit_block: int = 0) -> SubmissionResult:
    """One submission scored on the round of `seed`: a checkpoint directory or an in-memory model."""
    comp = _as_competition(competition)
    if isinstance(model_or_path, (str, os.PathLike)):
        model = load_student(model_or_path, comp, device)
        model_hash = model_hash or checkpoint_hash(model_or_path)
    else:
        model = model_or_path.to(device)
    inputs = prepare_round(comp, seed, cache_root=cache_root, device=device, progress=progress)
    return score_model(model, inputs, hotkey=hotkey, model_hash=model_hash, commit_block=commit_block,
                       device=device, progress=progress)


__all__ = ["RoundInputs", "teacher_location", "resolve_tokenizer", "recall_items",
           "default_cache_root", "check_teacher_params", "prepare_round", "continuations", "score_model", "checkpoint_hash",
           "state_dict_hash", "load_student", "evaluate_checkpoint"]
