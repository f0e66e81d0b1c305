"""Observability: Prometheus metrics, OpenTelemetry GenAI spans and structured JSON logs.

All three are derived from the one ledger record each request produces (see ``hub.py``), plus an
HTTP middleware for what never reaches the ledger (refused requests, the access log).
"""

from loadbear.observability.context import (
    bind_call,
    bind_request,
    interaction_id_var,
    request_id_var,
    tenant_var,
)
from loadbear.observability.http import CONTENT_TYPE, HttpObserver, add_metrics_route, check_metrics_access
from loadbear.observability.hub import Observability
from loadbear.observability.logs import JsonFormatter, TextFormatter, configure_logging, uvicorn_log_config
from loadbear.observability.metrics import LabelCap, Metrics
from loadbear.observability.tracing import Tracing

__all__ = [
    "CONTENT_TYPE",
    "HttpObserver",
    "JsonFormatter",
    "LabelCap",
    "Metrics",
    "Observability",
    "TextFormatter",
    "Tracing",
    "add_metrics_route",
    "bind_call",
    "bind_request",
    "check_metrics_access",
    "configure_logging",
    "interaction_id_var",
    "request_id_var",
    "tenant_var",
    "uvicorn_log_config",
]
