"""Teacher outputs: load a teacher, capture its top-k log-probs + tail mass, write a teacher cache.

capture_topk never builds the [B, T, V] logits: it runs the LM head on `token_chunk` positions and
`vocab_chunk` vocab rows at a time and keeps a running top-k and a running log-sum-exp of
everything that fell out of it:

    z = (h @ W[c0:c1].T) / tau                     [n, c]   one vocab chunk, fp32 after the matmul
    cand = cat(top_v, z)                            [n, k + c]
    top_v, top_i = topk(cand)                       the k best so far
    rest = logaddexp(rest, logsumexp(cand without the k best))
    at the end: lse = logaddexp(logsumexp(top_v), rest)
                topk_logprobs = top_v - lse,   tail_mass = exp(rest - lse)

so the tail is a log-sum-exp of the non-top-k logits, accurate to fp32's relative precision
however small it is (1 - sum(exp(topk)) would lose it below ~1e-7). Rows >= real_vocab of a
padded LM head (Qwen: 151,936 rows, ~151,665 real tokens) are never looked at.

capture_teacher_cache runs under torchrun: every rank walks the whole segment stream, cuts it into
shards by one rule (teacher_cache.shard_is_full), captures the shards j with j % world == rank,
batching only within a shard, and rank 0 writes the manifest after a barrier. Each shard is
computed from the same batches whatever the world size, so the cache (and its id) does not depend
on it. All ranks must see one filesystem (one node, or a shared mount).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from quasar_model import register
from quasar_model.devices import resolve_device
from quasar_model.progress import progress_bar
from quasar_model.teacher_outputs.cache import (
    DEFAULT_SHARD_TOKENS, CapturedSequence, CaptureInterrupted, TeacherCacheMeta, discard_unfinished, finalize_cache,
    partial_dir, read_shard_record, shard_is_full, write_shard, write_shard_record,
)
from quasar_model.tokenization import token_table

__all__ = ["load_teacher", "capture_topk", "capture_teacher_cache", "VOCAB_CHUNK", "TOKEN_CHUNK"]

# the largest logit block capture ever holds is [TOKEN_CHUNK, k + VOCAB_CHUNK] fp32 (~256 MB),
# whatever the vocabulary: Qwen3.5's 248,320 rows go through in 8 blocks
VOCAB_CHUNK = 32768
TOKEN_CHUNK = 2048

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -----------------------------------------------------------------------------
# loading

def _can_shard() -> bool:
    """accelerate is installed and no torchrun is running (each rank then loads its own copy)."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return int(os.environ.get("WORLD_SIZE", 1)) == 1


def load_teacher(name_or_path: str | os.PathLike, *, revision: str | None = None, dtype="auto",
                 device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer) from a Hub name or a local checkpoint, in eval mode with no gradients.

    dtype: "auto" (the checkpoint's), "float32"/"bfloat16"/"float16" or a torch.dtype.
    device: "cpu", "cuda" (this rank's GPU under torchrun), "cuda:N", or "auto" (accelerate's
    device_map="auto" when accelerate is installed and no torchrun is running, else this rank's
    GPU if there is one, else the CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = str(name_or_path)
    if text.startswith(("/", "./", "../", "~")) and not Path(text).expanduser().is_dir():
        raise ValueError(f"teacher {text!r}: no such checkpoint directory")
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: unknown {dtype!r}; expected 'auto', one of {sorted(_DTYPES)} or a torch.dtype")
        dtype = _DTYPES[dtype]
    kwargs = dict(revision=revision, dtype=dtype, trust_remote_code=trust_remote_code)
    place = None
    if device == "auto" and torch.cuda.is_available() and _can_shard():
        kwargs["device_map"] = "auto"  # accelerate spreads a large teacher over every GPU
    else:
        place = resolve_device(device)
    register()  # a Quasar-Long checkpoint may teach too
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if place is not None:
        model.to(place)
    if place == "cpu":
        pytorch_kernels_on_cpu(model)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    return model, tokenizer


def pytorch_kernels_on_cpu(model) -> list[str]:
    """Point the model's modeling module at its own PyTorch functions where transformers bound a
    GPU-only kernel package instead (Qwen3.5's gated delta rule is bound to fla's Triton kernels
    whenever fla is importable, whatever the device, and Triton cannot run on a CPU). Process-wide,
    which is harmless: no process runs those kernels on a CPU. Returns the names it rebound."""
    import sys

    rebound = []
    for module_name in {type(m).__module__ for m in model.modules()}:
        module = sys.modules.get(module_name)
        if module is None or not module_name.startswith("transformers.models."):
            continue
        for name, fn in list(vars(module).items()):
            torch_fn = getattr(fn, "__wrapped__", None)
            # transformers' hub-kernel wrapper around a `torch_*` reference function
            if callable(fn) and callable(torch_fn) and fn.__code__.co_filename.endswith("hub_kernels.py"):
                setattr(module, name, torch_fn)
                REBOUND_ON_CPU[(module_name, name)] = fn
                rebound.append(f"{module_name}.{name}")
    return rebound


REBOUND_ON_CPU: dict[tuple[str, str], object] = {}  # (module, name) -> the kernel-bound function it replaced


# -----------------------------------------------------------------------------
# top-k capture

_checked_models: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _head(model):
    """(decoder trunk, LM-head weight [V, D], logit post-processing) of a causal LM."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"capture_topk: {type(model).__name__} has no bias-free LM head to read")
    cap = getattr(model.config, "final_logit_softcapping", None)   # Gemma 2/3: z = cap * tanh(z / cap)
    post = (lambda z: cap * torch.tanh(z / cap)) if cap else (lambda z: z)
    return model.base_model, head.weight, post


def _check_head_path(model, trunk, weight, post, input_ids, attention_mask):
    """Once per model: hidden @ W.T must reproduce model(...).logits, or we would capture another model."""
    if model in _checked_models:
        return
    ids = input_ids[:1, :8]
    am = None if attention_mask is None else attention_mask[:1, :8]
    ref = model(input_ids=ids, attention_mask=am).logits.float()               # [1, t, V]
    h = trunk(input_ids=ids, attention_mask=am).last_hidden_state
    z = post(F.linear(h, weight).float())                                        # [1, t, V]
    tol = 1e-3 if weight.dtype == torch.float32 else 3e-2
    err = ((z - ref).abs() / (1 + ref.abs())).max().item()
    if err > tol:
        raise RuntimeError(f"capture_topk: hidden @ lm_head differs from model(...).logits of "
                           f"{type(model).__name__} (relative error {err:.2e}): the model post-processes its "
                           "logits in a way capture_topk does not reproduce (logit scaling?)")
    _checked_models.add(model)


def _topk_rows(h, weight, post, k, temperature, real_vocab, vocab_chunk):
    """h [n, D] -> (top ids [n, k] int64, top log-probs [n, k] fp32, tail mass [n] fp32)."""
    n = h.shape[0]
    top_v = h.new_empty(n, 0, dtype=torch.float32)                     # running top-k logits / tau
    top_i = torch.empty(n, 0, dtype=torch.long, device=h.device)
    rest = torch.full((n,), float("-inf"), device=h.device)          # lse of everything dropped
    for c0 in range(0, real_vocab, vocab_chunk):
        c1 = min(c0 + vocab_chunk, real_vocab)
        z = post(F.linear(h, weight[c0:c1]).float()) / temperature     # [n, c]
        kept = top_v.shape[-1]
        cand_v = torch.cat([top_v, z], dim=-1)                         # [n, k' + c]
        del z
        top_v, pos = cand_v.topk(min(k, cand_v.shape[-1]), dim=-1)     # sorted, largest first
        # candidate position -> vocab id without an int64 [n, k' + c] id table: the first k'
        # candidates are the previous top-k, the rest are ids c0, c0 + 1, ...
        if kept:
            top_i = torch.where(pos < kept, top_i.gather(-1, pos.clamp(max=kept - 1)), pos - kept + c0)
        else:
            top_i = pos + c0
        dropped = cand_v.scatter_(-1, pos, float("-inf"))              # in place: cand_v is spent
        rest = torch.logaddexp(rest, torch.logsumexp(dropped, dim=-1))
        del cand_v, dropped
    lse = torch.logaddexp(torch.logsumexp(top_v, dim=-1), rest)        # [n] log Z
    return top_i, top_v - lse[:, None], torch.exp(rest - lse)


@torch.no_grad()
def capture_topk(model, input_ids: torch.Tensor, *, k: int, temperature: float = 1.0,
                 attention_mask: torch.Tensor | None = None, real_vocab: int | None = None,
                 vocab_chunk: int = VOCAB_CHUNK, token_chunk: int = TOKEN_CHUNK):
    """Teacher top-k at the capture temperature for every position of input_ids [B, T].

    Returns topk_ids int64 [B, T, k] (most likely first), topk_logprobs float32 [B, T, k] =
    log softmax(z / temperature) at those ids, and tail_mass float32 [B, T] = the probability of all
    other ids < real_vocab. Row t is the distribution of the token after input_ids[:, t] (logits[t]).
    real_vocab: how many LM-head rows are real tokens (default: all); the rest never count.
    Pad on the right: positions where attention_mask is 0 hold ids 0, log-probs -inf and tail 1
    (nothing known); left padding would shift the real tokens' positions.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [B, T], got shape {list(input_ids.shape)}")
    trunk, weight, post = _head(model)
    V = weight.shape[0]
    real_vocab = V if real_vocab is None else int(real_vocab)
    if not 0 < real_vocab <= V:
        raise ValueError(f"real_vocab: {real_vocab} must be in [1, {V}] (the LM head has {V} rows); "
                         "a tokenizer with more tokens than the model's head belongs to another model")
    if not 1 <= k <= real_vocab:
        raise ValueError(f"k: must be in [1, real_vocab={real_vocab}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    for name, n in (("vocab_chunk", vocab_chunk), ("token_chunk", token_chunk)):
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"{name}: must be a positive int, got {n!r}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: shape {list(attention_mask.shape)} differs from input_ids "
                         f"{list(input_ids.shape)}")
    device = weight.device
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    _check_head_path(model, trunk, weight, post, input_ids, attention_mask)

    h = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state   # [B, T, D]
    B, T, D = h.shape
    keep = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    rows = h[keep]                                                                    # [n, D]
    ids = torch.zeros(B, T, k, dtype=torch.long, device=device)
    lp = torch.full((B, T, k), float("-inf"), device=device)
    tail = torch.ones(B, T, device=device)
    out_i, out_v, out_t = [], [], []
    for s in range(0, rows.shape[0], token_chunk):
        i, v, t = _topk_rows(rows[s:s + token_chunk], weight, post, k, temperature, real_vocab, vocab_chunk)
        out_i.append(i), out_v.append(v), out_t.append(t)
    if out_i:
        ids[keep], lp[keep], tail[keep] = torch.cat(out_i), torch.cat(out_v), torch.cat(out_t)
    return ids, lp, tail


# -----------------------------------------------------------------------------
# the cache, under torchrun or not

def _plan_shards(segments: Iterable[list[int]], shard_tokens: int) -> Iterator[tuple[int, list[tuple[int, list[int]]]]]:
    """(shard number, [(global index, token ids)]) in order; the same for every rank."""
    shard, tokens, items = 0, 0, []
    for i, seg in enumerate(segments):
        seg = list(seg)
        if not seg:
            raise ValueError(f"segments: segment {i} is empty; every segment needs at least one token")
        items.append((i, seg))
        tokens += len(seg)
        if shard_is_full(tokens, shard_tokens):
            yield shard, items
            shard, tokens, items = shard + 1, 0, []
    if items:
        yield shard, items


def _capture_shard(model, items, *, k, temperature, real_vocab, batch_size, vocab_chunk=VOCAB_CHUNK,
                   token_chunk=TOKEN_CHUNK) -> list[CapturedSequence]:
    # batch by length inside the shard (less padding); right padding leaves causal outputs untouched
    order = sorted(range(len(items)), key=lambda j: -len(items[j][1]))
    out: dict[int, CapturedSequence] = {}
    for b in range(0, len(order), batch_size):
        batch = [items[j] for j in order[b:b + batch_size]]
        T = max(len(seg) for _, seg in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for r, (_, seg) in enumerate(batch):
            ids[r, :len(seg)] = torch.tensor(seg)
            mask[r, :len(seg)] = 1
        ti, tl, tt = capture_topk(model, ids, k=k, temperature=temperature, attention_mask=mask,
                                  real_vocab=real_vocab, vocab_chunk=vocab_chunk, token_chunk=token_chunk)
        ti, tl, tt = ti.cpu(), tl.cpu(), tt.cpu()
        for r, (index, seg) in enumerate(batch):
            n = len(seg)
            out[index] = CapturedSequence(index=index, input_ids=ids[r, :n].clone(), topk_ids=ti[r, :n].clone(),
                                          topk_logprobs=tl[r, :n].clone(), tail_mass=tt[r, :n].clone())
    return [out[i] for i, _ in items]


def _distributed(device: torch.device):
    """(rank, world, dist module or None, whether we created the process group)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, None, False
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), dist, created


def _broadcast(dist, obj, device):
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if dist.get_backend() == "nccl" else None)
    return box[0]


def _inputs_digest(items: list[tuple[int, list[int]]]) -> str:
    """What a shard was captured from (indices and token ids): a resumed capture reuses a finished
    shard only for the same inputs."""
    import array

    h = hashlib.sha256()
    for index, seg in items:
        h.update(f"{index}:{len(seg)};".encode())
        h.update(array.array("q", seg).tobytes())
    return h.hexdigest()


def _shard_tokens_of_rank(segments, shard_tokens: int, rank: int, world: int) -> tuple[int | None, int | None]:
    """(tokens this rank will capture, number of shards) when `segments` has a length (a list), else
    (None, None): the progress bar's total, by the same rule that cuts the shards."""
    if not isinstance(segments, Sequence):
        return None, None
    mine, shard, tokens = 0, 0, 0
    for seg in segments:
        tokens += len(seg)
        if shard_is_full(tokens, shard_tokens):
            mine += tokens if shard % world == rank else 0
            shard, tokens = shard + 1, 0
    if tokens:
        mine += tokens if shard % world == rank else 0
        shard += 1
    return mine, shard


def capture_teacher_cache(model, tokenizer, segments: Iterable[list[int]], out_root: str | os.PathLike, *,
                          k: int, temperature: float, teacher_id: str, teacher_revision: str | None,
                          data_fingerprint: str, batch_size: int = 8, progress: bool = True,
                          shard_tokens: int = DEFAULT_SHARD_TOKENS, logprob_dtype: str = "float32",
                          vocab_chunk: int = VOCAB_CHUNK, token_chunk: int = TOKEN_CHUNK) -> Path:
    """Capture the teacher on token-id segments into out_root/<cache_id>/ and return that path.

    segments: token-id lists (any lengths >= 1) of the teacher's tokenizer; cache order = their order
    (a list gives the progress bar its total and ETA).
    Resumable: shards go to out_root/.partial-<key>/ (teacher_cache.partial_dir) and a finished one
    is not captured again, so after a KeyboardInterrupt (raised as CaptureInterrupted, with only
    finished shards left on disk) the same call continues where it stopped.
    Under torchrun (WORLD_SIZE > 1) every rank must call this with the same arguments and the same
    segments; the process group is created (nccl on CUDA, else gloo) if it is not already.
    vocab_chunk / token_chunk: the LM-head block capture_topk works on (its memory bound).
    """
    table = token_table(tokenizer)       # read the vocab once: fingerprint and real size
    meta = TeacherCacheMeta(teacher_id=teacher_id, teacher_revision=teacher_revision,
                            tokenizer_fingerprint=table.fingerprint,
                            vocab_size=table.size, k=k, temperature=temperature,
                            data_fingerprint=data_fingerprint, logprob_dtype=logprob_dtype)
    device = model.get_output_embeddings().weight.device
    rank, world, dist, created = _distributed(device)
    tmp = Path(_broadcast(dist, str(partial_dir(out_root, meta, shard_tokens)) if rank == 0 else None, device))
    total, n_planned = _shard_tokens_of_rank(segments, shard_tokens, rank, world)

    bar, resumed = None, 0
    n_shards = 0
    try:
        for shard_no, items in _plan_shards(segments, shard_tokens):
            n_shards = shard_no + 1
            if shard_no % world != rank:
                continue
            inputs = _inputs_digest(items)
            info = read_shard_record(tmp, shard_no, inputs)
            if info is None:
                if bar is None:  # started after what is resumed: the rate and ETA count new work only
                    bar = progress_bar(desc=f"teacher capture (rank {rank}/{world})", unit="tok", total=total,
                                       initial=resumed, enabled=progress and rank == 0)
                seqs = _capture_shard(model, items, k=k, temperature=temperature, real_vocab=meta.vocab_size,
                                      batch_size=batch_size, vocab_chunk=vocab_chunk, token_chunk=token_chunk)
                info = write_shard(tmp, shard_no, seqs, logprob_dtype)
                # the record marks it finished, and travels to rank 0 through the shared directory
                write_shard_record(tmp, info, inputs)
                bar.update(info.num_tokens)
            elif bar is None:
                resumed += info.num_tokens
            else:
                bar.update(info.num_tokens)
    except BaseException as e:  # an error or a stop: only finished shards stay, for the next run
        kept = discard_unfinished(tmp)
        if kept == 0 and rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            raise CaptureInterrupted(kept, n_planned, tmp if kept else None) from None
        raise
    finally:
        if bar is not None:
            bar.close()

    if dist is not None:
        dist.barrier()
    path = None
    if rank == 0:
        infos = []
        for j in range(n_shards):
            info = read_shard_record(tmp, j)
            if info is None:
                raise RuntimeError(f"capture_teacher_cache: shard {j} was not written by rank {j % world} "
                                   f"(is {tmp} on a filesystem all ranks share?)")
            infos.append(info)
        discard_unfinished(tmp, keep={i.file for i in infos})  # another capture's leftovers
        for info in infos:
            Path(tmp, f"{info.file}.json").unlink()
        path = str(finalize_cache(tmp, out_root, meta, infos))
    path = Path(_broadcast(dist, path, device))
    if created:
        dist.destroy_process_group()
    return path
