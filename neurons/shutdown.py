"""Clean shutdown shared by the long-running neurons.

The first SIGTERM/SIGINT sets a stop event (and logs it), and the loops stop at their next check
instead of dying mid-write; while the main thread does work that may be abandoned (`abandonable`
set: the miner's self-evaluation), it also raises `Interrupted` there. A second signal exits at
once (status 128 + signal): a supervisor's or an operator's second request is not for waiting.
Every state file is written atomically (temp + rename), so an immediate exit leaves none half-written.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

from neurons.logs import event


class Interrupted(BaseException):
    """Raised in the main thread by a stop signal while `abandonable` was set (not an Exception: no
    `except Exception` on the way up may swallow it)."""


def stop_on_signals(stop_event: threading.Event, log: logging.Logger,
                    abandonable: threading.Event | None = None) -> None:
    def on_term(signum, frame):
        name = signal.Signals(signum).name
        if stop_event.is_set():
            event(log, "second signal: exiting now", signal=name)
            sys.stderr.flush()
            os._exit(128 + signum)
        event(log, "shutdown requested", signal=name)
        stop_event.set()
        if abandonable is not None and abandonable.is_set():
            raise Interrupted(name)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)


def die_with_parent(sig: int = signal.SIGTERM):
    """A `preexec_fn` for subprocess.Popen: the child gets `sig` when the process that started it
    dies, however it dies (SIGKILL included), so a supervisor's children never outlive it (Linux;
    elsewhere a no-op)."""
    parent = os.getpid()

    def preexec() -> None:
        if sys.platform.startswith("linux"):
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
            if os.getppid() != parent:  # the parent died before the line above took effect
                os._exit(1)
    return preexec
