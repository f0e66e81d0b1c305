"""Tenants, their settings, and API keys as plain values."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCOPES = (
    "chat",
    "models:read",
    "knowledge:read",
    "knowledge:write",
    "usage:read",
    "feedback:write",
)
DEFAULT_SCOPES = SCOPES

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


class TenancyError(ValueError):
    """A request about tenants or keys that cannot be honoured; ``status`` is the HTTP answer."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param


@dataclass
class TenantSettings:
    # None means every model in the catalog.
    allowed_models: list[str] | None = None
    default_model: str | None = None
    monthly_budget_usd: float | None = None
    # Whether prompts and responses may be kept in the ledger (off by default: privacy first).
    store_content: bool = False
    fallback_message: str = "I'm not able to help with that right now."
    support_contact: str | None = None
    # Per-tenant fallback chains: model name -> models to try next.
    fallback_overrides: dict[str, list[str]] = field(default_factory=dict)
    # After the first token, a failing stream may continue on another model instead of ending
    # with an error event. Off by default: a spliced answer can read oddly.
    allow_continuation: bool = False
    # Grounding by default for a feature: {"helpdesk": {"top_k": 5}} retrieves from the tenant's
    # knowledge base for every request of that feature that does not say otherwise.
    knowledge_features: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "TenantSettings":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TenancyError(f"unknown tenant setting(s): {', '.join(unknown)}", param="settings")
        s = cls(**data)
        s.validate()
        return s

    def validate(self) -> None:
        if self.allowed_models is not None and not (
            isinstance(self.allowed_models, list) and all(isinstance(m, str) for m in self.allowed_models)
        ):
            raise TenancyError("allowed_models must be a list of model names", param="settings.allowed_models")
        if self.monthly_budget_usd is not None:
            if not isinstance(self.monthly_budget_usd, (int, float)) or self.monthly_budget_usd < 0:
                raise TenancyError("monthly_budget_usd must be a number ≥ 0", param="settings.monthly_budget_usd")
        if not isinstance(self.store_content, bool):
            raise TenancyError("store_content must be true or false", param="settings.store_content")
        if not isinstance(self.fallback_message, str) or not self.fallback_message.strip():
            raise TenancyError("fallback_message must be a non-empty string", param="settings.fallback_message")
        if not isinstance(self.knowledge_features, dict) or not all(
            isinstance(v, dict) for v in self.knowledge_features.values()
        ):
            raise TenancyError("knowledge_features must map a feature to an object like {\"top_k\": 5}",
                               param="settings.knowledge_features")
        if not isinstance(self.fallback_overrides, dict):
            raise TenancyError("fallback_overrides must map a model to a list of models", param="settings.fallback_overrides")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def degraded_message(self) -> str:
        msg = self.fallback_message.strip()
        if self.support_contact:
            msg = f"{msg} Please contact {self.support_contact}."
        return msg

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


@dataclass
class Tenant:
    id: str
    slug: str
    name: str
    settings: TenantSettings
    active: bool = True
    created_at: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "slug": self.slug,
            "name": self.name,
            "active": self.active,
            "settings": self.settings.to_dict(),
            "created_at": self.created_at,
        }


@dataclass
class ApiKey:
    id: str
    tenant_id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: str | None = None
    revoked_at: str | None = None
    last_used_at: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "scopes": self.scopes,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "last_used_at": self.last_used_at,
        }


@dataclass(frozen=True)
class AuthContext:
    """Who is calling: derived from the API key only, never from the request body."""

    tenant: Tenant
    key_id: str
    scopes: frozenset[str]

    @property
    def tenant_id(self) -> str:
        return self.tenant.id

    def has(self, scope: str) -> bool:
        return scope in self.scopes
