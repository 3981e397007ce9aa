"""Structured logs (structlog): key=value on a terminal, JSON when FLYWHEEL_LOG_JSON=1."""
from __future__ import annotations

import logging
import os
import sys

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
            _mask_urls,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=_current_stderr,
    )
    _configured = True


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
