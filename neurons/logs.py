"""Structured logs: one JSON object per line (time, level, process role, event, fields).

Operators grep and ship these; a line is `log.info("event", extra={"fields": {...}})` or the
`event(log, name, **fields)` shorthand.
"""
from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out = {"t": round(time.time(), 3), "level": record.levelname.lower(), "role": self.role,
               "event": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(role: str, level: str = "INFO", stream=None) -> logging.Logger:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(role)


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields) -> None:
    log.log(level, name, extra={"fields": fields})
