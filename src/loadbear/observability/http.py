"""HTTP side of observability: ``GET /metrics`` and the access-log / HTTP-status middleware.

``/metrics`` is guarded like this, because a scrape must not need a tenant key and must not
hand Prometheus the admin key (which can create tenants and keys):

* ``LOADBEAR_METRICS_KEY``: a scrape-only bearer token (Prometheus ``authorization`` config);
* the admin key is accepted as well (for an operator's ad-hoc ``curl``);
* ``LOADBEAR_METRICS_PUBLIC=true`` opens it without a token, for deployments where the port is
  reachable only from the monitoring network;
* with none of these configured, it answers 403 saying what to set.

A tenant API key is refused with 403: metrics show every tenant's traffic.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from loadbear.api.auth import bearer_token
from loadbear.gateway.errors import ApiError

if TYPE_CHECKING:
    from loadbear.gateway.core import Gateway
    from loadbear.observability.metrics import Metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
access_log = logging.getLogger("loadbear.access")


def check_metrics_access(settings: Any, authorization: str | None) -> None:
    """Raise :class:`ApiError` 401/403 unless the caller may read ``/metrics``."""
    if getattr(settings, "metrics_public", False):
        return
    accepted = [k for k in (getattr(settings, "metrics_key", None), getattr(settings, "admin_key", None)) if k]
    if not accepted:
        raise ApiError(403, "The metrics endpoint is disabled: set LOADBEAR_METRICS_KEY (a scrape token), "
                            "or LOADBEAR_METRICS_PUBLIC=true on a private network.",
                       type="permission_error", code="metrics_disabled")
    token = bearer_token(authorization)
    if token is None:
        raise ApiError(401, "Missing metrics key. Send it as 'Authorization: Bearer <LOADBEAR_METRICS_KEY>'.",
                       type="authentication_error", code="missing_api_key")
    if any(hmac.compare_digest(token.encode(), k.encode()) for k in accepted):
        return
    from loadbear.tenancy.service import KEY_PREFIX

    if token.startswith(f"{KEY_PREFIX}_"):
        raise ApiError(403, "Tenant API keys cannot read /metrics (it shows every tenant); "
                            "use LOADBEAR_METRICS_KEY.", type="permission_error", code="insufficient_scope")
    raise ApiError(401, "Incorrect metrics key.", type="authentication_error", code="invalid_api_key")


def add_metrics_route(app: Any, gateway: "Gateway") -> None:
    # A plain (threadpool) route: reading breaker state may be a Redis or database round trip.
    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request):
        check_metrics_access(gateway.settings, request.headers.get("authorization"))
        return Response(gateway.observability.exposition(gateway), media_type=CONTENT_TYPE)


class HttpObserver:
    """Outermost ASGI middleware: counts every response by route and status (the ledger never sees
    a 401, 413 or 429) and writes the access log line, with the request id, when enabled."""

    def __init__(self, app: Any, metrics: "Metrics", settings: Any = None) -> None:
        self.app = app
        self.metrics = metrics
        # Read per response, so the access log can be switched on a running app.
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0
        started = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            status = status or 499  # the client went away before any response
            raise
        except BaseException:
            status = status or 500
            raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_http(scope["method"], path, status)
            if self.settings is not None and self.settings.access_log:
                state = scope.get("state") or {}
                access_log.info("%s %s %d", scope["method"], scope["path"], status,
                                extra={"method": scope["method"], "path": scope["path"], "status": status,
                                       "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                                       "request_id": state.get("request_id")})
