"""Who is looking at the dashboard, and which tenants' rows they may read.

The dashboard's JSON endpoints accept the admin key (every tenant, optional tenant filter) or a
tenant API key with the ``usage:read`` scope (that tenant only). The tenant always comes from the
key; a ``tenant`` query parameter can only narrow an admin's view, never widen a tenant's.
"""

from __future__ import annotations

import hmac
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Iterator

from loadbear.api.auth import bearer_token
from loadbear.gateway.errors import ApiError, invalid
from loadbear.ledger.reports import ReportError, parse_period
from loadbear.storage.db import Conn, Database
from loadbear.tenancy.models import Tenant, TenancyError
from loadbear.tenancy.service import AuthError

__all__ = ["Viewer", "View", "resolve_viewer", "resolve_view", "Period", "parse_dashboard_period", "read_tx"]

# Raw-row aggregates (percentiles, fallbacks, cache) scan ai_interactions; a bound on the range
# keeps every endpoint's cost bounded too.
MAX_DAYS = 366


@dataclass(frozen=True)
class Viewer:
    admin: bool
    tenant: Tenant | None = None  # set for tenant keys

    def public(self) -> dict[str, Any]:
        if self.admin:
            return {"role": "admin", "tenant": None}
        t = self.tenant
        return {"role": "tenant", "tenant": {"id": t.id, "slug": t.slug, "name": t.name}}


@dataclass(frozen=True)
class View:
    """The rows a request reads: one tenant (``tenant`` set) or, for admins only, all of them."""

    viewer: Viewer
    tenant: Tenant | None

    @property
    def tenant_id(self) -> str | None:
        return self.tenant.id if self.tenant is not None else None


def resolve_viewer(gateway: Any, authorization: str | None) -> Viewer:
    """Admin key or a tenant key with ``usage:read``; 401 for a missing or wrong key, 403 for a
    key without the scope."""
    key = bearer_token(authorization)
    if key is None:
        raise ApiError(401, "Missing key. Send the admin key or a tenant API key with the 'usage:read' scope "
                       "as 'Authorization: Bearer <key>'.", type="authentication_error", code="missing_api_key")
    expected = gateway.settings.admin_key
    if expected and hmac.compare_digest(key.encode(), expected.encode()):
        return Viewer(admin=True)
    ctx = gateway.tenants.cached_auth(key)
    if ctx is None:
        try:
            ctx = gateway.authenticate(key)
        except AuthError as exc:
            raise ApiError(401, exc.message, type="authentication_error", code=exc.code) from None
    if not ctx.has("usage:read"):
        raise ApiError(403, "This API key lacks the 'usage:read' scope the dashboard needs.",
                       type="permission_error", code="insufficient_scope")
    return Viewer(admin=False, tenant=ctx.tenant)


def resolve_view(gateway: Any, viewer: Viewer, tenant_slug: str | None) -> View:
    slug = (tenant_slug or "").strip() or None
    if not viewer.admin:
        if slug is not None and slug != viewer.tenant.slug:
            raise ApiError(403, "A tenant key can only read its own tenant's data.", type="permission_error",
                           code="tenant_forbidden", param="tenant")
        return View(viewer, viewer.tenant)
    if slug is None:
        return View(viewer, None)
    try:
        return View(viewer, gateway.tenants.get_tenant(slug))
    except TenancyError as exc:
        raise ApiError(404, exc.message, type="not_found_error", code=exc.code, param="tenant") from None


@contextmanager
def read_tx(db: Database, view: View) -> Iterator[Conn]:
    """A read transaction under the view: ``tenant_tx`` (row-level security on PostgreSQL) for
    one tenant; the owner's ``system_tx`` only for an admin's all-tenant view."""
    if view.tenant is not None:
        with db.tenant_tx(view.tenant.id, write=False) as c:
            yield c
    else:
        if not view.viewer.admin:  # defence in depth: unreachable through resolve_view
            raise ApiError(403, "A tenant key can only read its own tenant's data.", type="permission_error",
                           code="tenant_forbidden")
        with db.system_tx(write=False) as c:
            yield c


@dataclass(frozen=True)
class Period:
    start: date  # inclusive UTC days
    end: date

    @property
    def since(self) -> datetime:
        return datetime.combine(self.start, time.min, tzinfo=timezone.utc)

    @property
    def until(self) -> datetime:  # exclusive
        return datetime.combine(self.end + timedelta(days=1), time.min, tzinfo=timezone.utc)

    def days(self) -> list[str]:
        n = (self.end - self.start).days + 1
        return [(self.start + timedelta(days=i)).isoformat() for i in range(n)]


def parse_dashboard_period(from_: str | None, to: str | None, default_days: int = 14) -> Period:
    try:
        if not from_ and to:
            start, end = parse_period(None, to)
            start = end - timedelta(days=default_days - 1)
        elif not from_:
            _, end = parse_period(None, None)
            start = end - timedelta(days=default_days - 1)
        else:
            start, end = parse_period(from_, to)
    except ReportError as exc:
        raise invalid(exc.message, exc.param) from None
    if (end - start).days + 1 > MAX_DAYS:
        raise invalid(f"the dashboard shows at most {MAX_DAYS} days at a time", "from")
    return Period(start, end)
