"""Per-request context for logs and traces, carried in contextvars.

The HTTP middleware sets the request id (and the caller's W3C ``traceparent``, if any); the
gateway sets the interaction id and tenant when a chat call starts. Each request runs in its own
asyncio task, so the values never leak from one request to another.
"""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("loadbear_request_id", default=None)
interaction_id_var: ContextVar[str | None] = ContextVar("loadbear_interaction_id", default=None)
tenant_var: ContextVar[str | None] = ContextVar("loadbear_tenant", default=None)
traceparent_var: ContextVar[tuple[str, str | None] | None] = ContextVar("loadbear_traceparent", default=None)


def bind_request(request_id: str | None, traceparent: str | None = None, tracestate: str | None = None) -> None:
    request_id_var.set(request_id)
    if traceparent is not None:
        traceparent_var.set((traceparent, tracestate))


def bind_call(interaction_id: str, tenant: str | None, request_id: str | None = None) -> None:
    interaction_id_var.set(interaction_id)
    tenant_var.set(tenant)
    if request_id is not None:  # library callers pass their own id; HTTP requests already set it
        request_id_var.set(request_id)
