"""Structured logs: one JSON object per line (time, level, process role, event, fields).

Operators grep and ship these; a line is `log.info("event", extra={"fields": {...}})` or the
`event(log, name, **fields)` shorthand.

`setup` makes stderr carry nothing else: Python warnings and transformers' own logger (which
otherwise writes plain `[transformers] ...` lines through a handler of its own) go through the JSON
handler, and off a terminal the Hugging Face progress bars are off (ours report as `progress`
events instead: quasar_model.progress). The level comes from `--log-level` or bittensor's
`--logging.trace` / `--logging.debug` / `--logging.info` (`add_args`).
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
import time

TRACE = 5  # bittensor's --logging.trace: below DEBUG, and other libraries' debug lines too
logging.addLevelName(TRACE, "TRACE")
LEVELS = ("trace", "debug", "info", "warning", "error")
# this project's loggers: shown down to the chosen level; everyone else's debug lines (every
# connection, file lock, codec notice) only from --logging.trace on
OURS = ("miner", "validator", "neurons", "distill", "eval", "quasar_model", "progress")


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out = {"t": round(time.time(), 3), "level": record.levelname.lower(), "role": self.role,
               "event": record.getMessage()}
        if record.name not in (self.role, "root", "miner", "validator"):
            out["logger"] = record.name  # a library's line says whose it is
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def add_args(p: argparse.ArgumentParser) -> None:
    """`--log-level` and bittensor's `--logging.*` spellings, all setting `args.log_level`."""
    p.add_argument("--log-level", choices=LEVELS, default="info", help="log level (default: info)")
    for name in ("trace", "debug", "info"):
        p.add_argument(f"--logging.{name}", dest="log_level", action="store_const", const=name,
                       help=f"bittensor's spelling of --log-level {name}")


def setup(role: str, level: str = "info", stream=None) -> logging.Logger:
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; known: {', '.join(LEVELS)}")
    numeric = TRACE if level.lower() == "trace" else logging.getLevelName(level.upper())
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric if numeric <= TRACE else max(numeric, logging.INFO))
    for name in OURS:
        logging.getLogger(name).setLevel(numeric)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> one JSON line
    if not _is_tty(stream):
        # read by huggingface_hub when first imported: its download bars (and transformers', which
        # follow it) stay off; set here, before any of them is imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _when_imported("transformers.utils.logging", _adopt_transformers)
    return logging.getLogger(role)


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields) -> None:
    log.log(level, name, extra={"fields": fields})


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _adopt_transformers(module) -> None:
    """transformers' records go to the root (JSON) handler instead of its plain-text one; its
    weight-loading bars show on a terminal only."""
    module.disable_default_handler()
    module.enable_propagation()
    level = logging.getLogger().getEffectiveLevel()
    module.set_verbosity(level if level <= logging.DEBUG else max(level, logging.WARNING))  # its INFO is chatty
    if not _is_tty(sys.stderr):
        module.disable_progress_bar()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` once `name` has been imported: transformers configures its logger at
    import, and importing it only to reconfigure it would cost every command ~1 s."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_adopt(module) -> None:
            exec_module(module)
            callback(module)

        spec.loader.exec_module = exec_then_adopt
        return spec


def _when_imported(name: str, callback) -> None:
    if name in sys.modules:
        callback(sys.modules[name])
        return
    if not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))
