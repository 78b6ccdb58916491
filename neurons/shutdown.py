"""Clean shutdown shared by the long-running neurons: SIGTERM/SIGINT set a stop event (and log it),
and the loops stop at their next check instead of dying mid-write."""
from __future__ import annotations

import logging
import signal
import threading

from neurons.logs import event


def stop_on_signals(stop_event: threading.Event, log: logging.Logger) -> None:
    def on_term(signum, frame):
        event(log, "shutdown requested", signal=signal.Signals(signum).name)
        stop_event.set()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
