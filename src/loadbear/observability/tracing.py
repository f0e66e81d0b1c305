"""OpenTelemetry spans following the GenAI semantic conventions, built from the ledger record.

One span per request (``chat {requested model}``) with a child span per upstream attempt (the
GenAI client span: provider, upstream model, tokens, ``error.type``), one for retrieval when the
request was grounded, and one for the response-cache lookup when there was one.

The spans are built after the fact, when the request's single ledger record is handed to the
gateway, with explicit start and end times taken from the record (attempts carry their own start
and latency; retrieval and cache lookups leave wall-clock ``phases`` on the record). So tracing
adds nothing to the request path itself, and with the exporter off (``LOADBEAR_OTEL_EXPORTER=none``,
the default) no tracer exists and no span object is ever created.

The request span joins the caller's trace when the HTTP request carried a W3C ``traceparent``
header, or (library use) when a span is active in the calling context.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

from loadbear.ledger.records import InteractionRecord
from loadbear.observability.context import traceparent_var

EXPORTERS = ("none", "console", "otlp")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _ns(dt: datetime) -> int:
    """Exact epoch nanoseconds of an aware datetime (float timestamps lose ~0.2 µs)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    d = dt - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000_000 + d.microseconds * 1_000


class Tracing:
    """Turns ledger records into spans on ``tracer_provider`` (owned: shut down on close)."""

    def __init__(self, tracer_provider: Any, owned: bool = False) -> None:
        from opentelemetry.propagate import get_global_textmap
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

        from loadbear import __version__

        self.provider = tracer_provider
        self.owned = owned
        self.tracer = tracer_provider.get_tracer("loadbear", __version__)
        self._propagator = get_global_textmap()
        self._server, self._client, self._internal = SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL
        self._status_cls, self._error_code = Status, StatusCode.ERROR
        self._in_context = set_span_in_context

    @classmethod
    def from_settings(cls, settings: Any, tracer_provider: Any = None) -> "Tracing | None":
        if tracer_provider is not None:
            return cls(tracer_provider)
        kind = check_exporter(getattr(settings, "otel_exporter", "none"))
        if kind == "none":
            return None
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        except ImportError:
            raise RuntimeError(f"LOADBEAR_OTEL_EXPORTER={kind} needs the OpenTelemetry SDK: "
                               "pip install 'loadbear[otel]'") from None
        if kind == "console":
            exporter = ConsoleSpanExporter()
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise RuntimeError("LOADBEAR_OTEL_EXPORTER=otlp needs the OTLP exporter: "
                                   "pip install 'loadbear[otel]'") from None
            # Endpoint, headers and timeout come from the standard OTEL_EXPORTER_OTLP_* variables.
            exporter = OTLPSpanExporter()
        attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "loadbear"}
        provider = TracerProvider(resource=Resource.create(attrs))
        # Batched: export happens on the SDK's own thread, never on the event loop.
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, owned=True)

    def close(self) -> None:
        if self.owned:
            try:
                self.provider.shutdown()
            except Exception:  # noqa: BLE001 - closing must not fail the caller
                pass

    # -- spans ------------------------------------------------------------------------------

    def emit(self, rec: InteractionRecord) -> None:
        start = _ns(rec.created_at)
        end = start + rec.latency_ms * 1_000_000
        attempts = [(a, _ns(a.started_at)) for a in rec.attempts]
        phases = rec.phases or {}
        # The record's times are whole milliseconds: never let a child outlive its parent.
        for a, a_start in attempts:
            end = max(end, a_start + a.latency_ms * 1_000_000)
        for p_start, p_end in phases.values():
            end = max(end, p_end)
        status = rec.status
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": rec.requested_model,
            "gen_ai.usage.input_tokens": rec.prompt_tokens,
            "gen_ai.usage.output_tokens": rec.completion_tokens,
            "gen_ai.response.id": rec.id,
            "loadbear.interaction_id": rec.id,
            "loadbear.tenant": rec.tenant_slug or rec.tenant_id,
            "loadbear.tenant_id": rec.tenant_id,
            "loadbear.feature": rec.feature,
            "loadbear.status": status,
            "loadbear.cached": rec.cached,
            "loadbear.degraded": status == "degraded",
            "loadbear.cost_usd": rec.cost_micro_usd / 1_000_000,
            "loadbear.attempts": len(rec.attempts),
            "loadbear.streamed": rec.streamed,
        }
        if rec.provider:
            attrs["gen_ai.provider.name"] = rec.provider
        if status in ("ok", "degraded") and (rec.provider or rec.cached):
            attrs["gen_ai.response.model"] = rec.model
        if rec.finish_reason:
            attrs["gen_ai.response.finish_reasons"] = (rec.finish_reason,)
        if rec.cached_input_tokens:
            attrs["gen_ai.usage.cache_read.input_tokens"] = rec.cached_input_tokens
        if rec.request_id:
            attrs["loadbear.request_id"] = rec.request_id
        if rec.route:
            attrs["loadbear.route"] = rec.route
        if rec.cache_kind:
            attrs["loadbear.cache_kind"] = rec.cache_kind
        if rec.ttft_ms is not None:
            attrs["loadbear.ttft_ms"] = rec.ttft_ms
        if status in ("error", "degraded"):
            attrs["error.type"] = rec.error_type or "_OTHER"
        if rec.http_status is not None and status != "ok":
            attrs["http.response.status_code"] = rec.http_status
        name = f"chat {rec.requested_model}"
        span = self.tracer.start_span(name, context=self._parent(), kind=self._server, attributes=attrs,
                                      start_time=start, record_exception=False, set_status_on_exception=False)
        if status in ("error", "degraded"):
            span.set_status(self._status_cls(self._error_code, rec.error_type))
        skipped = rec.metadata.get("skipped") if rec.metadata else None
        if skipped:
            for model in skipped:
                span.add_event("model_skipped", {"loadbear.model": model, "loadbear.reason": "breaker_open"},
                               timestamp=start)
        ctx = self._in_context(span)
        for phase, (p_start, p_end) in phases.items():
            self._phase_span(phase, p_start, p_end, ctx, rec)
        for a, a_start in attempts:
            self._attempt_span(a, a_start, ctx)
        span.end(end_time=end)

    def _parent(self) -> Any:
        carried = traceparent_var.get()
        if carried is None:
            return None  # the current context: a library caller's active span, if any
        traceparent, tracestate = carried
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        return self._propagator.extract(carrier)

    def _phase_span(self, phase: str, start: int, end: int, ctx: Any, rec: InteractionRecord) -> None:
        attrs: dict[str, Any]
        if phase == "retrieval":
            name = "retrieval knowledge"
            attrs = {"gen_ai.operation.name": "retrieval", "gen_ai.data_source.id": "loadbear.knowledge",
                     "loadbear.retrieval.chunks": len(rec.retrieved_chunk_ids or ())}
        elif phase == "cache":
            name = "loadbear.cache.lookup"
            attrs = {"loadbear.cache.hit": rec.cached}
            if rec.cache_kind:
                attrs["loadbear.cache_kind"] = rec.cache_kind
            if rec.cache_similarity is not None:
                attrs["loadbear.cache.similarity"] = rec.cache_similarity
        else:
            name, attrs = f"loadbear.{phase}", {}
        self.tracer.start_span(name, context=ctx, kind=self._internal, attributes=attrs,
                               start_time=start).end(end_time=end)

    def _attempt_span(self, a: Any, start: int, ctx: Any) -> None:
        upstream = a.upstream_model or a.model
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": a.provider,
            "gen_ai.request.model": upstream,
            "gen_ai.usage.input_tokens": a.prompt_tokens,
            "gen_ai.usage.output_tokens": a.completion_tokens,
            "loadbear.model": a.model,
            "loadbear.attempt_no": a.attempt_no,
            "loadbear.attempt_status": a.status,
            "loadbear.cost_usd": a.cost_micro_usd / 1_000_000,
            "loadbear.tokens_estimated": a.tokens_estimated,
        }
        if a.status == "ok":
            attrs["gen_ai.response.model"] = upstream
        if a.ttft_ms is not None:
            attrs["loadbear.ttft_ms"] = a.ttft_ms
        if a.error_type:
            attrs["error.type"] = a.error_type
        if a.http_status is not None:
            attrs["http.response.status_code"] = a.http_status
        span = self.tracer.start_span(f"chat {upstream}", context=ctx, kind=self._client, attributes=attrs,
                                      start_time=start)
        if a.status == "error":
            span.set_status(self._status_cls(self._error_code, a.error_type))
        span.end(end_time=start + a.latency_ms * 1_000_000)


def check_exporter(value: str | None) -> str:
    kind = (value or "none").strip().lower()
    if kind not in EXPORTERS:
        raise ValueError(f"LOADBEAR_OTEL_EXPORTER must be one of {', '.join(EXPORTERS)}, not {value!r}")
    return kind
