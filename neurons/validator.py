"""The validator: every cadence, one round of the spec, resumable at any instant.

    sync   round at sync block S = the last multiple of the cadence; seed = sha256(block hash of S)
    fetch  each registered hotkey's commitment, if new: parse, fetch, check (or a recorded rejection);
           eligible = the hotkey's latest accepted submission committed at or before S - eval delay
    eval   every eligible submission (the leader included, so it is re-scored on the same items);
           one stored result per hotkey, and a model hash already evaluated this round is reused
    score  gates, composite, leader/bootstrap, weights with the EMA (eval.scoring), stored at once
    set    weights on chain once the rate limit allows

State lives in `neurons.state.ValidatorState`; the phases make a restart redo only the phase the
kill interrupted. Submitted code is never run: checkpoints are data, the model is built by
`quasar_model` from a config that passed the bounds checks on the meta device.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from eval.budget import plan
from eval.competition import Competition
from eval.results import SubmissionResult
from eval.stack import check_stack
from neurons.chain import Chain, ChainError
from neurons.checks import StudentLimits
from neurons.fetching import FetchSettings, Job, fetch_round
from neurons.isolation import (EvalLimits, EvaluationFailed, EvaluationStopped, evaluate_isolated,
                               forks_from_zygote, save_round_inputs, start_zygote)
from neurons.logs import event
from neurons.metrics import Registry
from neurons.modelstore import ModelStore
from neurons.shutdown import stop_on_signals
from neurons.state import Round, Submission, ValidatorState
from neurons.storage.core import FetchLimits

log = logging.getLogger("validator")


def round_seed(block_hash: str) -> int:
    """Seed = sha256 of the sync block's hash (its raw bytes when hex), as a 63-bit integer."""
    h = block_hash[2:] if block_hash.startswith("0x") else block_hash
    try:
        raw = bytes.fromhex(h)
    except ValueError:
        raw = block_hash.encode()
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") >> 1


def student_limits(c: Competition) -> StudentLimits:
    s = c.student
    return StudentLimits(max_total_params=s.max_total_params, vocab_size=s.vocab_size, max_layers=s.max_layers,
                         max_hidden=s.max_hidden, allowed_model_type=s.model_type, max_loops=s.max_loops,
                         max_active_params=s.max_active_params(c.teacher.params),
                         max_eval_flops=c.budget.max_flops or None, eval_plan=tuple(plan(c)))


def label_results(stored: dict[str, tuple[str, dict]], commit_blocks: Mapping[str, int]) -> list:
    """Stored results (hotkey -> (model_hash, result dict)) as SubmissionResults naming their hotkey.

    A result reused for a second hotkey with the same weights names the first one (or none): re-label
    it, with the commit block of the hotkey's eligible submission (the stored one when unknown)."""
    return [dataclasses.replace(SubmissionResult.from_dict(raw), hotkey=hotkey, model_hash=model_hash,
                                commit_block=commit_blocks.get(hotkey, raw["commit_block"]))
            for hotkey, (model_hash, raw) in sorted(stored.items())]


def score_results(state: ValidatorState, r: Round, results: list, registered: Iterable[str],
                  uid_of: Callable[[str], int | None], competition: Competition, prior_ema: Mapping[str, float]):
    """(ranking, new EMA, score rows) of round `r` from its labelled results: the score phase's rule.

    The ranking's other inputs come from the state: the leader of the last finished round before `r`
    and every model hash's first commit block. Fingerprints are compared only within `r` (each round
    draws its own probes). Shared with the offline replay (neurons.replay) so a replayed round is
    ranked by exactly this code."""
    from eval.scoring import axis_means, ema_from_scores, round_ranking  # torch: `quasar --help` imports this module

    # while `r` is being scored it is the newest round, so this is state.last_round(); a replay of an
    # older round must not see the leaders of rounds that came after it
    previous = next((x for x in reversed(state.rounds()) if x.id < r.id and x.phase == "done"), None)
    first_blocks = state.first_commit_blocks()
    spec, schedule = competition.score, competition.schedule
    ranking = round_ranking(results, spec, r.seed, leader_hash=None if previous is None else previous.leader_hash,
                            first_blocks=first_blocks)
    ema = ema_from_scores(ranking, schedule.weights_top_k, spec.ema_alpha, prior_ema, registered=registered)
    by_hotkey = {x.hotkey: x for x in results}
    scores = [dict(hotkey=e.hotkey, uid=uid_of(e.hotkey), model_hash=e.model_hash, composite=e.composite,
                   gate=e.gate, rank=i + 1, axes={**axis_means(by_hotkey[e.hotkey].items), "gate_reason": e.reason,
                                                  "lower_bound": e.lower_bound})
              for i, e in enumerate(ranking.entries)]
    return ranking, ema, scores


@dataclass
class ValidatorSettings:
    work_dir: Path
    device: str = "cpu"
    localnet: bool = False
    storage_root: Path | None = None     # where `local` commitments point (localnet)
    hf_endpoint: str | None = None
    poll_seconds: float = 2.0
    read_timeout: float = 60.0
    total_timeout: float = 3600.0        # one fetch
    fetch_deadline: float = 3600.0       # all of a round's fetches together
    fetch_concurrency: int = 4
    min_rate: float = 256 << 10          # bytes/s a fetch must average after `rate_grace` seconds
    rate_grace: float = 15.0
    disk_budget_bytes: int | None = 500 << 30  # stored checkpoints no round needs are evicted past this
    progress: bool = False
    # wall-clock seconds one submission's evaluation may take; None: the competition's budget.seconds
    # (sized for its reference GPU) times eval_time_scale
    eval_timeout: float | None = None
    eval_time_scale: float = 1.0          # this machine's slowness against the competition's reference GPU
    eval_memory_bytes: int | None = None  # CPU evaluation's address-space cap; None: 80% of physical memory
    kernel_backend: str = "auto"          # the validator's, never the checkpoint's
    # evaluations of one model in a round that may end with the validator dead (killed, OOM, host
    # crash) before it is rejected; a stop by SIGTERM does not count
    max_eval_attempts: int = 2
    allow_stack_mismatch: bool = False   # score on library versions other than the competition's eval_stack
    # a chain error (dropped connection, RPC failure, a refused write) inside a round is logged and the
    # round retried from its stored phase after poll_seconds, doubling up to this cap
    chain_retry_max_seconds: float = 300.0

    def __post_init__(self):
        if self.fetch_concurrency < 1:
            raise ValueError(f"fetch concurrency must be at least 1, not {self.fetch_concurrency}")
        if not self.fetch_deadline > 0:
            raise ValueError(f"the round's fetch deadline must be positive seconds, not {self.fetch_deadline}")
        if self.disk_budget_bytes is not None and self.disk_budget_bytes < 0:
            raise ValueError(f"the disk budget must be >= 0 bytes, not {self.disk_budget_bytes}")
        if self.max_eval_attempts < 1:
            raise ValueError(f"max_eval_attempts must be at least 1, not {self.max_eval_attempts}")
        if self.eval_timeout is not None and not self.eval_timeout > 0:
            raise ValueError(f"the evaluation timeout must be positive seconds, not {self.eval_timeout}")
        if not (self.eval_time_scale > 0 and math.isfinite(self.eval_time_scale)):
            raise ValueError(f"the evaluation time scale must be a positive number, not {self.eval_time_scale}")
        if self.eval_memory_bytes is not None and self.eval_memory_bytes < 1 << 30:
            raise ValueError(f"the evaluation memory cap must be at least 1 GiB, not {self.eval_memory_bytes} bytes")


class Validator:
    def __init__(self, chain: Chain, keypair, competition: Competition, settings: ValidatorSettings,
                 evaluate=None):
        self.chain, self.keypair, self.competition, self.settings = chain, keypair, competition, settings
        if not settings.localnet and competition.unpinned():
            raise ValueError(f"competition {competition.name!r} is not pinned for a real network: "
                             + "; ".join(competition.unpinned())
                             + " (the subnet owner pins them; localnet alone runs unpinned files)")
        # before any state exists: a validator on another stack would score differently from the others
        self.stack = check_stack(competition.eval_stack, allow_mismatch=settings.allow_stack_mismatch)
        event(log, "stack", level=logging.WARNING if self.stack["mismatch"] else logging.INFO, **self.stack)
        self.work_dir = Path(settings.work_dir)
        self.state = ValidatorState(self.work_dir / "validator.db")
        self.store = ModelStore(self.work_dir / "submissions")
        self.stop_event = threading.Event()
        self._evaluate = evaluate or self._evaluate_checkpoint
        self._round_inputs = None
        self._waiting_for: int | None = None
        self.metrics = Registry()  # durations and chain errors; the rest is read from the state (neurons.status)
        self._fetch_seconds = self.metrics.histogram(
            "quasar_validator_fetch_seconds", "one commitment's fetch and checks, by outcome")
        self._eval_seconds = self.metrics.histogram(
            "quasar_validator_eval_seconds", "one submission's evaluation, by outcome")
        self._phase_seconds = self.metrics.histogram("quasar_validator_phase_seconds", "one round phase, start to end")
        self._chain_errors = self.metrics.counter("quasar_validator_chain_errors_total",
                                                  "chain errors a round survived (retried after a backoff)")
        self._chain_errors.inc(0)  # 0, not absent, until the first one
        event(log, "eval_timeout", seconds=self.eval_timeout,
              source="--eval-timeout" if settings.eval_timeout is not None else
              f"budget.seconds {competition.budget.seconds:g} x --eval-time-scale {settings.eval_time_scale:g}")

    # ----------------------------------------------------------------- driving
    def install_signal_handlers(self) -> None:
        stop_on_signals(self.stop_event, log)

    def sync_block(self) -> int:
        cadence = self.competition.schedule.cadence_blocks
        return (self.chain.block() // cadence) * cadence

    def next_round(self) -> Round | None:
        """The round to work on: an unfinished one (after a restart), or a new one when a cadence passed."""
        r = self.state.unfinished_round()
        if r is not None:
            return r
        sync = self.sync_block()
        last = self.state.last_round(done_only=False)
        if sync <= 0 or (last is not None and sync <= last.sync_block):
            upcoming = sync + self.competition.schedule.cadence_blocks
            if upcoming != self._waiting_for:  # once per cadence, not once per poll
                self._waiting_for = upcoming
                event(log, "waiting for the next round", level=logging.DEBUG, sync_block=upcoming)
            return None
        block_hash = self.chain.block_hash(sync)
        return self.state.open_round(sync, block_hash, round_seed(block_hash), self.competition.digest, self.stack)

    def run(self, max_rounds: int | None = None) -> int:
        """Run rounds until stopped (SIGTERM) or `max_rounds` rounds scored something; returns that count.

        A round with no eligible submission still closes (nothing to weigh) but is not counted.

        A chain error does not end it: the error is logged, and after a backoff (poll_seconds,
        doubling up to chain_retry_max_seconds, reset by the next success) the round continues from
        the phase its state stored; a weights write whose outcome was unknown is read back before it
        is sent again (_weights_phase)."""
        done, failures = 0, 0
        while not self.stop_event.is_set() and (max_rounds is None or done < max_rounds):
            try:
                r = self.next_round()
                if r is None:
                    failures = 0
                    self.stop_event.wait(self.settings.poll_seconds)
                    continue
                if self.run_round(r) and self.state.scores(r.id):
                    done += 1
                failures = 0
            except ChainError as e:
                failures += 1
                self._chain_errors.inc()
                wait = min(self.settings.poll_seconds * 2 ** (failures - 1), self.settings.chain_retry_max_seconds)
                unfinished = self.state.unfinished_round()
                event(log, "chain error", level=logging.WARNING, error=f"{type(e).__name__}: {e}", failures=failures,
                      retry_in=round(wait, 3), round=unfinished and unfinished.id, phase=unfinished and unfinished.phase)
                self.stop_event.wait(wait)
        return done

    def run_round(self, r: Round) -> bool:
        """Carry `r` from its stored phase to `done`; False if stopped first."""
        event(log, "round", id=r.id, sync_block=r.sync_block, seed=r.seed, phase=r.phase)
        if self._evaluate == self._evaluate_checkpoint and forks_from_zygote(self.settings.device):
            start_zygote()  # CPU evaluations fork from it (neurons.isolation)
        steps = {"fetch": self._fetch_phase, "evaluate": self._evaluate_phase, "score": self._score_phase,
                 "weights": self._weights_phase}
        while r.phase != "done":
            if self.stop_event.is_set():
                return False
            t0 = time.monotonic()
            if not steps[r.phase](r):
                return False
            self._phase_seconds.observe(time.monotonic() - t0, phase=r.phase)
            r = self.state.round(r.id)
        event(log, "round done", id=r.id, leader=r.leader)
        return True

    # ------------------------------------------------------------------ phases
    def _fetch_phase(self, r: Round) -> bool:
        registered = set(self.chain.metagraph().hotkeys)
        jobs = [Job(hotkey, rec.data, rec.block) for hotkey, rec in sorted(self.chain.commitments().items())
                if hotkey in registered and hotkey != self.keypair.ss58_address
                and self.state.submission(hotkey, rec.data) is None]
        st = self.settings
        limits = FetchLimits(student=student_limits(self.competition), read_timeout=st.read_timeout,
                             total_timeout=st.total_timeout, min_rate=st.min_rate,
                             rate_grace=st.rate_grace)
        settings = FetchSettings(limits, concurrency=st.fetch_concurrency, round_deadline=st.fetch_deadline,
                                 localnet=st.localnet, storage_root=st.storage_root, hf_endpoint=st.hf_endpoint)
        accepted = [s.model_hash for s in self.state.submissions("accepted")]
        if not fetch_round(jobs, self.store, settings, keypair=self.keypair, accepted_hashes=accepted,
                           record=lambda s: self.state.record_submission(r.id, s), stop=self.stop_event,
                           timed=lambda s, seconds: self._fetch_seconds.observe(
                               seconds, outcome="deferred" if s is None else s.status)):
            return False
        removed = self.store.evict(self._needed_hashes(r), st.disk_budget_bytes)
        if removed:
            event(log, "evicted", model_hashes=[h[:16] for h in removed])
        self.state.set_phase(r.id, "evaluate")
        return True

    def _needed_hashes(self, r: Round) -> set[str]:
        """Checkpoints a round may still read: every registered hotkey's eligible submission and
        any newer accepted one (eligible in a later round), this round's, and the last leader's."""
        cutoff = r.sync_block - self.competition.schedule.eval_delay_blocks
        needed = {s.model_hash for s in self.eligible(r).values()}
        registered = set(self.chain.metagraph().hotkeys)
        needed |= {s.model_hash for s in self.state.submissions("accepted")
                   if s.hotkey in registered and s.commit_block > cutoff}
        needed |= set(self.state.round_model_hashes(r.id))
        last = self.state.last_round()
        if last is not None and last.leader_hash:
            needed.add(last.leader_hash)
        return needed

    def eligible(self, r: Round) -> dict[str, Submission]:
        """hotkey -> its latest accepted submission old enough for this round, for registered hotkeys."""
        cutoff = r.sync_block - self.competition.schedule.eval_delay_blocks
        registered = set(self.chain.metagraph().hotkeys)
        out: dict[str, Submission] = {}
        for s in self.state.submissions("accepted"):  # ordered by commit block: later ones win
            if s.hotkey in registered and s.commit_block <= cutoff:
                out[s.hotkey] = s
        return out

    def _evaluate_phase(self, r: Round) -> bool:
        # a failed evaluation rejects that submission, which can make the hotkey's previous accepted
        # one eligible: go on until every eligible hotkey has a result
        while True:
            done = self.state.results(r.id)
            pending = sorted((h, s) for h, s in self.eligible(r).items() if h not in done)
            if not pending:
                break
            if self._evaluate == self._evaluate_checkpoint:
                # the validator's own inputs (teacher, data) first: their failure is not a submission's
                self._round_inputs_file(r.seed)
            by_hash = {m: res for m, res in done.values()}
            for hotkey, s in pending:
                if self.stop_event.is_set():
                    return False
                result = by_hash.get(s.model_hash)
                if result is None:  # the same weights score the same on the same seed: evaluate once
                    try:
                        result = self._evaluate_submission(r, s)
                    except EvaluationStopped:
                        return False
                    if result is None:
                        continue
                self.state.save_result(r.id, hotkey, s.model_hash, result)
                by_hash[s.model_hash] = result
        self.state.set_phase(r.id, "score")
        return True

    def _evaluate_submission(self, r: Round, s: Submission) -> dict | None:
        """The result, or None after recording the submission's rejection (stage "evaluate")."""
        limit = self.settings.max_eval_attempts
        if self.state.start_eval_attempt(r.id, s.model_hash) > limit:
            reason = f"the validator process died during its evaluation {limit} times"
        else:
            t0 = time.time()
            try:
                result = self._evaluate(Path(s.path), r.seed, s.model_hash)
                event(log, "evaluated", hotkey=s.hotkey, model_hash=s.model_hash[:16],
                      seconds=round(time.time() - t0, 1))
                self._eval_seconds.observe(time.time() - t0, outcome="scored")
                return result
            except EvaluationStopped:
                self.state.cancel_eval_attempt(r.id, s.model_hash)
                raise
            except EvaluationFailed as e:
                reason = e.reason
            except Exception as e:  # an in-process evaluator (tests, tools): still that submission's failure
                reason = EvaluationFailed(f"{type(e).__name__}: {e}").reason
            self._eval_seconds.observe(time.time() - t0, outcome="rejected")
        self.state.reject_submission(s.hotkey, s.commitment, "evaluate", reason)
        event(log, "rejected", level=logging.WARNING, hotkey=s.hotkey, stage="evaluate", reason=reason)
        return None

    def _evaluate_checkpoint(self, path: Path, seed: int, model_hash: str) -> dict:
        """Each submission in a child process (neurons.isolation) on round inputs built once per seed."""
        return evaluate_isolated(path, self._round_inputs_file(seed), model_hash, device=self.settings.device,
                                 limits=self._eval_limits(), stop=self.stop_event)

    def _round_inputs_file(self, seed: int) -> Path:
        from eval.evaluate import prepare_round  # torch, as eval.scoring above

        path = self.work_dir / "rounds" / f"inputs-{seed % (1 << 64):016x}.pt"
        if self._round_inputs != path or not path.exists():
            inputs = prepare_round(self.competition, seed, cache_root=None,  # shared, content-addressed
                                   device=self.settings.device, progress=self.settings.progress,
                                   hf_endpoint=self.settings.hf_endpoint)
            for old in path.parent.glob("inputs-*.pt"):  # one round's inputs on disk at a time
                old.unlink(missing_ok=True)
            save_round_inputs(inputs, path)
            self._round_inputs = path
        return path

    @property
    def eval_timeout(self) -> float:
        """Seconds one submission's evaluation may take: the operator's --eval-timeout, else the
        competition's budget.seconds (its reference GPU) times --eval-time-scale."""
        if self.settings.eval_timeout is not None:
            return self.settings.eval_timeout
        return self.competition.budget.seconds * self.settings.eval_time_scale

    def _eval_limits(self) -> EvalLimits:
        memory = self.settings.eval_memory_bytes
        if memory is None:
            memory = int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        return EvalLimits(timeout=self.eval_timeout, memory_bytes=memory,
                          kernel_backend=self.settings.kernel_backend)

    def _score_phase(self, r: Round) -> bool:
        subs = self.eligible(r)
        # a hotkey re-committing its own weights (a new location) keeps the block it first committed
        # them at: the re-commit must not turn it into a later copy of itself
        first = self.state.first_commit_blocks_by_hotkey()
        results = label_results(self.state.results(r.id),
                                {h: first.get((h, s.model_hash), s.commit_block) for h, s in subs.items()})
        metagraph = self.chain.metagraph()
        ranking, ema, scores = score_results(self.state, r, results, metagraph.hotkeys, metagraph.uid_of,
                                             self.competition, self.state.ema())
        leader = ranking.leader
        self.state.finish_scoring(r.id, scores, ema, leader and leader.hotkey, leader and leader.model_hash)
        event(log, "scored", id=r.id, leader=leader and leader.hotkey,
              scores={s["hotkey"][:8]: [round(s["composite"], 4), s["gate"]] for s in scores})
        return True

    def _weights_phase(self, r: Round) -> bool:
        from eval.scoring import normalized  # torch, as above

        weights = dict(sorted(normalized(self.state.ema(), self.chain.metagraph().uid_of).items()))
        if not weights:
            event(log, "no weights to set", id=r.id)
            self.state.record_weights(r.id, self.chain.block(), {}, False)
            return True
        me = self.keypair.ss58_address
        while not self.stop_event.is_set():
            last = self.chain.last_weights_block(me)
            block = self.chain.block()
            recorded = self.state.last_weights_block()
            if last is not None and last >= r.sync_block and (recorded is None or last > recorded):
                # killed between the chain accepting the weights and recording it: do not send twice
                self.state.record_weights(r.id, last, weights, True)
                return True
            if last is None or block - last >= self.chain.weights_rate_limit():
                ok = self.chain.set_weights(self.keypair, list(weights), list(weights.values()))
                if ok:
                    self.state.record_weights(r.id, block, weights, True)
                    event(log, "weights set", id=r.id, block=block, weights={str(k): round(v, 4) for k, v in weights.items()})
                    return True
            self.stop_event.wait(self.settings.poll_seconds)
        return False
