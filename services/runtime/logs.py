"""Logs, one line each: human-readable by default, one JSON object per line with BATON_LOG_FORMAT=json.

A JSON line has `time`, `level`, `service`, `logger`, `message`, and `task_id`/`event_id` while a
consumer handles an event (`log_context`), `error` for an exception, and the fields a line was
given as `extra={"fields": {...}}` (e.g. the consumer's `handled` lines at debug level, with
BATON_LOG_LEVEL=debug: which consumer handled which event at which stream sequence). Every line, in either
format, has a URL's credential (`scheme://user:password@`) masked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

LOG_FORMAT_VARIABLE = "BATON_LOG_FORMAT"
LOG_LEVEL_VARIABLE = "BATON_LOG_LEVEL"
_EVENT: ContextVar[tuple[str, str] | None] = ContextVar("baton_log_event", default=None)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s'\"]+@")


@contextmanager
def log_context(*, task_id: str, event_id: str) -> Iterator[None]:
    """Lines logged inside (and in tasks started inside) carry this task's and event's ids."""
    token = _EVENT.set((task_id, event_id))
    try:
        yield
    finally:
        _EVENT.reset(token)


def mask_credentials(text: str) -> str:
    """`text` with every URL's user part (where a credential goes) replaced by `***`."""
    return _URL_USERINFO.sub("***@", text)


class HumanFormatter(logging.Formatter):
    """`time level service logger: message [task=… event=…]`."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = _EVENT.get()
        if ids is not None:
            line += f" task={ids[0]} event={ids[1]}"
        return mask_credentials(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "service": self.service, "logger": record.name,
            "message": record.getMessage(),
        }
        ids = _EVENT.get()
        if ids is not None:
            line["task_id"], line["event_id"] = ids
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update({k: v for k, v in fields.items() if k not in line})
        return mask_credentials(json.dumps(line, ensure_ascii=False))


def formatter_for(service: str, log_format: str | None = None) -> logging.Formatter:
    """JSON when `log_format` (default: BATON_LOG_FORMAT) is `json`, else human-readable."""
    chosen = (log_format if log_format is not None else os.environ.get(LOG_FORMAT_VARIABLE, "")).lower()
    return JsonFormatter(service) if chosen == "json" else HumanFormatter(service)


def setup_logging(process: str, level: int | None = None) -> None:
    """Log to stderr at `level` (default: BATON_LOG_LEVEL, else info)."""
    if level is None:
        level = logging.getLevelName(os.environ.get(LOG_LEVEL_VARIABLE, "INFO").upper())
        level = level if isinstance(level, int) else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter (HTTP access lines, NATS reconnects) stays at warnings.
    for noisy in ("uvicorn.access", "httpx", "nats"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
