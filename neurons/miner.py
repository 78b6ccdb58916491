"""The miner: distil, score its own checkpoint exactly as validators will, publish only improvements.

    loop  train `steps_per_cycle` steps (distill.trainer, resumable) -> export a checkpoint
          -> `eval.evaluate` on the competition with the miner's own seed -> composite
          -> if it beats the best published composite by `min_improvement`: publish + commit
    serve the published checkpoint over HTTP to validators (signed requests, rate-limited)

The self-evaluation seed is fixed for a miner, so successive checkpoints are compared on the same
items; validators use fresh seeds, so tuning on these items gains nothing there.
State (best score, what was published and committed) is `miner.json` in the work directory,
written atomically; training resumes from the trainer's own checkpoints. SIGTERM stops training at
the next step boundary with a checkpoint there (or abandons a running self-evaluation, redone on
the next start) and exits; a second signal exits at once (neurons.shutdown).

`adversary` makes this miner one of localnet's attackers (neurons.adversaries): instead of
training, it makes one checkpoint (a copy or near-copy of the miner whose work directory is
`copy_from`, a crasher built from it, or the teacher itself) and publishes it under its own hotkey.
Validators must give each nothing. `copy_from` alone is the exact copier.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import load_config
from eval.competition import Competition
from eval.stack import check_stack
from neurons import adversaries
from neurons.chain import Chain, ChainError, InvalidSignature, InvalidWrite, NotPermitted
from neurons.commitment import encode_commitment, parse_commitment
from neurons.logs import event
from neurons.metrics import BackgroundApp, Registry, metrics_app
from neurons.shutdown import Interrupted, stop_on_signals
from neurons import storage  # storage.stage / .release through the module: tests stand failures in
from quasar_model.atomic import write_atomic

log = logging.getLogger("miner")


@dataclass
class MinerSettings:
    work_dir: Path
    distill_config: str | None = None          # a distill config file (configs/*.json)
    overrides: list[str] = field(default_factory=list)
    steps_per_cycle: int = 50
    eval_seed: int = 1
    min_improvement: float = 0.0
    min_commit_interval_blocks: int = 0
    storage: str = "http"                      # http | local | hf
    host: str = "127.0.0.1"                    # bind address of the checkpoint server
    port: int = 0
    public_host: str | None = None             # what validators dial (default: host)
    storage_root: Path | None = None           # local storage (localnet)
    repo_id: str | None = None                 # hf storage
    hf_token: str | None = None
    device: str = "cpu"
    seal_blocks: int | None = None             # timelock commitments this long (None: half the eval delay; 0: off)
    copy_from: Path | None = None              # adversary: the victim miner's work directory
    adversary: str | None = None               # adversary: a neurons.adversaries.MAKERS kind (default "copy")
    serve_after_training: bool = True
    poll_seconds: float = 1.0
    progress: bool = False
    # a commit the chain failed (RPC error, a refusal that may pass) is retried after this many
    # seconds, doubling up to the cap; it stays `pending` in miner.json, so a restart finishes it too
    commit_retry_seconds: float = 2.0
    commit_retry_max_seconds: float = 300.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None            # Prometheus /metrics on this port (0: a free one); None: off


class Miner:
    def __init__(self, chain: Chain, keypair, competition: Competition, settings: MinerSettings):
        self.chain, self.keypair, self.competition, self.s = chain, keypair, competition, settings
        self.work_dir = Path(settings.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.work_dir / "miner.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {
            "best": None, "published": None, "commitment": None, "commit_block": None, "history": []}
        self.stop_event = threading.Event()
        self._abandonable = threading.Event()  # set while a stop signal may abandon the main thread's work
        self.server = None
        self.metrics_server = None
        self._validators: tuple[float, set[str]] = (0.0, set())
        self._init_metrics()

    def _init_metrics(self) -> None:
        m = self.metrics = Registry()
        self._step = m.gauge("quasar_miner_step", "training steps done")
        self._loss = m.gauge("quasar_miner_loss", "training loss of the latest step")
        self._self_score = m.gauge("quasar_miner_self_eval_score", "composite of the latest self-evaluation")
        self._best = m.gauge("quasar_miner_best_score", "composite of the best published checkpoint")
        self._commit_block = m.gauge("quasar_miner_last_commit_block", "block the latest commitment landed in (0: none)")
        self._commits = m.counter("quasar_miner_commits_total", "commitments landed since this process started")
        self._commit_failures = m.counter("quasar_miner_commit_failures_total",
                                          "commit attempts the chain failed or refused since this process started")
        self._commits.inc(0)  # a counter shows 0 before its first event, not nothing
        self._commit_failures.inc(0)
        self._commit_block.set(self.state.get("commit_block") or 0)  # after a restart: what miner.json says
        if self.state.get("best") is not None:
            self._best.set(self.state["best"])

    # ------------------------------------------------------------------ plumbing
    def install_signal_handlers(self) -> None:
        stop_on_signals(self.stop_event, log, abandonable=self._abandonable)

    def _save_state(self) -> None:
        write_atomic(self.state_path, json.dumps(self.state, indent=1))

    def _is_validator(self, hotkey: str) -> bool:
        """Registered with a validator permit; the metagraph is re-read at most every 12 s."""
        stamp, hotkeys = self._validators
        if time.monotonic() - stamp > 12:
            mg = self.chain.metagraph()
            hotkeys = {h for h, permit in zip(mg.hotkeys, mg.validator_permit) if permit}
            self._validators = (time.monotonic(), hotkeys)
        return hotkey in hotkeys

    def start_server(self) -> None:
        if self.s.storage != "http":
            return
        from neurons.serve import CheckpointServer  # here: it loads bittensor (~1 s), and only http storage serves

        self.server = CheckpointServer(self.keypair.ss58_address, self._is_validator, host=self.s.host,
                                       port=self.s.port, nonce_path=self.work_dir / "nonces.db").start()
        event(log, "serving", host=self.server.host, port=self.server.port)
        if self.state.get("published"):  # after a restart, keep serving what is committed
            self.server.register(self.state["token"], self.state["published"])

    def start_metrics_server(self) -> None:
        if self.s.metrics_port is None:
            return
        self.metrics_server = BackgroundApp(lambda: metrics_app(self.metrics), self.s.metrics_host,
                                            self.s.metrics_port, name="metrics").start()
        event(log, "metrics", url=self.metrics_server.url + "/metrics")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()

    # ------------------------------------------------------------------ publishing
    def _where(self, name: str) -> tuple[dict, dict]:
        """(where to stage the checkpoint `name`, what releasing it needs) for this miner's storage."""
        if self.s.storage == "http":
            return (dict(server=self.server, host=self.s.public_host or self.server.host, port=self.server.port),
                    dict(server=self.server))
        if self.s.storage == "local":
            return (dict(storage_root=self.s.storage_root, location=f"{self.keypair.ss58_address[:12]}/{name}"),
                    dict(storage_root=self.s.storage_root))
        return dict(repo_id=self.s.repo_id, hf_token=self.s.hf_token), dict(hf_token=self.s.hf_token)

    def _commit(self, data: str) -> int:
        """Commit `data`; the block it landed in. Sealed (timelocked) where the chain can: the
        commitment is unreadable until `seal_blocks` later, by copiers too."""
        seal = self.s.seal_blocks
        if seal is None:  # half the evaluation delay: no round could evaluate it sooner anyway
            seal = max(1, self.competition.schedule.eval_delay_blocks // 2)
        commit_sealed = getattr(self.chain, "commit_sealed", None)
        if seal > 0 and commit_sealed is not None:
            return commit_sealed(self.keypair, data, reveal_in_blocks=seal).block
        return self.chain.commit(self.keypair, data)

    def _commit_retrying(self, data: str) -> int | None:
        """`_commit`, retried with backoff while the chain fails (logged each time); None when stopped
        first. A refusal no retry can change (unregistered hotkey, bad signature, malformed
        commitment) is raised: the commitment stays pending in miner.json for a rerun."""
        delay, attempt = self.s.commit_retry_seconds, 0
        while True:
            attempt += 1
            try:
                return self._commit(data)
            except (NotPermitted, InvalidSignature, InvalidWrite) as e:
                self._commit_failures.inc()
                event(log, "commit refused", level=logging.ERROR, attempt=attempt, error=str(e),
                      pending=str(self.state_path))
                raise
            except ChainError as e:
                self._commit_failures.inc()
                event(log, "commit failed", level=logging.WARNING, attempt=attempt, error=str(e),
                      retry_in=round(delay, 3))
            if self.stop_event.wait(delay):
                return None
            delay = min(delay * 2, self.s.commit_retry_max_seconds)
            landed = self._landed(data)
            if landed is not None:  # the failed RPC had landed it after all: do not commit twice
                event(log, "commit had landed", block=landed)
                return landed

    def _landed(self, data: str) -> int | None:
        """The block of this hotkey's readable commitment when it is `data` (a plain commit whose RPC
        failed may have landed; a sealed one is unreadable until it opens and is simply sent again)."""
        try:
            record = self.chain.commitments().get(self.keypair.ss58_address)
        except ChainError:
            return None
        return record.block if record is not None and record.data == data else None

    def publish(self, export: Path, score: float | None) -> bool:
        """Stage `export` in storage, commit it, and make it readable only once the block the commitment
        landed in is closed. False when rate-limited or stopped first.

        The order is the defence against copiers: until the commitment has landed, nobody can read
        the weights (storage keeps them unreadable, the commitment binds a hash of them to this
        hotkey), so a copy can land at the earliest one block later, and a later commitment of the
        same model is a copy (eval.gates)."""
        last = self.state.get("commit_block")
        if last is not None and self.chain.block() - last < self.s.min_commit_interval_blocks:
            event(log, "commit deferred", blocks_since=self.chain.block() - last)
            return False
        target = self.work_dir / "published" / export.name
        if not target.exists():
            shutil.copytree(export, target)
        where, _ = self._where(export.name)
        commitment = storage.stage(target, self.s.storage, hotkey=self.keypair.ss58_address, **where)
        # recorded before committing: a restart finds it and commits and releases again (a second
        # commitment of the same model by this hotkey keeps the block of the first, neurons.validator)
        self.state["pending"] = dict(commitment=encode_commitment(commitment), published=str(target), score=score)
        self._save_state()
        return self._finish_pending()

    def _finish_pending(self) -> bool:
        pending = self.state["pending"]
        data, target, score = pending["commitment"], Path(pending["published"]), pending["score"]
        commitment = parse_commitment(data, localnet=True)
        block = self._commit_retrying(data)
        if block is None:
            return False  # stopped while retrying: still pending, the next start commits it
        while self.chain.block() <= block:  # until its block is closed: nothing else can land in it
            if self.stop_event.wait(min(self.s.poll_seconds, 0.25)):
                return False  # still pending: the next start commits and releases
        storage.release(commitment, target, **self._where(target.name)[1])
        previous = self.state.get("published")
        self.state.update(best=score, published=str(target), commitment=data, commit_block=block, pending=None,
                          token=commitment.revision if self.s.storage != "hf" else None)
        self.state["history"].append({"block": block, "score": score, "checkpoint": target.name})
        self._save_state()
        self._commits.inc()
        self._commit_block.set(block)
        if score is not None:
            self._best.set(score)
        event(log, "committed", block=block, score=score, commitment=data)
        if previous and previous != str(target):
            shutil.rmtree(previous, ignore_errors=True)
        return True

    # ------------------------------------------------------------------ training
    def _on_step(self, record: dict) -> None:
        self._step.set(record["step"])
        self._loss.set(record["loss"])

    def self_score(self, export: Path) -> float:
        from eval.evaluate import evaluate_checkpoint  # torch, as Trainer below
        from eval.scoring import composite

        result = evaluate_checkpoint(export, self.competition, self.s.eval_seed,
                                     cache_root=None, device=self.s.device,
                                     progress=self.s.progress)
        return composite(result.items, self.competition.score.weights)

    def train_loop(self) -> None:
        from distill.trainer import Trainer  # torch (seconds): `quasar --help` imports this module

        overrides = [f"output_dir={self.work_dir / 'train'}", f"checkpoint_every={self.s.steps_per_cycle}",
                     f"progress={str(self.s.progress).lower()}", *self.s.overrides]
        cfg = load_config(self.s.distill_config, overrides)
        trainer = Trainer(cfg)
        self._step.set(trainer.step)  # resumed from a checkpoint: not 0
        cycle = self.s.steps_per_cycle
        while not self.stop_event.is_set():
            # every cycle boundary (and the last step) is self-evaluated once, also after a restart
            # that stopped before or during its evaluation
            boundary = trainer.step == cfg.steps or (trainer.step > 0 and trainer.step % cycle == 0)
            if boundary and self.state.get("scored_step") != trainer.step and not self._score_and_publish(trainer):
                return  # stopped during the self-evaluation
            if trainer.step >= cfg.steps:
                break
            trainer.train(until=min((trainer.step // cycle + 1) * cycle, cfg.steps), should_stop=self.stop_event.is_set,
                          on_step=self._on_step)
            if self.stop_event.is_set() and trainer.step % cycle and trainer.step < cfg.steps:
                trainer.save_checkpoint()  # stopped between boundaries: a restart resumes at this very step
                event(log, "stopped training", step=trainer.step, checkpoint=str(trainer.latest_checkpoint()))

    def _score_and_publish(self, trainer) -> bool:
        """Export the trainer's model, self-evaluate it, publish it if it improves on the best; False
        when a stop signal abandoned the self-evaluation (nothing recorded: the next start redoes it)."""
        export = trainer.export(self.work_dir / "exports" / f"step-{trainer.step:07d}")
        try:
            self._abandonable.set()  # a stop signal raises Interrupted here instead of waiting for the end
            score = self.self_score(export)
        except Interrupted:
            shutil.rmtree(export, ignore_errors=True)
            event(log, "self-evaluation abandoned", step=trainer.step)
            return False
        finally:
            self._abandonable.clear()
        best = self.state.get("best")
        self._self_score.set(score)
        event(log, "self-evaluated", step=trainer.step, score=round(score, 5), best=best)
        if best is None or score > best + self.s.min_improvement:
            self.publish(export, score)
        self.state["scored_step"] = trainer.step
        self._save_state()
        if str(export) != self.state.get("published"):
            shutil.rmtree(export, ignore_errors=True)
        return True

    def _victim_checkpoint(self) -> Path | None:
        """The victim's published checkpoint once its commitment is on chain in an earlier block."""
        victim = Path(self.s.copy_from) / "miner.json"
        if not victim.exists():
            return None
        state = json.loads(victim.read_text())
        published, block = state.get("published"), state.get("commit_block")
        # an attacker can read a model only once its owner released it, after the commitment's
        # block closed, so its own lands in a later block
        if published and Path(published).exists() and block is not None and self.chain.block() > block:
            return Path(published)
        return None

    def adversary_loop(self) -> None:
        """Wait for the victim's published checkpoint (when the attack needs one), make the attack's
        checkpoint from it, publish it under this hotkey."""
        kind = self.s.adversary or "copy"
        make = adversaries.MAKERS[kind]
        while not self.stop_event.is_set():
            source = self._victim_checkpoint() if kind in adversaries.needs_victim else None
            if source is not None or kind not in adversaries.needs_victim:
                made = make(source, self.work_dir / "made" / (source.name if source else kind), self.competition)
                event(log, "adversary made", kind=kind, source=source and source.name)
                self.publish(made, None)
                return
            self.stop_event.wait(self.s.poll_seconds)

    def run(self) -> None:
        # validators refuse another stack; a miner may train on any, but its self-evaluation then
        # predicts their scores less exactly, so it is told
        stack = check_stack(self.competition.eval_stack, allow_mismatch=True)
        event(log, "stack", level=logging.WARNING if stack["mismatch"] else logging.INFO, **stack)
        self.start_server()
        try:
            self.start_metrics_server()
            if self.state.get("pending"):  # stopped between staging and releasing a checkpoint
                event(log, "finishing pending commitment", commitment=self.state["pending"]["commitment"],
                      checkpoint=self.state["pending"]["published"])
                self._finish_pending()
            if self.s.copy_from is not None or self.s.adversary is not None:
                if not self.state.get("published"):
                    self.adversary_loop()
            else:
                self.train_loop()
            while self.s.serve_after_training and not self.stop_event.is_set():
                self.stop_event.wait(self.s.poll_seconds)
        finally:
            self.stop()
