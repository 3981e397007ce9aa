"""Structured logs (structlog): key=value on a terminal, JSON when FLYWHEEL_LOG_JSON=1."""
from __future__ import annotations

import logging
import os
import re
import sys
import traceback

import structlog

from flywheel.masking import mask_url

_configured = False


def configure_logging(level: str | None = None) -> None:
    global _configured
    if _configured:
        return
    level = (level or os.environ.get("FLYWHEEL_LOG_LEVEL", "INFO")).upper()
    json_logs = os.environ.get("FLYWHEEL_LOG_JSON", "0") == "1"
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _safe_exceptions,
            _mask_urls,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=_current_stderr,
    )
    _configured = True


_SQL_PARAMETERS = re.compile(r"^\[parameters: .*$", re.MULTILINE)


def _safe_exceptions(_logger, _method, event_dict: dict) -> dict:
    """A logged exception becomes a plain traceback: no local variables (the rich renderer
    would print them, the text being answered among them) and no database statement
    parameters (SQLAlchemy quotes them in its errors: message text, corrections)."""
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    elif not isinstance(exc_info, tuple):
        exc_info = sys.exc_info()
    if exc_info[0] is not None:
        text = "".join(traceback.format_exception(*exc_info))
        event_dict["exception"] = _SQL_PARAMETERS.sub("[parameters: hidden]", text)
    return event_dict


def _mask_urls(_logger, _method, event_dict: dict) -> dict:
    """No password of a connection URL in any log line, whoever logged it."""
    return {k: mask_url(v) if isinstance(v, str) else v for k, v in event_dict.items()}


def _current_stderr(*_args) -> structlog.PrintLogger:
    """A logger on whatever sys.stderr is now (a CLI runner or a test may have swapped it since
    logging was configured; writing to the old, closed stream would fail the command)."""
    return structlog.PrintLogger(file=sys.stderr)


def get_logger(name: str):
    configure_logging()
    return structlog.get_logger(name)


def describe_exception(exc: BaseException) -> str:
    """An exception as its type and where it was raised, without its message: messages can
    carry user text (a driver quoting a statement's parameters, a service echoing a request),
    and logs must never hold it."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    ours = [f for f in frames if "site-packages" not in f.filename and "/lib/python" not in f.filename]
    last = (ours or frames)[-1]  # the innermost line of our own code that led to it
    where = "/".join(last.filename.replace(os.sep, "/").split("/")[-2:])
    return f"{type(exc).__name__} at {where}:{last.lineno} in {last.name}"
