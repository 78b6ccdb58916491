"""Progress of long work: a tqdm bar on a terminal, `progress` log records anywhere else.

A bar redraws with carriage returns, which turns a log file or a journal into noise, so off a
terminal the same calls log one record every `QUASAR_PROGRESS_SECONDS` (default 30) and one at
the end, through the standard `logging` module (the neurons' JSON handler formats them). Off
entirely when `enabled` is False (`--quiet`).

    bar = progress_bar(total=n, desc="distill", unit="step", enabled=progress)
    for ...: bar.update(1); bar.set_postfix(loss=...)
    bar.close()
"""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("progress")


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("QUASAR_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


class LogProgress:
    """tqdm's `update` / `set_postfix` / `close` / iteration, reported as log records."""

    def __init__(self, iterable=None, *, total: int | None = None, initial: int = 0, desc: str = "",
                 unit: str = "it", interval: float | None = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.interval = _interval() if interval is None else interval
        self.postfix: dict = {}
        self._start_n, self._t0 = initial, time.monotonic()
        self._last = self._t0
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    @staticmethod
    def write(text: str) -> None:
        """A line for the reader (stdout), as tqdm.write prints it above a bar."""
        print(text, flush=True)

    def set_postfix(self, **fields) -> None:
        self.postfix = fields

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._report(now, done=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._report(time.monotonic(), done=True)

    def _report(self, now: float, done: bool) -> None:
        elapsed = now - self._t0
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else None
        fields = {"desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit,
                  "elapsed_s": round(elapsed, 1), "rate": rate and round(rate, 3), "done": done, **self.postfix}
        if self.total and rate and not done:
            fields["eta_s"] = round(max(0, self.total - self.n) / rate, 1)
        log.info("progress", extra={"fields": fields})


class _Off(LogProgress):
    def _report(self, now: float, done: bool) -> None:
        pass


def progress_bar(iterable=None, *, total: int | None = None, initial: int = 0, desc: str = "", unit: str = "it",
                 enabled: bool = True, leave: bool = True, stream=None):
    """A tqdm bar when `enabled` and `stream` (stderr) is a terminal, else LogProgress (or nothing)."""
    stream = stream or sys.stderr
    if not enabled:
        return _Off(iterable, total=total, initial=initial, desc=desc, unit=unit)
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if tty:
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                    file=stream)
    return LogProgress(iterable, total=total, initial=initial, desc=desc, unit=unit)
