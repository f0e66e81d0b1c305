"""``Gateway``: the library entry point. The HTTP API and the CLI are thin shells over it.

    gw = Gateway.from_settings(Settings.load())
    gw.migrate()
    tenant = gw.tenants.create_tenant("acme")
    result = await gw.chat(auth, parse_chat_body(raw), feature="chat")
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from loadbear.config.catalog import Catalog
from loadbear.config.settings import Settings
from loadbear.gateway.breaker import BreakerRegistry, breaker_key
from loadbear.gateway.budget import BudgetGuard
from loadbear.gateway.cache import CacheHit, CachePolicy, ResponseCache
from loadbear.gateway.ratelimit import RateLimiter
from loadbear.gateway.router import Router, model_allowed
from loadbear.gateway.chat import ChatCall, ChatResult, ChatStream
from loadbear.gateway.executor import Executor, RetryPolicy
from loadbear.gateway.validation import ChatBody
from loadbear.ledger.records import InteractionRecord
from loadbear.ledger.writer import LedgerWriter
from loadbear.observability import Observability, bind_call
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
        observability: Observability | None = None,
    ) -> None:
        self.settings = settings
        # Metrics, spans and failure logs, all derived from the ledger records (see record()).
        self.observability = observability or Observability.from_settings(settings)
        self.db = db or open_database(settings.database_url, settings.pg_app_role, settings.db_pool_size,
                                      app_url=settings.database_app_url)
        self.catalog = catalog or Catalog.from_settings(settings.models, default_model=settings.default_model)
        self.providers = providers or ProviderRegistry()
        # Reliability wiring: the deadline bounds every request (retries and fallbacks included);
        # breakers are shared through Redis when settings.redis_url is set, else through the database.
        self.settings_request_deadline = float(
            request_deadline if request_deadline is not None else settings.request_deadline_s)
        self.breakers = breakers or BreakerRegistry.from_settings(
            settings, probe_timeout=self.settings_request_deadline, db=self.db)
        self.executor = Executor(self.providers, self.breakers, retry_policy or RetryPolicy.from_settings(settings))
        self.tenants = TenantService(self.db, settings.tenant_defaults, settings.auth_cache_seconds)
        # Cost control: complexity routing, monthly budgets, rate limits (Redis-shared when configured).
        self.router = Router.from_settings(settings)
        self.budget = BudgetGuard.from_settings(settings, self.db)
        self.limits = RateLimiter.from_settings(settings)
        self._ledger: LedgerWriter | None = None
        self._knowledge = None
        self._cache: ResponseCache | None = None
        self._cache_lock = threading.Lock()  # knowledge jobs reach the cache from their own threads

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

    @property
    def cache(self) -> ResponseCache:
        """The response cache (created on first use). It embeds with the knowledge base's embedder
        factory, so the MiniLM weights are loaded once per process."""
        if self._cache is None:
            from loadbear.knowledge.embeddings import get_embedder

            s = self.settings
            with self._cache_lock:
                if self._cache is None:
                    self._cache = ResponseCache(self.db, lambda: get_embedder(s.embedding_model, self.catalog))
        return self._cache

    def cache_policy(self, tenant: Any) -> CachePolicy | None:
        """The tenant's cache policy, or None when the cache is off for it (or for the process)."""
        ts = tenant.settings
        if not (ts.cache_enabled and self.settings.cache_enabled):
            return None
        policy = CachePolicy.for_tenant(ts)
        # The degraded step is the looser one: a tenant that lowers its threshold lowers both.
        policy.degraded_threshold = min(policy.degraded_threshold, policy.threshold)
        return policy

    def knowledge_changed(self, tenant_id: str) -> None:
        """A tenant's documents changed (ingest, replace, delete, re-embed): drop its cached grounded
        answers whose documents changed or are gone. Lookups verify versions again, so a failure
        here costs hits, never serves a stale answer."""
        if not self.settings.cache_enabled:
            return
        try:
            self.cache.invalidate_stale(tenant_id)
        except Exception:
            log.exception("response cache: invalidating tenant %s's grounded answers failed", tenant_id)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self._knowledge is not None:
            self._knowledge.close()
            self._knowledge = None
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        self.observability.close()
        self.db.close()

    # -- the request path ---------------------------------------------------------------

    def authenticate(self, key: str | None) -> AuthContext:
        ctx = self.tenants.authenticate(key)
        if self.tenants.due_touch(ctx.key_id):
            self.ledger.touch_key(ctx.key_id, ctx.tenant_id)
        return ctx

    def new_call(self, auth: AuthContext, body: ChatBody, feature: str | None = None,
                 request_id: str | None = None, resolve: bool = True) -> ChatCall:
        call = ChatCall(self, auth, body, body.feature or feature or "chat", request_id)
        bind_call(call.id, auth.tenant.slug, request_id)
        if resolve:
            call.resolve()
        return call

    async def chat(self, auth: AuthContext, body: ChatBody, feature: str | None = None,
                   request_id: str | None = None) -> ChatResult | ChatStream:
        """Answer one chat request: a :class:`ChatResult`, or a started :class:`ChatStream`."""
        call = self.new_call(auth, body, feature, request_id, resolve=False)
        await call.aresolve()
        await call.admit_limits()
        try:
            await call.retrieve()
            # The cache before the budget: a hit costs nothing, so it reserves nothing.
            hit = await call.lookup_cache()
            if hit is not None:
                return call.serve_cached(hit)
            await call.admit_budget()
        except BaseException:
            call.release()
            raise
        if body.stream:
            return await call.open_stream()
        return await call.complete()

    def record(self, rec: InteractionRecord) -> None:
        """Hand a finished interaction to the ledger writer (never blocks the event loop for long),
        and to observability: metrics, spans and failure logs come from this one record."""
        self.ledger.submit(rec)
        self.observability.record(rec)

    async def degraded_from_cache(self, call: ChatCall) -> CacheHit | str | None:
        """First degraded step when every model failed: a similar cached answer of the request's
        scope at the tenant's looser threshold (``cache_degraded_threshold``), or None."""
        scope = call.cache_scope
        policy = self.cache_policy(call.auth.tenant)
        if scope is None or policy is None or not call.body.cache:
            return None
        return await self.cache.lookup_degraded(scope, threshold=policy.degraded_threshold)

    def models_for(self, auth: AuthContext) -> list[dict[str, Any]]:
        # The same test as a chat request's (allow-list and forbidden tiers): a listed model never 403s.
        settings = auth.tenant.settings
        return [
            {"id": m.name, "object": "model", "created": 0, "owned_by": m.provider,
             "loadbear": {"tier": m.tier, "fallbacks": m.fallbacks}}
            for m in self.catalog if model_allowed(settings, m)
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
