"""Structured events with structlog: JSON lines by default (journald keeps them), a readable
console format for people. Patient identifiers are removed unless config allows them."""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import structlog

# Event keys that identify a patient; dropped unless log.include_patient_identifiers is true.
PATIENT_KEYS = frozenset({
    "patient_name", "patient_id", "patient_birth_date", "other_patient_ids",
    "other_patient_names", "accession_number",
})
REDACTED = "[redacted]"


def _redactor(include_patient_identifiers: bool):
    def redact(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        if not include_patient_identifiers:
            for key in PATIENT_KEYS.intersection(event):
                event[key] = REDACTED
        return event

    return redact


class _StandardStreamLoggerFactory:
    """Prints to sys.stdout or sys.stderr as they are at each call, not as they were when
    logging was configured (a replaced stream, as under test runners, stays usable)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any) -> structlog.PrintLogger:
        return structlog.PrintLogger(getattr(sys, self.name))


def configure(level: str = "info", fmt: str = "json", *, stream: IO[str] | str = "stdout",
              include_patient_identifiers: bool = False) -> None:
    """stream: "stdout", "stderr", or a file object."""
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redactor(include_patient_identifiers),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=(_StandardStreamLoggerFactory(stream) if isinstance(stream, str)
                        else structlog.PrintLoggerFactory(stream)),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger("xrvd", **context)
