"""``/dashboard``: the static pages and their JSON endpoints (``/dashboard/api/...``).

The pages hold no data and need no key; every JSON endpoint resolves the viewer from the
``Authorization`` header (see :mod:`loadbear.dashboard.scope`). Endpoints are plain ``def``
functions: FastAPI runs them in its thread pool, so the database work never blocks the loop.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from loadbear.api.responses import JSON as _JSON
from loadbear.dashboard import explorer, metrics
from loadbear.dashboard.scope import View, parse_dashboard_period, resolve_view, resolve_viewer
from loadbear.gateway.errors import ApiError, invalid

__all__ = ["add_dashboard_routes"]

_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# The pages are tiny and versioned with the package: read once.
_STATIC: dict[str, bytes] = {}


def _asset(name: str) -> bytes | None:
    if name not in _STATIC:
        if "/" in name or name.startswith(".") or not any(name.endswith(ext) for ext in _TYPES):
            return None
        ref = resources.files("loadbear.dashboard").joinpath("static", name)
        if not ref.is_file():
            return None
        _STATIC[name] = ref.read_bytes()
    return _STATIC[name]


# The pages load only same-origin assets and call only same-origin endpoints; a strict CSP
# makes an injected string in the ledger (a feature name, a prompt) inert.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def JSON(body: Any) -> Response:
    # Tenant data: never kept by a browser cache or a proxy.
    return _JSON(body, headers={"cache-control": "no-store"})


def add_dashboard_routes(app: FastAPI, gateway: Any) -> None:

    def view(request: Request) -> View:
        viewer = resolve_viewer(gateway, request.headers.get("authorization"))
        return resolve_view(gateway, viewer, request.query_params.get("tenant"))

    def period(request: Request):
        q = request.query_params
        return parse_dashboard_period(q.get("from"), q.get("to"))

    @app.get("/dashboard", include_in_schema=False)
    def dashboard_root():
        return RedirectResponse("/dashboard/", status_code=307)

    @app.get("/dashboard/", include_in_schema=False)
    def dashboard_index():
        return Response(_asset("index.html"), media_type=_TYPES[".html"],
                        headers={"content-security-policy": _CSP, "cache-control": "no-cache"})

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    def dashboard_static(name: str):
        body = _asset(name)
        if body is None:
            raise ApiError(404, f"No dashboard asset {name!r}.", type="not_found_error", code="not_found")
        ext = name[name.rfind("."):]
        return Response(body, media_type=_TYPES[ext], headers={"cache-control": "no-cache"})

    @app.get("/dashboard/api/me")
    def me(request: Request):
        v = view(request)
        body = v.viewer.public()
        if v.viewer.admin:
            body["tenants"] = [{"id": t.id, "slug": t.slug, "name": t.name} for t in gateway.tenants.list_tenants()]
        else:
            body["tenants"] = [body["tenant"]]
        return JSON(body)

    @app.get("/dashboard/api/overview")
    def overview(request: Request):
        group = request.query_params.get("group_by", "model")
        if group not in ("model", "feature"):
            raise invalid("'group_by' must be model or feature", "group_by")
        return JSON(metrics.overview(gateway.db, view(request), period(request), group))

    @app.get("/dashboard/api/tenants")
    def tenants(request: Request):
        return JSON(metrics.tenants_report(gateway, view(request), period(request)))

    @app.get("/dashboard/api/reliability")
    def reliability(request: Request):
        return JSON(metrics.reliability(gateway, view(request), period(request)))

    @app.get("/dashboard/api/cache")
    def cache(request: Request):
        return JSON(metrics.cache_report(gateway.db, view(request), period(request)))

    @app.get("/dashboard/api/filters")
    def filters(request: Request):
        return JSON(explorer.filter_choices(gateway.db, view(request), period(request)))

    @app.get("/dashboard/api/interactions")
    def interactions(request: Request):
        v = view(request)
        return JSON(explorer.list_interactions(gateway.db, v, explorer.parse_list_query(request.query_params)))

    @app.get("/dashboard/api/interactions/{interaction_id}")
    def interaction(interaction_id: str, request: Request):
        return JSON(explorer.interaction_detail(gateway, view(request), interaction_id))

    @app.get("/dashboard/api/evals")
    def evals(request: Request):
        return JSON(explorer.list_eval_runs(gateway, view(request)))

    @app.get("/dashboard/api/evals/compare")
    def evals_compare(request: Request):
        q = request.query_params
        return JSON(explorer.compare_eval_runs(gateway, view(request), q.get("a"), q.get("b")))
