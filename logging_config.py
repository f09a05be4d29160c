"""Structured logging: one JSON object per line, with the current request id on every line."""

from __future__ import annotations

import logging
import os
import sys
from contextvars import ContextVar
from typing import TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

_HANDLER_NAME = "documents"
# The most of any client-controlled text (a path, a User-Agent) that a log line or an error
# detail repeats: an attacker's 20 MB header must not become a 20 MB line.
CLIENT_TEXT_MAX = 512

# Set by the request middleware; every line logged while serving the request carries it.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# LogRecord attributes that are plumbing, not context worth printing in console mode.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "color_message",
    "taskName",
}


class Outage:
    """A dependency's failures, logged once as they begin (`NAME.unavailable`) and once as they
    end (`NAME.available`): a line per failing call let a flood of probes, which spend no
    budget, write about 20 times what it sent while MongoDB was down."""

    def __init__(
        self, logger: logging.Logger, name: str, level: int = logging.WARNING, **fields: str
    ) -> None:
        self._logger, self._name, self._level, self._fields = logger, name, level, fields
        self._down = False

    def failed(self, error: str) -> None:
        if not self._down:
            self._down = True
            extra = {**self._fields, "error": error}
            self._logger.log(self._level, f"{self._name}.unavailable", extra=extra)

    def answered(self) -> None:
        if self._down:
            self._down = False
            self._logger.info(f"{self._name}.available", extra=self._fields)


def clip(text: str, limit: int = CLIENT_TEXT_MAX) -> str:
    """`text`, cut to `limit` characters with a marker saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


class RequestIdFilter(logging.Filter):
    """Stamp each record with the request id of the context that logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        if request_id is not None:
            record.request_id = request_id
        return True


class ConsoleFormatter(logging.Formatter):
    """`12:00:01 INFO  documents.api document.created document_id=...` for local work."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
        if request_id := getattr(record, "request_id", None):
            context = {"request_id": request_id, **context}
        if context:
            line += " " + " ".join(f"{k}={v!r}" for k, v in context.items())
        return line


def json_formatter() -> logging.Formatter:
    # orjson: the access line is written for every request, so its encoder is on the hot path.
    return OrjsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        # uvicorn adds an ANSI-coloured copy of its message; the plain one is enough.
        reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        rename_fields={"levelname": "level", "name": "logger"},
        # Each of several workers logs to the same stream: the pid says which wrote a line.
        static_fields={"pid": os.getpid()},
        timestamp=True,
    )


# uvicorn warns once per request it cannot parse or upgrade, before any budget applies: a flood
# of such heads would be as many lines. The server answers each (400, or the request goes on
# without the upgrade) and the line says nothing an operator can act on.
_PER_REQUEST_NOISE = (
    "Invalid HTTP request received.",
    "Unsupported upgrade request.",
    "No supported WebSocket library detected.",
)


def _drop_uvicorn_noise(record: logging.LogRecord) -> bool:
    # uvicorn repeats a failed start as a bare traceback message, then says it is exiting; the
    # lifespan has already logged that failure once, as one line (store.open_failed or
    # service.start_failed).
    message = str(record.msg)
    return not message.startswith(
        ("Traceback (most recent call last)", "Application startup failed", *_PER_REQUEST_NOISE)
    )


def configure_logging(
    level: str = "INFO", *, json_lines: bool = True, stream: TextIO | None = None
) -> None:
    """Route the root logger and uvicorn's loggers to one handler (stdout by default)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(json_formatter() if json_lines else ConsoleFormatter())
    handler.addFilter(RequestIdFilter())
    handler.set_name(_HANDLER_NAME)
    # The logging HOWTO's "Optimization" switches: no record needs its caller's frame, thread
    # or process (neither format prints them), and gathering them costs every log line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    # Replace our own handler from an earlier call; leave others (a test runner's) alone.
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    logging.getLogger("uvicorn.error").addFilter(_drop_uvicorn_noise)
    # Our middleware writes one access line per request; uvicorn's would be a second.
    logging.getLogger("uvicorn.access").disabled = True
    # pymongo logs every command with its documents at DEBUG: document bodies stay out.
    logging.getLogger("pymongo").setLevel(max(logging.INFO, root.level))
