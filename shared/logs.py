"""Structured JSON logs. Records carry ids (submission, correlation), never client ids or ratings.

The correlation id of the HTTP request being served (`CORRELATION_ID`, set by `shared.http`'s
request middleware) goes into every record logged while serving it, unless the record names its own.
Every record logged while a span is current (a request, a consumed batch, a delivery attempt: see
`shared.tracing`) carries its `trace_id` and `span_id`, to find the trace of a log line and back.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from shared.settings import LogSettings
from shared.tracing import log_ids

# The request's correlation id; a contextvar so tasks started while serving a request keep it.
CORRELATION_ID: ContextVar[str | None] = ContextVar("alliance_correlation_id", default=None)

_SAFE_EXTRAS = ("correlation_id", "submission_id", "tenant_id", "service", "alert_id", "delivery_id", "outcome")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; only whitelisted extras are emitted."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
            "msg": record.getMessage(),
        }
        for name in _SAFE_EXTRAS:
            value = getattr(record, name, None)
            if value is None and name == "correlation_id":
                value = CORRELATION_ID.get()
            if value is not None:
                doc[name] = value
        if (ids := log_ids()) is not None:
            doc["trace_id"], doc["span_id"] = ids
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(service: str, settings: LogSettings | None = None) -> None:
    """Route the root logger to stdout (JSON unless disabled)."""
    settings = settings or LogSettings()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service) if settings.json_format else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # aiokafka logs record contents at DEBUG; keep it at WARNING so no payload reaches the logs.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
