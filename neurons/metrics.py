"""Prometheus metrics: the text exposition format (version 0.0.4), written here, and a small HTTP
server for it.

    registry = Registry()
    steps = registry.gauge("quasar_miner_step", "training steps done")
    steps.set(120)
    fetch = registry.histogram("quasar_validator_fetch_seconds", "one submission's fetch", BUCKETS)
    fetch.observe(3.2, outcome="accepted")
    registry.render()  # "# HELP ...\\n# TYPE ...\\nquasar_miner_step 120.0\\n..."

The neuron's thread sets values, the server's thread renders them: every family holds the
registry's lock for both. `BackgroundApp` runs an aiohttp app on its own event loop in a daemon
thread (the validator's status server and the miner's metrics server), so neither neuron's loop
has to adopt asyncio.
"""
from __future__ import annotations

import asyncio
import math
import re
import threading
from typing import Callable

from aiohttp import web

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: a local copy, a fast fetch, a tiny evaluation ... an hour-long sn24 evaluation
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape(text: str) -> str:
    # label values are whatever a chain or a miner wrote (hotkeys, stages): backslash, quote and
    # newline escaped, as the format asks, so none can end the value or the line early
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _key(labels: dict) -> tuple[tuple[str, str], ...]:
    for k in labels:
        if not _LABEL.fullmatch(k) or k == "le":
            raise ValueError(f"bad label name {k!r}")
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


class Family:
    """One metric name: a value (gauge, counter) or buckets (histogram) per label set."""

    def __init__(self, name: str, help: str, kind: str, lock: threading.Lock, buckets: tuple[float, ...] = ()):
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad metric name {name!r}")
        self.name, self.help, self.kind, self._lock = name, help, kind, lock
        self.buckets = tuple(sorted(buckets))
        self._values: dict[tuple, float | list] = {}

    def set(self, value: float, **labels) -> None:
        with self._lock:
            self._values[_key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels) -> None:
        if amount < 0 and self.kind == "counter":
            raise ValueError("a counter only goes up")
        with self._lock:
            key = _key(labels)
            self._values[key] = self._values.get(key, 0.0) + float(amount)

    def observe(self, value: float, **labels) -> None:
        with self._lock:
            key = _key(labels)
            counts = self._values.setdefault(key, [0] * len(self.buckets) + [0, 0.0])  # buckets, count, sum
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            counts[-2] += 1
            counts[-1] += float(value)

    def clear(self) -> None:
        """Forget every label set (per-hotkey values of a round that is no longer the latest)."""
        with self._lock:
            self._values.clear()

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}",
               f"# TYPE {self.name} {self.kind}"]
        for key, v in sorted(self._values.items()):
            if self.kind != "histogram":
                out.append(f"{self.name}{_labels(key)} {_value(v)}")
                continue
            for bound, n in zip(self.buckets, v):
                out.append(f"{self.name}_bucket{_labels(key + (('le', _value(bound)),))} {n}")
            out.append(f"{self.name}_bucket{_labels(key + (('le', '+Inf'),))} {v[-2]}")
            out.append(f"{self.name}_count{_labels(key)} {v[-2]}")
            out.append(f"{self.name}_sum{_labels(key)} {_value(v[-1])}")
        return out


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, Family] = {}

    def _family(self, name: str, help: str, kind: str, buckets: tuple[float, ...] = ()) -> Family:
        with self._lock:
            f = self._families.get(name)
            if f is None:
                f = self._families[name] = Family(name, help, kind, self._lock, buckets)
            elif f.kind != kind:
                raise ValueError(f"metric {name} is a {f.kind}, not a {kind}")
            return f

    def gauge(self, name: str, help: str) -> Family:
        return self._family(name, help, "gauge")

    def counter(self, name: str, help: str) -> Family:
        """Counter names end in _total, as the format's convention wants."""
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} should end in _total")
        return self._family(name, help, "counter")

    def histogram(self, name: str, help: str, buckets: tuple[float, ...] = DURATION_BUCKETS) -> Family:
        return self._family(name, help, "histogram", buckets)

    def render(self) -> str:
        with self._lock:
            lines = [line for f in self._families.values() for line in f.lines()]
        return "\n".join(lines) + "\n"


def metrics_handler(render: Callable[[], str]):
    """GET /metrics: `render()`'s text in the exposition format."""
    async def handle(request: web.Request) -> web.Response:
        text = render()
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"})
    return handle


def metrics_app(registry: Registry) -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry.render))
    return app


class BackgroundApp:
    """An aiohttp app on its own event loop in a daemon thread. `build()` runs in that thread (a
    SQLite connection it opens belongs there); `start()` returns once the port is bound."""

    def __init__(self, build: Callable[[], web.Application], host: str = "127.0.0.1", port: int = 0,
                 name: str = "http"):
        self.build, self.host, self.port = build, host, port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._runner: web.AppRunner | None = None
        self._error: BaseException | None = None

    def _run(self):
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = web.AppRunner(self.build(), access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            self._loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())

    def start(self):
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"{self._thread.name} server could not listen on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
