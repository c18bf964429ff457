"""Logging set-up: text or JSON lines, each carrying the session id it was logged for.

The session id travels in a context variable: :meth:`SessionManager.create` sets it in the
task that opens a session, and the session's own tasks (pacer, producer, sender) are
created from there, so they inherit it. A filter on the handler copies it into every record
(``-`` outside a session), so a log line can be joined with the client's ``session_id``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

#: the session the current task works for (None: none)
session_id_var: ContextVar[str | None] = ContextVar("session_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(session_id)s]: %(message)s"


class SessionIdFilter(logging.Filter):
    """Adds ``record.session_id`` from :data:`session_id_var` (``-`` outside a session)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session_id"):
            record.session_id = session_id_var.get() or "-"
        return True


def _session_id(record: logging.LogRecord) -> str | None:
    sid = getattr(record, "session_id", None) or session_id_var.get()
    return None if sid == "-" else sid


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, session_id (null outside a
    session), and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
            "session_id": _session_id(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def make_handler(log_format: str, stream: Any = None) -> logging.Handler:
    """A stream handler (stderr by default) in ``log_format`` ("text" or "json")."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(SessionIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str, log_format: str) -> None:
    """Route the root logger (and uvicorn's, which then propagate) through one handler."""
    root = logging.getLogger()
    root.handlers[:] = [make_handler(log_format)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
