"""The distillation loop: packed teacher-cache rows -> student -> sparse KD loss -> AdamW.

One optimizer step, on each rank:

    micro-batches b_1..b_A  (this rank's rows of A global batches of data.batch_size rows)
    n      = sum over ranks and micro-batches of the target positions
    for b:  loss_b = KD(student(b), teacher(b))          mean over b's positions (+ CE mix)
            backward(loss_b * n_b / n * world)           DDP/FSDP then average over ranks
    => the gradient of the mean over all n positions: the same step for any split over ranks
       or micro-batches (up to float summation order)
    clip grad norm -> AdamW step -> LR schedule step -> MoE bias update (load-balancing buffers)

The run's inputs come from distill/setup.py (caches, tokenizer, student), the student and its loss
from distill/kd_student.py. Checkpoints (distill/checkpoint.py) hold everything that moves, so a
resumed run continues the exact same run. Outputs: metrics.jsonl (distill/metrics_log.py),
loss_curve.png (distill/plots.py), and at the end final/ (`save_pretrained` student + tokenizer files).
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch

from quasar_model.progress import progress_bar

from . import parallel
from .checkpoint import check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import DistillConfig
from .data import PackedLoader
from .kd_student import KDStudent, batch_loss, heldout_kl, student_state_dict
from .losses import IGNORE_INDEX
from .metrics_log import append_record, truncate_metrics
from .optim import build_optimizer, build_scheduler
from .plots import plot_loss_curve
from .sequence_kd import is_text_cache
from .setup import build_student, load_tokenizer, open_caches


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
                    loss = batch_loss(self.model, b, **kw)
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
            append_record(self.metrics_path, rec)
        return rec

    def plot(self) -> Path | None:
        return plot_loss_curve(self.metrics_path, self.out / "loss_curve.png", self.cfg.loss.kind)

    def export(self, path: Path) -> Path:
        """save_pretrained student (+ tokenizer files): loadable with AutoModelForCausalLM."""
        # FSDP holds shards: gather the full weights (collective); otherwise the student is whole
        model_sd = parallel.full_model_state_dict(self.model) if self.env.distributed else None
        if self.env.is_main:
            path.mkdir(parents=True, exist_ok=True)
            sd = None if model_sd is None else student_state_dict(model_sd)
            self.student.save_pretrained(path, state_dict=sd)
            self.tokenizer.save_pretrained(path)
        self.env.barrier()
        return path

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (collective: every rank calls it)."""
        return save_checkpoint(self.ckpt_root, step=self.step, tokens_seen=self.tokens_seen, model=self.model,
                               optimizer=self.optimizer, scheduler=self.scheduler, loader=self.loader,
                               cfg=self.cfg, env=self.env)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.ckpt_root)

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load a checkpoint (default: output_dir's latest); False when there is none."""
        ckpt = Path(path) if path is not None else self.latest_checkpoint()
        if ckpt is None:
            return False
        check_resumable(ckpt, self.cfg)
        self.step, self.tokens_seen = load_checkpoint(ckpt, model=self.model, optimizer=self.optimizer,
                                                      scheduler=self.scheduler, loader=self.loader, env=self.env)
        if self.env.is_main and self.metrics_path.exists():
            # a crash after this checkpoint logged steps that will now run again: drop them
            truncate_metrics(self.metrics_path, self.step)
        self.env.barrier()
        self.resumed_from = ckpt
        return True


def run(cfg: DistillConfig) -> list[dict]:
    """Train a config to the end (the `quasar distill` entry point); handles torchrun's process group."""
    env = parallel.init_distributed(cfg.device)
    try:
        return Trainer(cfg, env).train()
    finally:
        parallel.shutdown()
