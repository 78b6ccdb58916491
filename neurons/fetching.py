"""A round's fetches: concurrent, bounded, under one deadline, each ending as a recorded outcome.

    fetch_round(jobs, ...) -> bool      every job accepted, rejected (stage, reason) or deferred;
                                        False only when stopped (SIGTERM) first

Per job (a hotkey's new commitment string):
  - grammar first; a bad commitment is rejected without a connection;
  - a model hash already accepted and still intact in the ModelStore is not downloaded again,
    only re-checked in place (a re-commit under an unfetchable location costs nothing);
  - otherwise fetched into a staging directory and moved to its hash's directory once accepted.

Why the round cannot be held: at most `concurrency` fetches run at once, each under the fetch's
own limits (rate floor, per-request and total deadlines), and all of them under one round
deadline. A fetch the deadline cuts off is rejected (it had its chance; deferring it would let
one slow server hold every round to the deadline); a fetch never started before the deadline,
or whose server could not be reached at all, is deferred to the next round (not recorded).
Anything else a fetch raises, expected or not, becomes that job's rejection.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import quasar_model

from .checks import check_submission
from .commitment import CommitmentRejected, parse_commitment
from .logs import event
from .manifest import SubmissionRejected
from .modelstore import ModelStore
from .state import Submission
from .storage import fetch_submission_async
from .storage.core import FetchLimits, SourceUnavailable

log = logging.getLogger("validator")


@dataclass(frozen=True)
class Job:
    hotkey: str
    data: str  # the commitment string as read from chain
    block: int


@dataclass(frozen=True)
class FetchSettings:
    limits: FetchLimits
    concurrency: int = 4
    round_deadline: float = 3600.0  # seconds for all of a round's fetches together
    localnet: bool = False
    storage_root: object = None
    hf_endpoint: str | None = None


class _Round:
    def __init__(self, store: ModelStore, settings: FetchSettings, accepted_hashes: Iterable[str], keypair,
                 record: Callable[[Submission], None], timed: Callable[[Submission | None, float], None] | None):
        self.store, self.s, self.keypair, self.record, self.timed = store, settings, keypair, record, timed
        self.accepted = set(accepted_hashes)

    def _rejected(self, job: Job, stage: str, reason: str) -> Submission:
        event(log, "rejected", level=logging.WARNING, hotkey=job.hotkey, stage=stage, reason=reason)
        return Submission(job.hotkey, job.data, None, job.block, "rejected", stage, reason, None)

    def _accepted(self, job: Job, model_hash: str, how: str) -> Submission:
        event(log, "accepted", hotkey=job.hotkey, model_hash=model_hash[:16], block=job.block, how=how)
        self.accepted.add(model_hash)
        return Submission(job.hotkey, job.data, model_hash, job.block, "accepted", None, None,
                          str(self.store.path(model_hash)))

    async def one(self, job: Job) -> Submission | None:
        """The job's outcome; None: defer to the next round."""
        try:
            commitment = parse_commitment(job.data, localnet=self.s.localnet)
        except CommitmentRejected as e:
            return self._rejected(job, "commitment", e.reason)
        known = [h for h in self.accepted if commitment.matches(h, job.hotkey)]
        for model_hash in known:
            path = await asyncio.to_thread(self.store.present, model_hash)
            if path is not None:  # the same bytes, hashed again just now: checked in place
                await asyncio.to_thread(check_submission, path, self.s.limits.student, commitment=commitment,
                                        hotkey=job.hotkey)
                return self._accepted(job, model_hash, "already stored")
        staging = self.store.staging()
        try:
            fetched = await fetch_submission_async(
                commitment, staging, limits=self.s.limits, keypair=self.keypair, miner_hotkey=job.hotkey,
                storage_root=self.s.storage_root, localnet=self.s.localnet, hf_endpoint=self.s.hf_endpoint)
            model_hash = fetched.submission.manifest.model_hash
            await asyncio.to_thread(self.store.put, staging, model_hash)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # whatever was not moved into place
        return self._accepted(job, model_hash, "fetched")

    async def guarded(self, job: Job, gate: asyncio.Semaphore, deadline: float) -> Submission | None:
        async with gate:
            loop = asyncio.get_running_loop()
            if loop.time() >= deadline:
                event(log, "fetch deferred: round deadline passed before it started", hotkey=job.hotkey)
                return None
            try:
                async with asyncio.timeout_at(deadline):
                    return await self.one(job)
            except SourceUnavailable as e:
                event(log, "unreachable, retried next round", level=logging.WARNING, hotkey=job.hotkey,
                      reason=e.reason)
                return None
            except SubmissionRejected as e:
                return self._rejected(job, e.stage, e.reason)
            except TimeoutError:
                return self._rejected(job, "fetch", f"not complete by the round's fetch deadline "
                                                    f"({self.s.round_deadline:g}s for all fetches)")
            except Exception as e:  # a bug or an environment failure is this job's, not the round's
                return self._rejected(job, "fetch", f"{type(e).__name__}: {str(e)[:200]}")


async def _run(jobs: list[Job], r: _Round, stop: threading.Event) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + r.s.round_deadline
    gate = asyncio.Semaphore(max(1, r.s.concurrency))

    async def job_task(job: Job) -> None:
        t0 = loop.time()
        outcome = await r.guarded(job, gate, deadline)
        if outcome is not None:
            r.record(outcome)  # at once: a kill later in the round keeps what finished
        if r.timed is not None:
            r.timed(outcome, loop.time() - t0)

    tasks = [asyncio.create_task(job_task(job)) for job in jobs]
    waiting = asyncio.ensure_future(asyncio.gather(*tasks))
    while not waiting.done():
        await asyncio.wait([waiting], timeout=0.2)
        if stop.is_set() and not waiting.done():
            for t in tasks:  # cancelled fetches record nothing and remove their staging directories
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return False
    waiting.result()
    return True


def fetch_round(jobs: Iterable[Job], store: ModelStore, settings: FetchSettings, *, keypair,
                accepted_hashes: Iterable[str], record: Callable[[Submission], None],
                stop: threading.Event, timed: Callable[[Submission | None, float], None] | None = None) -> bool:
    """Fetch every job; `record(submission)` is called once per accepted or rejected job, and
    `timed(submission or None when deferred, seconds)` once per job that ran (metrics)."""
    store.clean_staging()
    jobs = list(jobs)
    if jobs:
        # the checks run in worker threads, and transformers' lazy imports entered from several
        # threads at once can hand one a half-initialised module: the model library loads here first
        quasar_model.register()
    r = _Round(store, settings, accepted_hashes, keypair, record, timed)
    return asyncio.run(_run(jobs, r, stop))

