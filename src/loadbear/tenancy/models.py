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
BUDGET_HARD_ACTIONS = ("downgrade_then_refuse", "refuse")

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
    # Complexity routing (model "auto"): always use this model instead of classifying, and/or
    # never use models of these catalog tiers (explicit requests and fallbacks included).
    pinned_model: str | None = None
    forbidden_tiers: list[str] = field(default_factory=list)
    # Monthly budget (monthly_budget_usd above): at this share of it a "budget.soft_threshold"
    # event is logged (and POSTed to budget_webhook_url); at the budget itself the hard action
    # applies: "downgrade_then_refuse" (the cheapest allowed tier first, then 402) or "refuse".
    budget_soft_ratio: float = 0.8
    budget_hard_action: str = "downgrade_then_refuse"
    budget_webhook_url: str | None = None
    # Rate limits per tenant (None: unlimited): requests and tokens (prompt + completion) per minute.
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    # Response cache (gateway/cache.py). Opt-in: it keeps questions and answers in the database
    # (like store_content, privacy first) and makes repeated questions answer alike. Thresholds are
    # MiniLM cosine similarities; the degraded one applies only when every model failed.
    cache_enabled: bool = False
    cache_semantic: bool = True
    cache_threshold: float = 0.95
    cache_degraded_threshold: float = 0.85
    cache_ttl_s: int = 86_400

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
        if self.default_model is not None and not isinstance(self.default_model, str):
            # Otherwise routing fails at request time (a list is not a model name it can look up).
            raise TenancyError("default_model must be a model name or null", param="settings.default_model")
        if not isinstance(self.knowledge_features, dict) or not all(
            isinstance(v, dict) for v in self.knowledge_features.values()
        ):
            raise TenancyError("knowledge_features must map a feature to an object like {\"top_k\": 5}",
                               param="settings.knowledge_features")
        if not isinstance(self.fallback_overrides, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(m, str) and m for m in v)
            for k, v in self.fallback_overrides.items()
        ):
            # A bare string would be read as a list of one-letter model names: the chain would
            # silently lose every fallback.
            raise TenancyError("fallback_overrides must map a model to a list of models, e.g. "
                               "{\"gpt-4o\": [\"gpt-4o-mini\", \"local\"]}", param="settings.fallback_overrides")
        if not isinstance(self.allow_continuation, bool):
            raise TenancyError("allow_continuation must be true or false", param="settings.allow_continuation")
        if self.support_contact is not None and not (
            isinstance(self.support_contact, str) and self.support_contact.strip()
        ):
            raise TenancyError("support_contact must be a non-empty string (e.g. an e-mail address) or null",
                               param="settings.support_contact")
        if self.pinned_model is not None:
            if not isinstance(self.pinned_model, str) or not self.pinned_model.strip():
                raise TenancyError("pinned_model must be a model name or null", param="settings.pinned_model")
            if self.allowed_models is not None and self.pinned_model not in self.allowed_models:
                raise TenancyError(f"pinned_model {self.pinned_model!r} is not in allowed_models",
                                   param="settings.pinned_model")
        if not (isinstance(self.forbidden_tiers, list) and all(isinstance(t, str) and t for t in self.forbidden_tiers)):
            raise TenancyError("forbidden_tiers must be a list of tier names, e.g. [\"complex\"]",
                               param="settings.forbidden_tiers")
        ratio = self.budget_soft_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise TenancyError("budget_soft_ratio must be a number in (0, 1], e.g. 0.8",
                               param="settings.budget_soft_ratio")
        if self.budget_hard_action not in BUDGET_HARD_ACTIONS:
            raise TenancyError(f"budget_hard_action must be one of {', '.join(BUDGET_HARD_ACTIONS)}",
                               param="settings.budget_hard_action")
        url = self.budget_webhook_url
        if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://")) and len(url) > 8):
            raise TenancyError("budget_webhook_url must be an http(s) URL or null", param="settings.budget_webhook_url")
        for name in ("rpm_limit", "tpm_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise TenancyError(f"{name} must be a positive integer or null", param=f"settings.{name}")
        for name in ("cache_enabled", "cache_semantic"):
            if not isinstance(getattr(self, name), bool):
                raise TenancyError(f"{name} must be true or false", param=f"settings.{name}")
        for name in ("cache_threshold", "cache_degraded_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise TenancyError(f"{name} must be a cosine similarity in (0, 1], e.g. 0.95", param=f"settings.{name}")
        ttl = self.cache_ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise TenancyError("cache_ttl_s must be a positive integer (seconds)", param="settings.cache_ttl_s")

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
