"""The distillation loop: packed teacher-cache rows -> student -> sparse KD loss -> AdamW.

One optimizer step, on each rank:

    micro-batches b_1..b_A  (this rank's rows of A global batches of data.batch_size rows)
    n      = sum over ranks and micro-batches of the target positions
    for b:  loss_b = KD(student(b), teacher(b))          mean over b's positions (+ CE mix)
            backward(loss_b * n_b / n * world)           DDP/FSDP then average over ranks
    => the gradient of the mean over all n positions: the same step for any split over ranks
       or micro-batches (up to float summation order)
    clip grad norm -> AdamW step -> LR schedule step -> MoE bias update (load-balancing buffers)

Checkpoints (output_dir/checkpoints/step-XXXXXXXX, written to a temporary directory and renamed, so
a killed run never leaves half of one; `latest` names the newest) hold everything that moves:
model weights (safetensors, MoE balancing buffers included), optimizer and scheduler state, the
data loader's position, the step, and every rank's RNG states. Resuming from one continues the
exact same run: the loss curve of an interrupted run equals the uninterrupted one.

Outputs: metrics.jsonl (one record per logged step, plus held-out KL records), loss_curve.png,
and at the end final/ (`save_pretrained` student + tokenizer files).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel
from .config import DistillConfig
from .data import PackedBatch, PackedLoader, iterate_once
from .losses import IGNORE_INDEX, chunked_kd_loss, hidden_mse
from .optim import build_optimizer, build_scheduler
from .sequence_kd import is_text_cache

# a checkpoint only continues the run it came from: these settings must not change on resume
RESUME_MUST_MATCH = ("student", "data.train_cache", "data.seq_len", "data.batch_size", "data.grad_accum",
                     "optim", "loss", "teacher", "recall", "steps", "seed")


# -----------------------------------------------------------------------------
# the student + loss as one module (DDP/FSDP hook its forward)

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


def _call(model: nn.Module, b: PackedBatch, **kw) -> torch.Tensor:
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
                kl = _call(model, b, kind="fkl", ce_weight=0.0)
            total += float(kl) * b.n_tokens
            count += b.n_tokens
    finally:
        model.train(was_training)
    total, count = env.all_reduce_sum(total), env.all_reduce_sum(count)
    return float(total / count.clamp(min=1))


# -----------------------------------------------------------------------------
# teacher caches and the student

def resolve_cache_dir(path: str | os.PathLike) -> Path:
    """A cache directory, or a directory holding exactly one (what `quasar teacher-cache --out` makes)."""
    from quasar_model.teacher_outputs.cache import TeacherCacheError, open_teacher_cache

    path = Path(path)
    if not path.exists():
        raise ValueError(f"teacher cache {str(path)!r}: no such directory (make one with `quasar teacher-cache`)")
    try:
        open_teacher_cache(path, verify=False)
        return path
    except TeacherCacheError:
        pass
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            open_teacher_cache(sub, verify=False)
            found.append(sub)
        except TeacherCacheError:
            continue
    if len(found) != 1:
        what = "no teacher cache" if not found else f"{len(found)} teacher caches ({[p.name for p in found]})"
        raise ValueError(f"teacher cache {str(path)!r}: holds {what}; name the cache directory itself")
    return found[0]


def open_caches(cfg: DistillConfig):
    """(train cache, held-out cache or None), checked against each other."""
    from quasar_model.teacher_outputs.cache import open_teacher_cache

    train = open_teacher_cache(resolve_cache_dir(cfg.data.train_cache))
    m = train.meta
    if cfg.loss.temperature is not None and not math.isclose(cfg.loss.temperature, m.temperature):
        raise ValueError(f"config loss.temperature={cfg.loss.temperature} but the teacher cache was captured "
                         f"at temperature {m.temperature}: its log-probs are only valid at that temperature "
                         "(leave loss.temperature unset, or capture a new cache)")
    heldout = None
    if cfg.data.heldout_cache:
        heldout = open_teacher_cache(resolve_cache_dir(cfg.data.heldout_cache),
                                     tokenizer_fingerprint=m.tokenizer_fingerprint, vocab_size=m.vocab_size)
        h = heldout.meta
        for key in ("teacher_id", "teacher_revision", "temperature"):
            if getattr(h, key) != getattr(m, key):
                raise ValueError(f"held-out teacher cache has {key}={getattr(h, key)!r} but the training "
                                 f"cache has {getattr(m, key)!r}: both must come from the same teacher")
        if h.data_fingerprint == m.data_fingerprint:
            raise ValueError("the held-out teacher cache was captured from the same data as the training "
                             "cache: held-out KL needs text the student does not train on")
    return train, heldout


def load_tokenizer(cfg: DistillConfig, meta):
    """The teacher's tokenizer (exported with the student), checked against the cache's fingerprint."""
    from transformers import AutoTokenizer

    from quasar_model.tokenization import tokenizer_fingerprint

    name = cfg.data.tokenizer or meta.teacher_id
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer {name!r} to export with the student ({e}); "
                         "set data.tokenizer to a local tokenizer directory") from e
    fp = tokenizer_fingerprint(tok)
    if fp != meta.tokenizer_fingerprint:
        raise ValueError(f"tokenizer {name!r} (fingerprint {fp[:12]}) is not the one the teacher cache was "
                         f"captured with ({meta.tokenizer_fingerprint[:12]})")
    return tok


def build_student(cfg: DistillConfig, vocab_size: int, tokenizer=None) -> nn.Module:
    """A fresh student from the preset (+ overrides), or the checkpoint named by student.init_from."""
    from quasar_model import QuasarLongConfig, QuasarLongForCausalLM

    if cfg.student.init_from:
        # master weights in torch's default dtype: float32, unless a caller sets another (the
        # equivalence tests run in float64)
        model = QuasarLongForCausalLM.from_pretrained(cfg.student.init_from, dtype=torch.get_default_dtype())
    else:
        special = {}
        if tokenizer is not None:
            special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id)
        kw = {"vocab_size": vocab_size, **special, **cfg.student.overrides}
        model = QuasarLongForCausalLM(QuasarLongConfig.preset(cfg.student.preset, **kw))
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"student vocab_size={model.config.vocab_size} is smaller than the teacher's "
                         f"{vocab_size}: the student must be able to emit every teacher id")
    if cfg.student.trainable == "branches":
        freeze_all_but_branches(model)
    return model


def freeze_all_but_branches(model) -> list[str]:
    """requires_grad only on the hybrid layers' branches and their gates (a, g, c, adapter).

    Structural distillation's first phase: the trunk copied from the teacher stays the teacher's,
    and only what is new learns. Which parameters those are is the model's to say
    (QuasarLongForCausalLM.branch_parameters). Returns the names left trainable.
    """
    model.requires_grad_(False)
    names = []
    for name, p in model.branch_parameters():
        p.requires_grad_(True)
        names.append(name)
    if not names:
        raise ValueError("student.trainable=branches, but the student has no hybrid layers (no branches to train)")
    return names


# -----------------------------------------------------------------------------
# the trainer

class Trainer:
    def __init__(self, cfg: DistillConfig, env: parallel.DistEnv | None = None):
        self.cfg = cfg.check()
        self.env = env or parallel.init_distributed(cfg.device)
        self.device = self.env.device
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.train_cache, self.heldout_cache = open_caches(cfg)
        meta = self.train_cache.meta
        if is_text_cache(meta) and cfg.loss.ce_weight != 1:
            raise ValueError(f"config loss.ce_weight={cfg.loss.ce_weight}: the training cache is text only "
                             "(sequence-level KD, no teacher distribution), so train it with loss.ce_weight=1")
        self.temperature = float(meta.temperature)
        self.tokenizer = load_tokenizer(cfg, meta)

        torch.manual_seed(cfg.seed)          # the student's initial weights are a function of the seed
        random.seed(cfg.seed)
        self.student = build_student(cfg, meta.vocab_size, self.tokenizer).to(self.device)
        self.student.train()
        lc = cfg.loss
        self.teacher = None
        if lc.hidden_mse_weight > 0:     # structural distillation: the live teacher's layer outputs
            from .structural import load_live_teacher
            self.teacher = load_live_teacher(cfg.teacher, meta, self.student.config, self.device)
        self.engine = KDStudent(self.student, kind=lc.kind, beta=lc.beta, temperature=self.temperature,
                                ce_weight=lc.ce_weight, kd_t2_scale=lc.kd_t2_scale, chunk_size=lc.chunk_size,
                                hidden_layers=self.teacher.student_layers if self.teacher else (),
                                hidden_mse_weight=lc.hidden_mse_weight)
        self.model = parallel.wrap(self.engine, self.env, cfg.parallel, layers=list(self.student.model.layers))

        oc = cfg.optim
        engram_mult = oc.engram_lr_multiplier or self.student.config.engram_lr_multiplier
        self.optimizer = build_optimizer(self.student, lr=oc.lr, weight_decay=oc.weight_decay,
                                         betas=(oc.beta1, oc.beta2), eps=oc.eps,
                                         engram_lr_multiplier=engram_mult)
        self.scheduler = build_scheduler(self.optimizer, warmup=oc.warmup_steps, total=cfg.steps,
                                         min_ratio=oc.min_lr_ratio)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.pad_id = pad_id
        self.recall_rows = cfg.recall_rows
        self.loader = PackedLoader(self.train_cache, cfg.data.seq_len, cfg.data.batch_size - self.recall_rows,
                                   cfg.seed, rank=self.env.rank, world_size=self.env.world_size, pad_id=pad_id)
        self.recall_maker = None
        if self.recall_rows:
            if self.recall_rows % self.env.world_size:
                raise ValueError(f"config recall.mix: {self.recall_rows} recall rows per micro-step do not divide "
                                 f"evenly over {self.env.world_size} ranks")
            from .recall_curriculum import FAMILIES, DocMaker, units_from_ids
            self.recall_maker = DocMaker(self.tokenizer, units_from_ids(self.train_cache, self.tokenizer.eos_token_id),
                                         families=cfg.recall.families or FAMILIES)
        self.autocast_dtype = torch.bfloat16 if (self.device.type == "cuda" and cfg.dtype == "bfloat16") else None
        self.step, self.tokens_seen = 0, 0
        self.resumed_from: Path | None = None
        if cfg.resume:
            self.resume()

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        micro = [self.loader.next_batch() for _ in range(self.cfg.data.grad_accum)]
        n_local = [b.n_tokens for b in micro]
        n_global = float(self.env.all_reduce_sum(sum(n_local)))
        recall = [self.recall_micro_batch(i) for i in range(len(micro))] if self.recall_rows else None
        recall_len = self.recall_length()
        if recall:
            n_ans = float(self.env.all_reduce_sum(sum(int((r["labels"] != IGNORE_INDEX).sum()) for r in recall)))
        loss_sum, mse_sum, recall_sum = 0.0, 0.0, 0.0
        for i, b in enumerate(micro):
            b = b.to(self.device)
            kw = {}
            if recall:
                kw.update(recall_ids=recall[i]["input_ids"].to(self.device),
                          recall_position_ids=recall[i]["position_ids"].to(self.device),
                          recall_labels=recall[i]["labels"].to(self.device))
            if self.teacher is not None:
                kw["hidden_targets"] = self.teacher.hidden_targets(b.input_ids, b.position_ids)
            with parallel.grad_sync(self.model, sync=i == len(micro) - 1):
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                    enabled=self.autocast_dtype is not None):
                    loss = _call(self.model, b, **kw)
                # weight by this micro-batch's share of all the step's positions; x world undoes
                # the data-parallel gradient average, so the sum over ranks is the global mean
                scale = n_local[i] / max(n_global, 1.0) * self.env.world_size
                if recall:      # + weight x the mean CE over all the step's answer tokens
                    loss, ans_sum = loss
                    total = loss * scale + ans_sum * (self.cfg.recall.weight * self.env.world_size / max(n_ans, 1.0))
                    recall_sum = recall_sum + ans_sum.detach().double()
                else:
                    total = loss * scale
                total.backward()
            loss_sum = loss_sum + loss.detach().double() * n_local[i]     # no host sync per micro-step
            if self.teacher is not None:
                mse_sum = mse_sum + self.engine.last_hidden_mse.double() * n_local[i]
        parallel.sync_replicated_grads(self.model, self.env)
        grad_norm = parallel.clip_grad_norm(self.student.parameters(), self.cfg.optim.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0]["lr_scale"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for moe in self.student.model.moe_layers():
            moe.update_bias()        # routing balance from this step's loads (all-reduced over ranks)
        self.step += 1
        self.tokens_seen += int(n_global)
        loss = float(self.env.all_reduce_sum(loss_sum)) / max(n_global, 1.0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen,
               "tok_per_s": n_global / dt, "step_s": dt}
        if self.teacher is not None:
            rec["hidden_mse"] = float(self.env.all_reduce_sum(mse_sum)) / max(n_global, 1.0)
        if recall:
            rec["recall_ce"] = float(self.env.all_reduce_sum(recall_sum)) / max(n_ans, 1.0)
            rec["recall_len"] = recall_len
        return rec

    def recall_length(self, step: int | None = None) -> int:
        from .recall_curriculum import curriculum_length

        r = self.cfg.recall
        return curriculum_length(self.step if step is None else step, self.cfg.steps, r.min_len,
                                 r.max_len or self.cfg.data.seq_len, r.ramp)

    def recall_micro_batch(self, i: int) -> dict:
        """This rank's recall rows for micro-step i of the current step: a function of (seed, step, i)."""
        from .recall_curriculum import recall_batch

        return recall_batch(self.recall_maker, rows=self.recall_rows, seq_len=self.cfg.data.seq_len,
                            length=self.recall_length(), seed=self.cfg.seed,
                            step=self.step * self.cfg.data.grad_accum + i, rank=self.env.rank,
                            world_size=self.env.world_size, pad_id=self.pad_id)

    # ---------------------------------------------------------------- the loop
    def train(self, until: int | None = None, should_stop=None, on_step=None) -> list[dict]:
        """Train to cfg.steps (or stop after step `until`, as a crash would: no extra checkpoint).

        `should_stop()`, checked after every step, ends training at that step boundary the same way (the
        caller checkpoints: `save_checkpoint`). `on_step(record)` sees every step's record (step, loss,
        ...: the miner's metrics), not only the logged ones."""
        from quasar_model.progress import progress_bar

        cfg = self.cfg
        cfg_steps = cfg.steps
        stop = cfg_steps if until is None else min(until, cfg_steps)
        records = []
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        if self.step == 0 and self.heldout_cache is not None:
            records.append(self.log({"step": 0, "heldout_kl": self.evaluate()}))
        bar = progress_bar(total=cfg_steps, initial=self.step, desc="distill", unit="step",
                           enabled=cfg.progress and self.env.is_main)
        while self.step < stop:
            rec = self.train_step()
            if on_step is not None:
                on_step(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tok_per_s']:.0f}",
                            **({"mse": f"{rec['hidden_mse']:.4f}"} if "hidden_mse" in rec else {}),
                            **({"recall_ce": f"{rec['recall_ce']:.3f}"} if "recall_ce" in rec else {}))
            if self.step % cfg.log_every == 0 or self.step == cfg_steps:
                records.append(self.log(rec))
            last = self.step == cfg_steps
            if self.heldout_cache is not None and (last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                records.append(self.log({"step": self.step, "heldout_kl": self.evaluate()}))
            if last or self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if should_stop is not None and should_stop():
                break
        bar.close()
        if self.step == cfg_steps and until is None:
            self.export(self.out / "final")
        if self.env.is_main:
            self.plot()
        return records

    def evaluate(self) -> float:
        return heldout_kl(self.model, self.heldout_cache, seq_len=self.cfg.data.seq_len,
                          batch_size=self.cfg.data.batch_size, max_sequences=self.cfg.eval_sequences,
                          env=self.env, autocast_dtype=self.autocast_dtype)

    # ---------------------------------------------------------------- outputs
    def log(self, rec: dict) -> dict:
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    def plot(self) -> Path | None:
        """metrics.jsonl -> loss_curve.png (training loss per step, held-out KL points)."""
        if not self.metrics_path.exists():
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = read_metrics(self.metrics_path)
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        held = [(r["step"], r["heldout_kl"]) for r in recs if "heldout_kl" in r]
        mse = [(r["step"], r["hidden_mse"]) for r in recs if "hidden_mse" in r]
        rce = [(r["step"], r["recall_ce"]) for r in recs if "recall_ce" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), lw=1, label=f"train loss ({self.cfg.loss.kind}"
                    + (" + hidden MSE" if mse else "") + ")")
        if mse:
            ax.plot(*zip(*mse), lw=1, label="hidden-state MSE (teacher-normalised, train)")
        if rce:
            ax.plot(*zip(*rce), lw=1, label="recall curriculum: answer-span CE")
        if held:
            ax.plot(*zip(*held), "o-", label="held-out KL(teacher || student)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.out / "loss_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def export(self, path: Path) -> Path:
        """save_pretrained student (+ tokenizer files): loadable with AutoModelForCausalLM."""
        # FSDP holds shards: gather the full weights (collective); otherwise the student is whole
        model_sd = parallel.full_model_state_dict(self.model) if self.env.distributed else None
        if self.env.is_main:
            path.mkdir(parents=True, exist_ok=True)
            sd = None if model_sd is None else _strip(model_sd, "student.")
            self.student.save_pretrained(path, state_dict=sd)
            self.tokenizer.save_pretrained(path)
        self.env.barrier()
        return path

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write step-XXXXXXXX atomically (temp dir + rename), point `latest` at it, prune old ones."""
        from safetensors.torch import save_file

        from quasar_model.atomic import write_atomic

        model_sd, optim_sd = parallel.full_state_dicts(self.model, self.optimizer)   # collective
        name = f"step-{self.step:08d}"
        final, tmp = self.ckpt_root / name, self.ckpt_root / f".tmp-{name}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.env.barrier()
        torch.save(rng_state(), tmp / f"rng_rank{self.env.rank}.pt")
        # every rank's file is written before rank 0 renames the directory: without this a slow
        # rank wrote into a .tmp- directory that had just become step-N (seen under load in CI)
        self.env.barrier()
        if self.env.is_main:
            weights = {k: v.detach().cpu().contiguous().clone() for k, v in _strip(model_sd, "student.").items()}
            save_file(weights, str(tmp / "model.safetensors"))
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save({"scheduler": self.scheduler.state_dict(), "step": self.step,
                        "tokens_seen": self.tokens_seen, "data": self.loader.state_dict(),
                        "world_size": self.env.world_size}, tmp / "trainer_state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": self.step, "data": self.loader.state_dict(), "world_size": self.env.world_size,
                 "config": self.cfg.to_dict()}, indent=1))
            if final.exists():     # the same step again (after a resume): replace it
                old = self.ckpt_root / f".old-{name}"
                os.rename(final, old)
                shutil.rmtree(old)
            os.rename(tmp, final)
            write_atomic(self.ckpt_root / "latest", name)
            steps = sorted(p for p in self.ckpt_root.glob("step-*") if p.is_dir())
            for p in steps[: max(0, len(steps) - self.cfg.keep_checkpoints)]:
                shutil.rmtree(p, ignore_errors=True)
        self.env.barrier()
        return final

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_root / "latest"
        if pointer.exists():
            p = self.ckpt_root / pointer.read_text().strip()
            if (p / "trainer_state.pt").exists():
                return p
        done = sorted(p for p in self.ckpt_root.glob("step-*") if (p / "trainer_state.pt").exists())
        return done[-1] if done else None

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load a checkpoint (default: output_dir's latest); False when there is none."""
        from safetensors.torch import load_file

        from quasar_model.atomic import write_atomic

        ckpt = Path(path) if path is not None else self.latest_checkpoint()
        if ckpt is None:
            return False
        saved = json.loads((ckpt / "trainer_state.json").read_text())["config"]
        # a checkpoint from before a config section existed ran with that section's defaults
        saved, now = _flat(_with_defaults(saved)), _flat(self.cfg.to_dict())
        for key in sorted(set(saved) | set(now)):
            a, b = saved.get(key), now.get(key)
            if a != b and any(key == m or key.startswith(m + ".") for m in RESUME_MUST_MATCH):
                raise ValueError(f"checkpoint {str(ckpt)!r} was trained with {key}={a!r}, the config now says "
                                 f"{b!r}: resuming would not continue that run (use a new output_dir, or "
                                 "resume=false to start over)")
        model_sd = {f"student.{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
        optim_sd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        parallel.load_full_state_dicts(self.model, self.optimizer, model_sd, optim_sd)
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.loader.load_state_dict(state["data"])
        rng_file = ckpt / f"rng_rank{self.env.rank}.pt"
        if rng_file.exists():       # a different number of ranks keeps this rank's fresh RNG
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        if self.env.is_main and self.metrics_path.exists():
            # a crash after this checkpoint logged steps that will now run again: drop them
            keep = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
            write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))
        self.env.barrier()
        self.resumed_from = ckpt
        return True


# -----------------------------------------------------------------------------
# helpers

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _with_defaults(saved: dict) -> dict:
    from .config import DistillConfig, _build

    try:
        return _build(DistillConfig, saved).to_dict()
    except (ValueError, TypeError):
        return saved        # a config this version cannot read: compare it as it is


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested dict -> {dotted.key: leaf value} (tuples and lists count as leaves)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def run(cfg: DistillConfig) -> list[dict]:
    """Train a config to the end (the `quasar distill` entry point); handles torchrun's process group."""
    env = parallel.init_distributed(cfg.device)
    try:
        return Trainer(cfg, env).train()
    finally:
        parallel.shutdown()
