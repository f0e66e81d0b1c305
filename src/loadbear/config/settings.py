"""Settings: defaults, then an optional ``loadbear.toml``, then ``LOADBEAR_*`` environment variables.

The file is found through ``LOADBEAR_CONFIG`` or as ``./loadbear.toml``. Environment wins so that
one image can run everywhere with the file as a base.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

DEFAULT_SQLITE_URL = "sqlite:///loadbear.db"


@dataclass
class Settings:
    database_url: str = DEFAULT_SQLITE_URL
    admin_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    # Requests larger than this are refused with 413 before they are parsed.
    max_body_bytes: int = 1_048_576
    # The model a request gets when it asks for "auto" and the tenant has no default.
    default_model: str | None = None
    # Ledger writer: rows go to the database in batches, off the request path.
    ledger_batch_size: int = 1000
    ledger_flush_interval_ms: int = 50
    ledger_queue_max: int = 50_000
    # How long an authenticated key stays cached in a replica (revocations made through this
    # replica apply at once; through another replica, within this many seconds).
    auth_cache_seconds: float = 30.0
    # PostgreSQL role that tenant work logs in as (no BYPASSRLS, owns nothing), created by the
    # migrations. Its login: database_app_url (LOADBEAR_DATABASE_APP_URL, for password auth), else
    # database_url with the user replaced by this role and no password (trust/peer/cert auth).
    pg_app_role: str = "loadbear_app"
    database_app_url: str | None = None
    db_pool_size: int = 10
    log_level: str = "info"
    # Knowledge base: the embedding model ("all-MiniLM-L6-v2", offline, or a catalog model
    # served by an OpenAI-compatible /embeddings endpoint), chunk size in tokens and overlap.
    embedding_model: str = "all-MiniLM-L6-v2"
    chunk_tokens: int = 350
    chunk_overlap: float = 0.15
    max_upload_bytes: int = 20 * 1024 * 1024
    inline_ingest_max_bytes: int = 256 * 1024
    # Reliability. Every request gets at most this long across all its attempts (retries and
    # fallbacks included); each attempt's own timeouts are clamped to what is left.
    request_deadline_s: float = 60.0
    # Circuit breakers (per provider+model): open after this many consecutive failures, let
    # one probe through after the cooldown. Shared through Redis when redis_url is set.
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    breaker_key_prefix: str = "loadbear:breaker:"
    # Where breaker state lives: "auto" (Redis when redis_url is set, else the database, so
    # every worker and replica on it shares breakers), "database", "redis" or "memory" (each
    # process on its own). The database store re-reads its local view at most this often.
    breaker_store: str = "auto"
    breaker_refresh_s: float = 0.25
    # Retries of the same model: jittered exponential backoff from the base delay, capped at the
    # max delay; a Retry-After is honoured unless it exceeds retry_after_max_s (then fail over).
    retry_base_delay_s: float = 0.2
    retry_max_delay_s: float = 8.0
    retry_after_max_s: float = 20.0
    # Process-wide switch for the response cache; each tenant opts in (cache_enabled setting).
    cache_enabled: bool = True
    # The learned classifier for model "auto" (`loadbear router train`); unset: the rules.
    router_model_path: str | None = None
    # Observability (see loadbear/observability/). GET /metrics takes metrics_key (a scrape-only
    # token) or the admin key, or nothing when metrics_public (a private monitoring network);
    # each of the tenant, model and feature labels keeps its first metrics_label_cap values and
    # counts the rest as "other". Spans are exported only when otel_exporter is "otlp" (standard
    # OTEL_EXPORTER_OTLP_* variables) or "console". Logs: "json" or "text"; access_log writes one
    # line per HTTP response (off by default: ~15 µs of CPU a request, and the ledger already has
    # one row per chat request with its request id).
    metrics_key: str | None = None
    metrics_public: bool = False
    metrics_label_cap: int = 100
    otel_exporter: str = "none"
    log_format: str = "json"
    access_log: bool = False
    # Raw model catalog entries from the TOML file ([models.NAME] tables).
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Default tenant settings applied to new tenants (a [tenant_defaults] table).
    tenant_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @classmethod
    def load(
        cls,
        env: Mapping[str, str] | None = None,
        config_path: str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> "Settings":
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_path or env.get("LOADBEAR_CONFIG")
        if path is None and Path("loadbear.toml").exists():
            path = "loadbear.toml"
        if path:
            with open(path, "rb") as fh:
                values.update(tomllib.load(fh))
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
        for name, f in known.items():
            raw = env.get(f"LOADBEAR_{name.upper()}")
            if raw is None or name in ("models", "tenant_defaults"):
                continue
            values[name] = _coerce(raw, f.type, name)
        values.update(overrides)
        return cls(**values)


def _coerce(raw: str, type_: Any, name: str) -> Any:
    t = str(type_)
    try:
        if t.startswith("int"):
            return int(raw)
        if t.startswith("float"):
            return float(raw)
        if t.startswith("bool"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
    except ValueError as exc:
        raise ValueError(f"LOADBEAR_{name.upper()}={raw!r} is not a valid {t}") from exc
    return raw or None if "None" in t else raw
