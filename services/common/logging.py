"""The one structlog setup: JSON, one event per line, on stderr.

Every process calls `configure_logging(service=...)` once at start; modules get loggers with
`get_logger(__name__)` and bind context (topic, partition, offset, ids) with `.bind(...)`.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """A value (a password, a token) that must never appear in a log line: it is masked."""
    if value and len(value) >= 4:
        _secrets.add(value)


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            message = record.getMessage()
            if any(secret in message for secret in _secrets):
                for secret in _secrets:
                    message = message.replace(secret, "***")
                record.msg, record.args = message, None
        return True


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route structlog and the standard library's logging through one JSON renderer."""
    global _configured
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_Redact())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # kafka-python is chatty at INFO about every connection, and at DEBUG it logs SASL
    # authentication bytes (the password): never below WARNING.
    logging.getLogger("kafka").setLevel(max(numeric, logging.WARNING))
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    _configured = True


def get_logger(name: str | None = None, **context) -> structlog.stdlib.BoundLogger:
    logger = structlog.get_logger(name)
    return logger.bind(**context) if context else logger
