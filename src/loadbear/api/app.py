"""The FastAPI application: a thin HTTP shell over :class:`loadbear.Gateway`."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from loadbear.api.auth import bearer_token
from loadbear.api.feedback_routes import add_feedback_routes
from loadbear.api.knowledge_routes import add_knowledge_routes
from loadbear.api.responses import JSON, SSEResponse, error_response
from loadbear.dashboard import add_dashboard_routes
from loadbear.gateway.chat import ChatStream
from loadbear.gateway.core import Gateway
from loadbear.gateway.errors import ApiError, invalid
from loadbear.gateway.validation import (
    body_too_large,
    check_feature,
    parse_cache_header,
    parse_chat_body,
    parse_json,
)
from loadbear.ledger.reports import ReportError, admin_usage, parse_period, tenant_usage
from loadbear.observability import HttpObserver, add_metrics_route, bind_request
from loadbear.tenancy.models import AuthContext, TenancyError
from loadbear.tenancy.service import AuthError

try:  # names the route on FastAPI's native telemetry spans, for requests served by BodyLimit
    from fastapi.telemetry._api import _route_selected
except ImportError:  # pragma: no cover - older FastAPI
    _route_selected = None

log = logging.getLogger("loadbear.api")


class BodyLimit:
    """Pure ASGI middleware: refuses bodies over the limit (413) and tags every request with an id.

    It also serves the hot routes itself: ``routes`` maps ``(method, path)`` to a
    ``(endpoint, route)`` pair, and a matching request goes straight to ``endpoint(request)``
    without the framework's exception middleware, router walk and dependency solving (about a
    third of the server's CPU per chat request). Errors still get the app's own exception
    handlers (``handlers``, the app's live dict), looked up by the exception's class like
    Starlette does, so every error keeps its shape; anything without a handler propagates to the
    outer ServerErrorMiddleware exactly as before. The route stays registered with FastAPI (for
    the OpenAPI schema and for any request that does not match here exactly).
    """

    def __init__(self, app: Any, limit: int, routes: dict[tuple[str, str], tuple[Any, Any]] | None = None,
                 handlers: dict[Any, Callable[..., Any]] | None = None, upload_limit: int | None = None,
                 upload_prefix: str = "/v1/documents") -> None:
        self.app = app
        self.limit = limit
        # Document uploads are legitimately larger than chat bodies.
        self.upload_limit = upload_limit or limit
        self.upload_prefix = upload_prefix
        self.routes = routes or {}
        self.handlers = handlers if handlers is not None else {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"].startswith(self.upload_prefix) else self.limit
        request_id = None
        length = None
        traceparent = tracestate = None
        for k, v in scope["headers"]:
            if k == b"content-length":
                length = v
            elif k == b"x-request-id":
                request_id = v.decode("latin-1")[:128]
            elif k == b"traceparent":
                traceparent = v.decode("latin-1")[:128]
            elif k == b"tracestate":
                tracestate = v.decode("latin-1")[:512]
        scope.setdefault("state", {})["request_id"] = request_id = request_id or _new_request_id()
        # Logs and spans made while serving this request carry its id (and the caller's trace).
        bind_request(request_id, traceparent, tracestate)
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = True
            if too_big:
                return await error_response(body_too_large(limit))(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise body_too_large(limit)
            return message

        rid = scope["state"]["request_id"].encode()
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid)]
            await send(message)

        fast = self.routes.get((scope["method"], scope["path"])) if self.routes and not scope.get("root_path") else None
        if fast is None:
            return await self.app(scope, limited_receive, send_with_id)

        # The hot path: what Router -> APIRoute -> request_response would do for this endpoint.
        endpoint, route = fast
        scope["endpoint"] = endpoint
        scope["route"] = route
        scope.setdefault("path_params", {})
        if _route_selected is not None and scope.get("fastapi.telemetry") is not None:
            _route_selected(scope=scope, path=scope["path"])
        request = Request(scope, limited_receive, send_with_id)
        try:
            response = await endpoint(request)
            await response(scope, limited_receive, send_with_id)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            if started:
                raise RuntimeError("Caught handled exception, but response already started.") from exc
            if asyncio.iscoroutinefunction(handler):
                response = await handler(request, exc)
            else:
                response = await run_in_threadpool(handler, request, exc)
            await response(scope, limited_receive, send_with_id)

    def _handler_for(self, exc: Exception) -> Callable[..., Any] | None:
        # Like Starlette's ExceptionMiddleware: the most specific class wins; the catch-all
        # ``Exception`` handler belongs to ServerErrorMiddleware (log, 500, re-raise), outside us.
        handlers = self.handlers
        if isinstance(exc, StarletteHTTPException) and exc.status_code != 500 and exc.status_code in handlers:
            return handlers[exc.status_code]
        for cls in type(exc).__mro__:
            handler = handlers.get(cls)
            if handler is not None:
                return None if cls is Exception else handler
        return None


_urandom = os.urandom


def _new_request_id() -> str:
    """``uuid.uuid4().hex``, five times cheaper (no UUID object)."""
    n = int.from_bytes(_urandom(16), "big")
    n = (n & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)
    return "%032x" % n


def _bearer(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization"))


def create_app(gateway: Gateway, own_gateway: bool = False) -> FastAPI:
    """Build the app. With ``own_gateway`` the app closes the gateway on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Ingestion jobs a previous process left behind: their uploads are kept in ingest_jobs.
        try:
            await asyncio.to_thread(gateway.knowledge.resume_jobs)
        except Exception:  # e.g. not migrated yet (/readyz says so): serving must not depend on it
            logging.getLogger("loadbear.knowledge").warning("resuming ingestion jobs failed", exc_info=True)
        yield
        if own_gateway:
            await gateway.aclose()
        else:
            await gateway.providers.aclose()
            if gateway._ledger is not None:
                await asyncio.to_thread(gateway._ledger.flush)

    kwargs: dict[str, Any] = dict(title="loadbear", version="0.1.0", lifespan=lifespan, docs_url="/docs",
                                  redoc_url=None)
    try:
        # FastAPI's native telemetry checks the environment and tracer on every request (~8 µs
        # on the hot path); loadbear's own spans are configured explicitly, so it stays off.
        app = FastAPI(**kwargs, telemetry={"tracing": False, "metrics": False, "logs": False})
    except TypeError:  # a FastAPI without native telemetry
        app = FastAPI(**kwargs)
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(TenancyError)
    async def _tenancy_error(request: Request, exc: TenancyError):
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status, exc.message, type=kind, code=exc.code, param=exc.param))

    @app.exception_handler(ReportError)
    async def _report_error(request: Request, exc: ReportError):
        return error_response(invalid(exc.message, exc.param))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return error_response(invalid(f"{loc or 'request'}: {first.get('msg', 'invalid')}", loc or None, "invalid_type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"Unknown route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return error_response(ApiError(exc.status_code, msg, type=kind, code=str(exc.status_code)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, "Internal server error.", type="server_error", code="internal_error"))

    # -- auth ---------------------------------------------------------------------------

    async def authenticate(request: Request) -> AuthContext:
        key = _bearer(request)
        ctx = gateway.tenants.cached_auth(key)
        if ctx is None:
            try:
                ctx = await asyncio.to_thread(gateway.authenticate, key)
            except AuthError as exc:
                raise ApiError(401, exc.message, type="authentication_error", code=exc.code) from None
        return ctx

    def scope(name: str) -> Callable[..., Any]:
        async def dep(request: Request) -> AuthContext:
            ctx = await authenticate(request)
            if not ctx.has(name):
                raise ApiError(403, f"This API key lacks the '{name}' scope.", type="permission_error",
                               code="insufficient_scope")
            return ctx
        return dep

    def admin(request: Request) -> None:
        expected = gateway.settings.admin_key
        if not expected:
            raise ApiError(403, "The admin API is disabled: set LOADBEAR_ADMIN_KEY.", type="permission_error",
                           code="admin_disabled")
        got = _bearer(request)
        if got is None:
            raise ApiError(401, "Missing admin key. Send it as 'Authorization: Bearer <admin key>'.",
                           type="authentication_error", code="missing_api_key")
        if not hmac.compare_digest(got.encode(), expected.encode()):
            raise ApiError(401, "Incorrect admin key.", type="authentication_error", code="invalid_api_key")

    async def json_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        data = parse_json(raw)
        if not isinstance(data, dict):
            raise invalid("The request body must be a JSON object.", code="invalid_type")
        return data

    # -- service ------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz():
        return JSON({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        db_ok = gateway.db.ping()
        current = db_ok and gateway.is_current()
        body = {"status": "ready" if current else "not_ready", "database": db_ok, "migrations_current": current}
        return JSON(body, status_code=200 if current else 503)

    # -- OpenAI-compatible API ----------------------------------------------------------

    chat_scope = scope("chat")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        auth = await chat_scope(request)
        body = parse_chat_body(await request.body())
        header_feature = request.headers.get("x-loadbear-feature")
        if header_feature is not None:
            header_feature = check_feature(header_feature, "X-Loadbear-Feature")
        cache_header = request.headers.get("x-loadbear-cache")
        if cache_header is not None:
            body.cache = parse_cache_header(cache_header) and body.cache
        result = await gateway.chat(auth, body, header_feature, request.scope["state"]["request_id"])
        if isinstance(result, ChatStream):
            return SSEResponse(result)
        return JSON(result.body, headers=result.headers)

    @app.get("/v1/models")
    async def list_models(auth: AuthContext = Depends(scope("chat"))):
        return JSON({"object": "list", "data": gateway.models_for(auth)})

    @app.get("/v1/usage")
    def usage(request: Request, auth: AuthContext = Depends(scope("usage:read"))):
        q = request.query_params
        start, end = parse_period(q.get("from"), q.get("to"))
        body = tenant_usage(gateway.db, auth.tenant_id, start, end, q.get("group_by", "day"))
        budget = gateway.budget.status(auth.tenant)
        if budget is not None:
            body["budget"] = budget
        return JSON(body)

    # -- admin --------------------------------------------------------------------------

    def check_fallback_models(settings: Any) -> None:
        """Fallback overrides must name catalog models: a misspelt one would silently shorten
        the tenant's chain (unknown names are skipped at request time)."""
        overrides = settings.get("fallback_overrides") if isinstance(settings, dict) else None
        if not isinstance(overrides, dict):
            return  # absent, or the wrong shape: TenantSettings.validate says so
        names = [k for k in overrides] + [n for v in overrides.values() if isinstance(v, list) for n in v]
        unknown = sorted({n for n in names if isinstance(n, str) and n not in gateway.catalog})
        if unknown:
            raise invalid(f"fallback_overrides names models that are not in the catalog: {', '.join(unknown)}",
                          "settings.fallback_overrides", "model_not_found")

    @app.post("/admin/tenants", dependencies=[Depends(admin)], status_code=201)
    async def create_tenant(data: dict = Depends(json_body)):
        slug = data.get("slug")
        name = data.get("name")
        settings = data.get("settings")
        if name is not None and not isinstance(name, str):
            raise invalid("'name' must be a string", "name", "invalid_type")
        if settings is not None and not isinstance(settings, dict):
            raise invalid("'settings' must be an object", "settings", "invalid_type")
        check_fallback_models(settings)
        tenant = await asyncio.to_thread(gateway.tenants.create_tenant, slug, name, settings)
        return JSON(tenant.public(), status_code=201)

    @app.get("/admin/tenants", dependencies=[Depends(admin)])
    def list_tenants():
        return JSON({"object": "list", "data": [t.public() for t in gateway.tenants.list_tenants()]})

    @app.get("/admin/tenants/{slug}", dependencies=[Depends(admin)])
    def get_tenant(slug: str):
        return JSON(gateway.tenants.get_tenant(slug).public())

    @app.patch("/admin/tenants/{slug}", dependencies=[Depends(admin)])
    async def update_tenant(slug: str, data: dict = Depends(json_body)):
        settings = data.get("settings")
        if not isinstance(settings, dict):
            raise invalid("'settings' must be an object of settings to change", "settings", "invalid_type")
        check_fallback_models(settings)
        tenant = await asyncio.to_thread(gateway.tenants.update_settings, slug, settings)
        return JSON(tenant.public())

    @app.post("/admin/tenants/{slug}/keys", dependencies=[Depends(admin)], status_code=201)
    async def create_key(slug: str, request: Request):
        raw = await request.body()
        data = parse_json(raw) if raw else {}
        if not isinstance(data, dict):
            raise invalid("The request body must be a JSON object.", code="invalid_type")
        name = data.get("name", "")
        scopes = data.get("scopes")
        if not isinstance(name, str):
            raise invalid("'name' must be a string", "name", "invalid_type")
        if scopes is not None and (not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes)):
            raise invalid("'scopes' must be an array of strings", "scopes", "invalid_type")
        key, plaintext = await asyncio.to_thread(gateway.tenants.create_key, slug, name, scopes)
        return JSON({**key.public(), "tenant": slug, "key": plaintext}, status_code=201)

    @app.get("/admin/tenants/{slug}/keys", dependencies=[Depends(admin)])
    def list_keys(slug: str):
        return JSON({"object": "list", "data": [k.public() for k in gateway.tenants.list_keys(slug)]})

    @app.delete("/admin/tenants/{slug}/keys/{key_ref}", dependencies=[Depends(admin)])
    def revoke_key(slug: str, key_ref: str):
        return JSON(gateway.tenants.revoke_key(slug, key_ref).public())

    @app.get("/admin/usage", dependencies=[Depends(admin)])
    def usage_admin(request: Request):
        q = request.query_params
        start, end = parse_period(q.get("from"), q.get("to"))
        slug = q.get("tenant")
        if slug:
            # A misspelt slug must be a 404, not an empty report that reads as "no traffic".
            try:
                gateway.tenants.get_tenant(slug)
            except TenancyError as exc:
                raise ApiError(404, exc.message, type="not_found_error", code=exc.code, param="tenant") from None
        return JSON(admin_usage(gateway.db, start, end, q.get("group_by", "tenant"), slug))

    @app.get("/admin/providers", dependencies=[Depends(admin)])
    def providers():
        # Plain def: FastAPI runs it in its thread pool, because the database breaker store's
        # snapshot reads the shared state (a blocking read per model).
        return JSON({"object": "list", "data": gateway.provider_health()})

    add_knowledge_routes(app, gateway, scope)
    add_feedback_routes(app, gateway, scope)
    add_metrics_route(app, gateway)
    add_dashboard_routes(app, gateway)

    # The chat route is served by BodyLimit directly (see there); FastAPI keeps it for the schema.
    chat_route = next(r for r in app.router.routes if getattr(r, "endpoint", None) is chat_completions)
    app.add_middleware(BodyLimit, limit=gateway.settings.max_body_bytes,
                       routes={("POST", "/v1/chat/completions"): (chat_completions, chat_route)},
                       handlers=app.exception_handlers,
                       upload_limit=gateway.settings.max_upload_bytes + 64 * 1024)
    # Outermost: sees every response, including BodyLimit's own 413s and the chat fast path.
    app.add_middleware(HttpObserver, metrics=gateway.observability.metrics, settings=gateway.settings)
    return app
