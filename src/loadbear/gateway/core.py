"""``Gateway``: the library entry point. The HTTP API and the CLI are thin shells over it.

    gw = Gateway.from_settings(Settings.load())
    gw.migrate()
    tenant = gw.tenants.create_tenant("acme")
    result = await gw.chat(auth, parse_chat_body(raw), feature="chat")
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from loadbear.config.catalog import Catalog
from loadbear.config.settings import Settings
from loadbear.gateway.breaker import BreakerRegistry, breaker_key
from loadbear.gateway.budget import BudgetGuard
from loadbear.gateway.ratelimit import RateLimiter
from loadbear.gateway.router import Router
from loadbear.gateway.chat import ChatCall, ChatResult, ChatStream
from loadbear.gateway.executor import Executor, RetryPolicy
from loadbear.gateway.validation import ChatBody
from loadbear.ledger.records import InteractionRecord
from loadbear.ledger.writer import LedgerWriter
from loadbear.providers.registry import ProviderRegistry
from loadbear.storage.db import Database, open_database
from loadbear.storage.migrate import is_current, migrate
from loadbear.tenancy.models import AuthContext
from loadbear.tenancy.service import TenantService

if TYPE_CHECKING:
    pass

log = logging.getLogger("loadbear")


class Gateway:
    def __init__(
        self,
        settings: Settings,
        db: Database | None = None,
        catalog: Catalog | None = None,
        providers: ProviderRegistry | None = None,
        breakers: BreakerRegistry | None = None,
        retry_policy: RetryPolicy | None = None,
        request_deadline: float | None = None,
    ) -> None:
        self.settings = settings
        self.db = db or open_database(settings.database_url, settings.pg_app_role, settings.db_pool_size)
        self.catalog = catalog or Catalog.from_settings(settings.models, default_model=settings.default_model)
        self.providers = providers or ProviderRegistry()
        # Reliability wiring: the deadline bounds every request (retries and fallbacks included);
        # breakers are shared through Redis when settings.redis_url is set, else in-process.
        self.settings_request_deadline = float(
            request_deadline if request_deadline is not None else settings.request_deadline_s)
        self.breakers = breakers or BreakerRegistry.from_settings(settings, probe_timeout=self.settings_request_deadline)
        self.executor = Executor(self.providers, self.breakers, retry_policy or RetryPolicy.from_settings(settings))
        self.tenants = TenantService(self.db, settings.tenant_defaults, settings.auth_cache_seconds)
        # Cost control: complexity routing, monthly budgets, rate limits (Redis-shared when configured).
        self.router = Router.from_settings(settings)
        self.budget = BudgetGuard.from_settings(settings, self.db)
        self.limits = RateLimiter.from_settings(settings)
        self._ledger: LedgerWriter | None = None
        self._knowledge = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> "Gateway":
        return cls(settings or Settings.load(), **kwargs)

    # -- lifecycle ----------------------------------------------------------------------

    def migrate(self) -> list[int]:
        return migrate(self.db, app_role=self.settings.pg_app_role)

    def is_current(self) -> bool:
        return is_current(self.db)

    @property
    def ledger(self) -> LedgerWriter:
        # Started lazily so that CLI commands that never write a row start no thread.
        if self._ledger is None:
            s = self.settings
            self._ledger = LedgerWriter(
                self.db, batch_size=s.ledger_batch_size, flush_interval=s.ledger_flush_interval_ms / 1000,
                queue_max=s.ledger_queue_max,
            )
        return self._ledger

    async def aclose(self) -> None:
        await self.providers.aclose()
        await self.breakers.aclose()
        await self.limits.aclose()
        await self.budget.aclose()
        self.close()

    @property
    def knowledge(self):
        """The tenant knowledge bases (created on first use: chat-only callers never load a model)."""
        if self._knowledge is None:
            from loadbear.knowledge.embeddings import get_embedder
            from loadbear.knowledge.service import KnowledgeService, KnowledgeSettings

            s = self.settings
            self._knowledge = KnowledgeService(
                self.db,
                lambda: get_embedder(s.embedding_model, self.catalog),
                KnowledgeSettings(chunk_tokens=s.chunk_tokens, chunk_overlap=s.chunk_overlap,
                                  max_upload_bytes=s.max_upload_bytes,
                                  inline_max_bytes=s.inline_ingest_max_bytes),
                on_change=self.knowledge_changed,
            )
        return self._knowledge

    def knowledge_changed(self, tenant_id: str) -> None:
        """A tenant's documents changed. The cache issue invalidates grounded answers here."""

    def close(self) -> None:
        if self._knowledge is not None:
            self._knowledge.close()
            self._knowledge = None
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        self.db.close()

    # -- the request path ---------------------------------------------------------------

    def authenticate(self, key: str | None) -> AuthContext:
        ctx = self.tenants.authenticate(key)
        if self.tenants.due_touch(ctx.key_id):
            self.ledger.touch_key(ctx.key_id, ctx.tenant_id)
        return ctx

    def new_call(self, auth: AuthContext, body: ChatBody, feature: str | None = None,
                 request_id: str | None = None) -> ChatCall:
        call = ChatCall(self, auth, body, body.feature or feature or "chat", request_id)
        call.resolve()
        return call

    async def chat(self, auth: AuthContext, body: ChatBody, feature: str | None = None,
                   request_id: str | None = None) -> ChatResult | ChatStream:
        """Answer one chat request: a :class:`ChatResult`, or a started :class:`ChatStream`."""
        call = self.new_call(auth, body, feature, request_id)
        await call.admit()
        try:
            await call.retrieve()
        except BaseException:
            call.release()
            raise
        if body.stream:
            return await call.open_stream()
        return await call.complete()

    def record(self, rec: InteractionRecord) -> None:
        """Hand a finished interaction to the ledger writer (never blocks the event loop for long)."""
        self.ledger.submit(rec)

    def degraded_from_cache(self, call: ChatCall) -> str | None:
        """First degraded step: a similar cached answer. Filled by the semantic cache."""
        return None

    def models_for(self, auth: AuthContext) -> list[dict[str, Any]]:
        allowed = auth.tenant.settings
        return [
            {"id": m.name, "object": "model", "created": 0, "owned_by": m.provider,
             "loadbear": {"tier": m.tier, "fallbacks": m.fallbacks}}
            for m in self.catalog if allowed.allows(m.name)
        ]

    def provider_health(self) -> list[dict[str, Any]]:
        """Per model: catalog entry, breaker state, recent error rate and latency (``/admin/providers``)."""
        return [
            {"model": m.name, "provider": m.provider, "upstream_model": m.upstream_model, "tier": m.tier,
             "fallbacks": m.fallbacks, "max_retries": m.max_retries,
             "timeouts": {"connect": m.timeouts.connect, "first_token": m.timeouts.first_token,
                          "idle": m.timeouts.idle, "total": m.timeouts.total},
             **self.breakers.snapshot(breaker_key(m))}
            for m in self.catalog
        ]
