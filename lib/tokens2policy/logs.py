"""Console logging for the ``t2p`` command, the stage runner and the Python API.

Everything in the package logs to loggers under ``tokens2policy`` (``logging.getLogger(__name__)``).
:func:`configure_logging` gives that tree one console handler: INFO and DEBUG lines on stdout, as printed
before (``[t2p] stage 2/7 embed: running``), WARNING and above on stderr with their level, so that a user error
stays the one ``t2p: error: ...`` line on stderr. The level comes from ``--log-level``, else the
``T2P_LOG_LEVEL`` environment variable, else INFO. Nothing here touches the root logger: an application that
configured its own logging keeps it (call :func:`configure_logging` only where tokens2policy owns the console).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

LOGGER = "tokens2policy"
LEVELS = ("debug", "info", "warning", "error")
ENV = "T2P_LOG_LEVEL"


class _ConsoleHandler(logging.Handler):
    """stdout below WARNING, stderr from WARNING; the streams are looked up at each record (pytest, notebooks and
    ``contextlib.redirect_stdout`` replace ``sys.stdout`` after the handler is made)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed stream must not take the pipeline down
            self.handleError(record)


class _Formatter(logging.Formatter):
    """INFO: the message as is; an error: ``t2p: error: ...``; other levels: ``[t2p] warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno < logging.ERROR:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno == logging.INFO:
            return message
        if record.levelno >= logging.ERROR:
            return f"t2p: error: {message}"
        return f"[t2p] {record.levelname.lower()}: {message}"


def resolve_level(level: Optional[str] = None) -> int:
    """``level`` (a name, any case), else ``$T2P_LOG_LEVEL``, else INFO; ValueError (one line) for an unknown name."""
    name = level if level is not None else os.environ.get(ENV) or "info"
    if str(name).lower() not in LEVELS:
        source = "--log-level" if level is not None else ENV
        raise ValueError(f"{source}={name!r}: choose one of {', '.join(LEVELS)}")
    return getattr(logging, str(name).upper())


def configure_logging(level: Optional[str] = None) -> logging.Logger:
    """Give the ``tokens2policy`` logger its console handler at ``level`` (idempotent) and return the logger."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(resolve_level(level))
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    handler = _ConsoleHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.propagate = False  # the console handler is the output; no second copy through the root logger
    return logger


def ensure_console_logging() -> None:
    """For the Python API: show the stage lines in a notebook unless the application gave the ``tokens2policy``
    logger a handler of its own (then its configuration is kept as it is)."""
    if not logging.getLogger(LOGGER).handlers:
        configure_logging()
