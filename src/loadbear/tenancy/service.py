"""Tenants and API keys: creation, lookup, revocation, authentication."""

from __future__ import annotations

import functools
import hashlib
import secrets
import threading
import time
import uuid
from typing import Any, Iterable

from loadbear.storage.db import Conn, Database
from loadbear.storage.values import db_time, dumps, iso, loads, utcnow, uuid7
from loadbear.tenancy.models import (
    DEFAULT_SCOPES,
    SCOPES,
    SLUG_RE,
    ApiKey,
    AuthContext,
    Tenant,
    TenancyError,
    TenantSettings,
)

KEY_PREFIX = "lb"
# Namespace for deterministic end-user ids: uuid5(namespace, tenant_id + ":" + external id), so
# the hot path never has to look a user up before writing the ledger row.
USER_NAMESPACE = uuid.UUID("6f1c8a52-4b1e-4c3e-9a55-1b0bca2d7e11")


def hash_key(plaintext: str) -> str:
    # Keys carry 190+ bits of randomness, so a fast hash is safe (no dictionary to attack).
    return hashlib.sha256(plaintext.encode()).hexdigest()


@functools.lru_cache(maxsize=65536)
def user_uuid(tenant_id: str, external_id: str) -> str:
    return str(uuid.uuid5(USER_NAMESPACE, f"{tenant_id}:{external_id}"))


class AuthError(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class TenantService:
    def __init__(self, db: Database, defaults: dict[str, Any] | None = None, auth_cache_seconds: float = 30.0):
        self.db = db
        self.defaults = dict(defaults or {})
        self.auth_cache_seconds = auth_cache_seconds
        self._auth_cache: dict[str, tuple[float, AuthContext]] = {}
        self._cache_lock = threading.Lock()
        # key id -> last time we recorded its use; bounds last_used_at writes to one a minute.
        self._touched: dict[str, float] = {}

    # -- tenants -----------------------------------------------------------------------

    def create_tenant(self, slug: str, name: str | None = None, settings: dict[str, Any] | None = None) -> Tenant:
        if not isinstance(slug, str) or not SLUG_RE.fullmatch(slug):
            raise TenancyError(
                "slug must be 2-63 characters of lowercase letters, digits and '-', starting with a letter or digit",
                param="slug",
            )
        merged = {**self.defaults, **(settings or {})}
        ts = TenantSettings.from_dict(merged)
        tenant = Tenant(id=str(uuid.uuid4()), slug=slug, name=(name or slug), settings=ts)
        now = db_time(self.db.dialect, utcnow())
        exists = TenancyError(f"a tenant with slug {slug!r} already exists", status=409, code="tenant_exists", param="slug")
        try:
            with self.db.system_tx() as c:
                if c.fetchone("SELECT id FROM tenants WHERE slug = ?", (slug,)):
                    raise exists
                c.execute(
                    "INSERT INTO tenants (id, slug, name, settings, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (tenant.id, slug, tenant.name, dumps(ts.to_dict()), now, now),
                )
        except TenancyError:
            raise
        except Exception as exc:
            # Two concurrent creates: the unique index refuses the second one.
            if "unique" in str(exc).lower() or type(exc).__name__ in ("UniqueViolation", "IntegrityError"):
                raise exists from None
            raise
        tenant.created_at = iso(now)
        return tenant

    def list_tenants(self) -> list[Tenant]:
        with self.db.system_tx(write=False) as c:
            return [_tenant(r) for r in c.fetchall("SELECT * FROM tenants ORDER BY slug")]

    def get_tenant(self, slug: str) -> Tenant:
        with self.db.system_tx(write=False) as c:
            row = c.fetchone("SELECT * FROM tenants WHERE slug = ?", (slug,))
        if row is None:
            raise TenancyError(f"no tenant with slug {slug!r}", status=404, code="tenant_not_found", param="slug")
        return _tenant(row)

    def update_settings(self, slug: str, changes: dict[str, Any]) -> Tenant:
        tenant = self.get_tenant(slug)
        merged = {**tenant.settings.to_dict(), **changes}
        ts = TenantSettings.from_dict(merged)
        with self.db.tenant_tx(tenant.id) as c:
            c.execute(
                "UPDATE tenants SET settings = ?, updated_at = ? WHERE id = ?",
                (dumps(ts.to_dict()), db_time(self.db.dialect, utcnow()), tenant.id),
            )
        tenant.settings = ts
        self._forget_tenant(tenant.id)
        return tenant

    # -- keys --------------------------------------------------------------------------

    def create_key(self, slug: str, name: str = "", scopes: Iterable[str] | None = None) -> tuple[ApiKey, str]:
        """Returns the key record and the plaintext, which is never stored and never shown again."""
        tenant = self.get_tenant(slug)
        scope_list = list(DEFAULT_SCOPES if scopes is None else scopes)
        bad = [s for s in scope_list if s not in SCOPES]
        if bad or not scope_list:
            raise TenancyError(
                f"unknown scope(s) {', '.join(bad) or '(none given)'}; valid: {', '.join(SCOPES)}", param="scopes"
            )
        visible = secrets.token_hex(4)
        plaintext = f"{KEY_PREFIX}_{visible}_{secrets.token_urlsafe(32)}"
        key = ApiKey(
            id=uuid7(), tenant_id=tenant.id, name=name or "", prefix=f"{KEY_PREFIX}_{visible}", scopes=scope_list
        )
        now = db_time(self.db.dialect, utcnow())
        with self.db.tenant_tx(tenant.id) as c:
            c.execute(
                "INSERT INTO api_keys (id, tenant_id, name, prefix, key_hash, scopes, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key.id, tenant.id, key.name, key.prefix, hash_key(plaintext), dumps(scope_list), now),
            )
        key.created_at = iso(now)
        return key, plaintext

    def list_keys(self, slug: str) -> list[ApiKey]:
        tenant = self.get_tenant(slug)
        with self.db.tenant_tx(tenant.id, write=False) as c:
            rows = c.fetchall("SELECT * FROM api_keys WHERE tenant_id = ? ORDER BY created_at", (tenant.id,))
        return [_key(r) for r in rows]

    def revoke_key(self, slug: str, key_ref: str) -> ApiKey:
        """Revoke by key id or visible prefix. Revoking twice is not an error."""
        tenant = self.get_tenant(slug)
        with self.db.tenant_tx(tenant.id) as c:
            row = c.fetchone(
                "SELECT * FROM api_keys WHERE tenant_id = ? AND (CAST(id AS TEXT) = ? OR prefix = ?)",
                (tenant.id, key_ref, key_ref),
            )
            if row is None:
                raise TenancyError(f"tenant {slug!r} has no key {key_ref!r}", status=404, code="key_not_found")
            if row["revoked_at"] is None:
                now = db_time(self.db.dialect, utcnow())
                c.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (now, row["id"]))
                row["revoked_at"] = now
        key = _key(row)
        with self._cache_lock:
            for h, (_, ctx) in list(self._auth_cache.items()):
                if ctx.key_id == key.id:
                    del self._auth_cache[h]
        return key

    def cached_auth(self, plaintext: str | None) -> AuthContext | None:
        """The cached context for a key, without touching the database (hot path)."""
        if not plaintext:
            return None
        cached = self._auth_cache.get(hash_key(plaintext))
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        return None

    def authenticate(self, plaintext: str | None) -> AuthContext:
        if not plaintext:
            raise AuthError(
                "Missing API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        h = hash_key(plaintext)
        now = time.monotonic()
        cached = self._auth_cache.get(h)
        if cached is not None and cached[0] > now:
            return cached[1]
        with self.db.system_tx(write=False) as c:
            row = c.fetchone(
                "SELECT k.id AS key_id, k.scopes, k.revoked_at, t.* FROM api_keys k"
                " JOIN tenants t ON t.id = k.tenant_id WHERE k.key_hash = ?",
                (h,),
            )
        if row is None:
            raise AuthError("Incorrect API key provided.", code="invalid_api_key")
        if row["revoked_at"] is not None:
            raise AuthError("This API key has been revoked.", code="invalid_api_key")
        if not _truthy(row["active"]):
            raise AuthError("This tenant is disabled.", code="tenant_disabled")
        ctx = AuthContext(tenant=_tenant(row), key_id=str(row["key_id"]), scopes=frozenset(loads(row["scopes"])))
        with self._cache_lock:
            self._auth_cache[h] = (now + self.auth_cache_seconds, ctx)
        return ctx

    def due_touch(self, key_id: str) -> bool:
        """Whether this key's last-used time is due a write (at most once a minute per key)."""
        now = time.monotonic()
        last = self._touched.get(key_id)
        if last is not None and now - last < 60:
            return False
        self._touched[key_id] = now
        return True

    def _forget_tenant(self, tenant_id: str) -> None:
        with self._cache_lock:
            for h, (_, ctx) in list(self._auth_cache.items()):
                if ctx.tenant.id == tenant_id:
                    del self._auth_cache[h]


def touch_keys(c: Conn, dialect: str, touches: dict[str, tuple[str, Any]]) -> None:
    """Record last-used times: key id -> (tenant id, time). Runs in the ledger writer's transaction."""
    for key_id, (tenant_id, when) in touches.items():
        c.set_tenant(tenant_id)
        c.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (db_time(dialect, when), key_id))


def _truthy(v: Any) -> bool:
    return bool(v) if not isinstance(v, str) else v not in ("0", "false", "f")


def _tenant(row: dict[str, Any]) -> Tenant:
    return Tenant(
        id=str(row["id"]),
        slug=row["slug"],
        name=row["name"],
        settings=TenantSettings.from_dict(loads(row["settings"])),
        active=_truthy(row["active"]),
        created_at=iso(row["created_at"]),
    )


def _key(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        name=row["name"],
        prefix=row["prefix"],
        scopes=list(loads(row["scopes"])),
        created_at=iso(row["created_at"]),
        revoked_at=iso(row["revoked_at"]),
        last_used_at=iso(row["last_used_at"]),
    )
