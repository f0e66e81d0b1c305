"""``Observability``: the per-Gateway hub that turns each ledger record into metrics, spans and,
for failures, a log line. ``Gateway.record`` hands it every record; nothing else on the request
path calls it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from loadbear.ledger.records import InteractionRecord
from loadbear.observability.metrics import Family, Metrics
from loadbear.observability.tracing import Tracing

if TYPE_CHECKING:
    from loadbear.gateway.core import Gateway

log = logging.getLogger("loadbear.chat")

BREAKER_STATES = ("closed", "half_open", "open")
CLIENT_FAULTS = frozenset({"bad_request", "context_length"})


class Observability:
    def __init__(self, settings: Any = None, tracer_provider: Any = None) -> None:
        self.metrics = Metrics(label_cap=int(getattr(settings, "metrics_label_cap", 100)))
        # None unless an exporter is configured (or a provider given): then no span is ever made.
        self.tracing: Tracing | None = Tracing.from_settings(settings, tracer_provider)

    @classmethod
    def from_settings(cls, settings: Any, tracer_provider: Any = None) -> "Observability":
        return cls(settings, tracer_provider)

    def record(self, rec: InteractionRecord) -> None:
        """Count one finished request (never raises: observability must not fail a request)."""
        try:
            self.metrics.observe(rec)
            if self.tracing is not None:
                self.tracing.emit(rec)
            if rec.status in ("error", "degraded"):
                # The ids ride on the contextvars; the record's own fields are explicit so that the
                # line stands alone. Never the prompt, the answer or the upstream's message body.
                # A request the model rejected (bad request, too long) is the client's doing: info.
                level = logging.INFO if rec.error_type in CLIENT_FAULTS else logging.WARNING
                log.log(level, "chat request %s: %s", rec.status, rec.error_type or "unknown",
                            extra={"status": rec.status, "error_type": rec.error_type, "model": rec.model,
                                   "requested_model": rec.requested_model, "feature": rec.feature,
                                   "attempts": len(rec.attempts), "http_status": rec.http_status,
                                   "interaction_id": rec.id, "request_id": rec.request_id})
        except Exception:  # noqa: BLE001
            log.exception("observability: could not record interaction %s", rec.id)

    def exposition(self, gateway: "Gateway") -> str:
        """``GET /metrics``: the counters, plus gauges read now from the breakers and the ledger."""
        return self.metrics.render(scrape_gauges(gateway))

    def close(self) -> None:
        if self.tracing is not None:
            self.tracing.close()


def scrape_gauges(gateway: "Gateway") -> list[Family]:
    from loadbear.gateway.breaker import breaker_key

    state: list = []
    trips: list = []
    for m in gateway.catalog:
        try:
            snap = gateway.breakers.snapshot(breaker_key(m))
        except Exception:  # noqa: BLE001 - a store that cannot answer must not break the scrape
            log.warning("metrics: breaker state of %s unavailable", m.name, exc_info=True)
            continue
        labels = (("provider", m.provider), ("model", m.name))
        current = snap.get("breaker", "closed")
        for st in BREAKER_STATES:
            state.append(((*labels, ("state", st)), int(current == st)))
        trips.append((labels, int(snap.get("trips") or 0)))
    out = [
        Family("loadbear_breaker_state", "gauge",
               "Circuit breaker state per model: 1 for the current state (closed, half_open, open).", state),
        Family("loadbear_breaker_trips_total", "counter", "Times each model's breaker opened.", trips),
    ]
    ledger = gateway._ledger
    if ledger is not None:
        out.append(Family("loadbear_ledger_pending_rows", "gauge",
                          "Ledger rows accepted but not yet written.", [((), ledger.pending)]))
        out.append(Family("loadbear_ledger_dead_lettered_total", "counter",
                          "Ledger rows the database refused (kept in the dead-letter file).",
                          [((), ledger.dead_lettered)]))
    return out
