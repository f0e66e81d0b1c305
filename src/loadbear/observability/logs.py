"""Structured logs: one JSON object per line, carrying the request, interaction and tenant ids.

``LOADBEAR_LOG_FORMAT=json`` (the default of ``loadbear serve``) or ``text``. The ids come from
the contextvars in :mod:`loadbear.observability.context`, so every log call made while serving a
request carries them without being passed around.

Prompts, answers and keys are never logged by loadbear; as a second line of defence the
formatter masks bearer tokens and API-key-shaped strings in messages and exception text.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any

import orjson

from loadbear.observability.context import interaction_id_var, request_id_var, tenant_var

FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is emitted.
_STANDARD = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {
    "message", "asctime", "taskName", "color_message"}  # uvicorn adds an ANSI-coloured copy of its message
_SECRET = re.compile(
    r"(?i)(bearer\s+)[^\s\"',]+"                     # Authorization header values
    r"|\b(lb|sk|sk-ant|sk-proj)[-_][A-Za-z0-9_\-]{12,}"  # loadbear, OpenAI and Anthropic keys
)


def redact(text: str) -> str:
    if "earer" not in text and "lb_" not in text and "sk" not in text:  # the common case: no regex
        return text
    return _SECRET.sub(_mask, text)


def _mask(m: re.Match) -> str:
    return m.group(1) + "[redacted]" if m.group(1) else "[redacted]"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id", "interaction_id", "tenant", ...extra}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        rid = request_id_var.get()
        if rid is not None:
            out["request_id"] = rid
        iid = interaction_id_var.get()
        if iid is not None:
            out["interaction_id"] = iid
        tenant = tenant_var.get()
        if tenant is not None:
            out["tenant"] = tenant
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v  # explicit extras win over the context (e.g. the ledger's own ids)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact(record.exc_text)
        if record.stack_info:
            out["stack"] = record.stack_info
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """The classic one-line format, with the request id appended when there is one."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        rid = request_id_var.get()
        if rid is not None:
            iid = interaction_id_var.get()
            line += f" [request_id={rid}" + (f" interaction_id={iid}]" if iid else "]")
        return line


def check_format(fmt: str | None) -> str:
    fmt = (fmt or "json").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"LOADBEAR_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if check_format(fmt) == "json" else TextFormatter()


def configure_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> logging.Handler:
    """Send the root logger to ``stream`` (stderr) in ``fmt``. Idempotent: a second call (uvicorn
    configured logging first, then the app factory runs) reuses loadbear's handler."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h.formatter, (JsonFormatter, TextFormatter))), None)
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
        root.addHandler(handler)
    handler.setFormatter(formatter(fmt))
    root.setLevel(level.upper())
    return handler


def uvicorn_log_config(level: str = "info", fmt: str = "json") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``uvicorn.run(log_config=...)``: uvicorn applies it in
    every process (the supervisor and each worker), so its own lines are JSON too."""
    check_format(fmt)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"loadbear": {"()": f"{__name__}.{'JsonFormatter' if fmt == 'json' else 'TextFormatter'}"}},
        "handlers": {"loadbear": {"class": "logging.StreamHandler", "formatter": "loadbear",
                                  "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level.upper(), "propagate": True},
            "uvicorn.error": {"level": level.upper(), "propagate": True},
            "uvicorn.access": {"handlers": [], "level": level.upper(), "propagate": True},
        },
        "root": {"handlers": ["loadbear"], "level": level.upper()},
    }
