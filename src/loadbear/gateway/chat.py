"""The chat request path: resolve the model chain, call it, answer, and write the ledger row.

One :class:`ChatCall` per request. It always ends in exactly one ledger row, whatever happens:
a normal answer, a client fault, a degraded answer, a mid-stream failure or a disconnect.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, AsyncIterator

import orjson

from loadbear.gateway.errors import ApiError
from loadbear.gateway.executor import (
    CallState,
    ChainExhausted,
    ClientFault,
    MidStreamFailure,
    continuation_request,
)
from loadbear.gateway.budget import Reservation, prompt_tokens
from loadbear.gateway.cache import CacheHit, CacheScope, doc_versions_from_citations, should_store, stream_pieces
from loadbear.gateway.grounding import Grounding, parse_knowledge
from loadbear.gateway.ratelimit import Permit
from loadbear.gateway.router import RouteDecision, model_allowed
from loadbear.gateway.validation import ChatBody
from loadbear.ledger.records import InteractionRecord
from loadbear.providers.base import ChatRequest, ModelConfig, ProviderError, StreamDelta, Usage
from loadbear.storage.values import uuid7
from loadbear.tenancy.models import AuthContext

if TYPE_CHECKING:
    from loadbear.gateway.core import Gateway

DONE = b"data: [DONE]\n\n"


@dataclass
class ChatResult:
    """A finished non-streamed answer (or a degraded one)."""

    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class ChatCall:
    gateway: "Gateway"
    auth: AuthContext
    body: ChatBody
    feature: str
    request_id: str | None = None
    id: str = field(default_factory=uuid7)
    started: float = field(default_factory=time.monotonic)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    state: CallState = field(default_factory=CallState)
    chain: list[ModelConfig] = field(default_factory=list)
    route_reason: str | None = None
    ttft: float | None = None
    status: str | None = None
    degraded_reason: str | None = None
    error: ProviderError | None = None
    # Mid-stream failures that another model continued (tenant setting allow_continuation).
    continuations: list[dict[str, Any]] = field(default_factory=list)
    # Retrieved sources when the request is grounded in the tenant's knowledge base.
    grounding: Grounding | None = None
    route: RouteDecision | None = None
    reservation: Reservation | None = None
    permit: Permit | None = None
    # Response cache: the request's scope (None when the cache is not in play), what the lookup
    # found, and the X-Loadbear-Cache value ("hit-exact", "hit-semantic", "miss", "bypass").
    cache_scope: CacheScope | None = None
    cache_hit: CacheHit | None = None
    cache_status: str | None = None
    # Wall-clock (start_ns, end_ns) of retrieval and the cache lookup, for the trace spans.
    phases: dict[str, tuple[int, int]] | None = None
    _recorded: bool = False
    _request: ChatRequest | None = None
    _knowledge: Any = None

    # -- set-up -------------------------------------------------------------------------

    def resolve(self) -> None:
        """Pick the model chain; raises ApiError for unknown or forbidden models."""
        gw, settings = self.gateway, self.auth.tenant.settings
        # Validate the knowledge request now, so a bad one is a 400 before any work (and routing
        # knows whether the answer will be grounded).
        self._knowledge = parse_knowledge(self.body.knowledge, settings.knowledge_features.get(self.feature))
        name = self.body.model
        if name == "auto":
            if self.route is None:  # (aresolve() may have routed already)
                self.route = gw.router.route(gw.catalog, settings, self.body.messages,
                                             grounded=self._knowledge is not None)
            name, self.route_reason = self.route.model, self.route.reason
        model = gw.catalog.get(name)
        if model is None:
            raise ApiError(404, f"The model '{name}' does not exist or you do not have access to it.",
                           code="model_not_found", param="model")
        if not model_allowed(settings, model):
            raise ApiError(403, f"The model '{name}' is not enabled for this tenant.",
                           type="permission_error", code="model_not_allowed", param="model")
        self.chain = gw.router.tenant_chain(gw.catalog, settings, name)

    async def aresolve(self) -> None:
        """:meth:`resolve` for the event loop: a learned classifier embeds the request (MiniLM,
        ~10 ms of CPU), which would stall every other request on the loop, so it routes in a
        worker thread; the rules classifier is cheap and stays inline."""
        gw = self.gateway
        if self.body.model == "auto" and gw.router.learned is not None:
            settings = self.auth.tenant.settings
            knowledge = parse_knowledge(self.body.knowledge, settings.knowledge_features.get(self.feature))
            self.route = await gw.router.aroute(gw.catalog, settings, self.body.messages,
                                                grounded=knowledge is not None)
        self.resolve()

    async def admit(self) -> None:
        """Rate limits, then the budget (which may downgrade the chain); ApiError 429 / 402."""
        await self.admit_limits()
        await self.admit_budget()

    def _estimated_prompt_tokens(self) -> int:
        tokens = prompt_tokens(self.body.messages)
        if self._knowledge is not None:  # retrieved sources join the prompt later
            tokens += self._knowledge.top_k * self.gateway.settings.chunk_tokens
        return tokens

    async def admit_limits(self) -> None:
        """Requests and tokens per minute (ApiError 429). A cache hit counts as a request too."""
        tenant = self.auth.tenant
        s = tenant.settings
        if not (s.rpm_limit or s.tpm_limit):
            return
        self.permit = await self.gateway.limits.check(tenant, self._estimated_prompt_tokens(), self.body.max_tokens)

    async def admit_budget(self) -> None:
        """Reserve the worst case of the model call (may downgrade the chain; ApiError 402).
        Runs after the cache lookup: a hit reserves nothing and is served even at the hard limit."""
        gw, tenant = self.gateway, self.auth.tenant
        s = tenant.settings
        if s.monthly_budget_usd is None:
            return
        try:
            adm = await gw.budget.admit(tenant, self.chain, self._estimated_prompt_tokens(), self.body.max_tokens,
                                        downgrade=lambda: gw.router.downgrade_chain(gw.catalog, s, self.chain))
        except ApiError:
            self.release()
            raise
        self.reservation = adm.reservation
        if adm.downgraded:
            self.chain = adm.chain
            self.route_reason = f"{self.route_reason}; {adm.note}" if self.route_reason else adm.note

    def release(self) -> None:
        """The request ends before any model call and without a ledger row: hand back what admit() took.
        Idempotent."""
        self.gateway.budget.settle_nowait(self.reservation, 0)
        self.gateway.limits.adjust_nowait(self.permit, 0)
        self.reservation = self.permit = None

    async def retrieve(self) -> None:
        """Ground the request in the tenant's knowledge base when asked to (or by feature default)."""
        kr = self._knowledge
        if kr is None:
            return
        question = next((m["content"] for m in reversed(self.body.messages) if m["role"] == "user"), "")
        if not question.strip():
            self.grounding = Grounding([])
            return
        from loadbear.knowledge.types import KnowledgeError

        t0 = time.time_ns()
        try:
            chunks = await asyncio.to_thread(self.gateway.knowledge.query, self.auth.tenant_id, question[:4000],
                                             kr.top_k, kr.filters)
        except KnowledgeError as exc:
            raise ApiError(exc.status, exc.message, code=exc.code, param=f"knowledge.{exc.param}" if exc.param else "knowledge") from None
        self.phase("retrieval", t0)
        self.grounding = Grounding(chunks)

    def phase(self, name: str, start_ns: int) -> None:
        """Note that a phase (retrieval, cache lookup) ran from ``start_ns`` until now: wall-clock
        nanoseconds, from which the trace spans are built after the request."""
        if self.phases is None:
            self.phases = {}
        self.phases[name] = (start_ns, time.time_ns())

    def chat_request(self) -> ChatRequest:
        if self._request is None:
            b = self.body
            g = self.grounding
            self._request = ChatRequest(
                messages=g.messages(b.messages) if g else b.messages, temperature=b.temperature, top_p=b.top_p,
                max_tokens=b.max_tokens, stop=b.stop, user=b.user, context=g.context() if g else None)
        return self._request

    # -- the response cache -------------------------------------------------------------

    def cache_tier(self) -> str:
        """The scope's model part. ``auto``: the tier the router picked, fixed before any budget
        downgrade, so a hit is found whichever chain the budget would pick; an explicit model:
        that model (a client that names gpt-4o never gets another model's cached answer)."""
        if self.route is not None:
            return "tier:" + (self.route.tier or self.route.model)
        return "model:" + self.body.model

    def _cache_extra(self) -> dict[str, Any]:
        b, k = self.body, self._knowledge
        extra: dict[str, Any] = {}
        if b.max_tokens is not None:
            extra["max_tokens"] = b.max_tokens
        if b.stop:
            extra["stop"] = b.stop
        if k is not None:
            extra["knowledge"] = [k.top_k, k.filters]
        return extra

    async def lookup_cache(self) -> CacheHit | None:
        """Exact, then semantic, in the request's scope; None on a miss or when the cache is not
        in play (tenant setting, ``"cache": false``, a request that cannot be cached)."""
        gw = self.gateway
        policy = gw.cache_policy(self.auth.tenant)
        if policy is None:
            return None
        if not self.body.cache:
            self.cache_status = "bypass"
            return None
        versions = doc_versions_from_citations(self.grounding.citations()) if self.grounding is not None else None
        scope = gw.cache.key_for(self.auth.tenant_id, self.feature, self.body.messages, self.cache_tier(), versions,
                                 extra=self._cache_extra())
        if not scope.cacheable:
            self.cache_status = "bypass"
            return None
        self.cache_scope = scope
        t0 = time.time_ns()
        hit = await gw.cache.lookup(scope, threshold=policy.threshold, semantic=policy.semantic)
        self.phase("cache", t0)
        self.cache_status = "miss" if hit is None else f"hit-{hit.kind}"
        self.cache_hit = hit
        return hit

    def serve_cached(self, hit: CacheHit) -> "ChatResult | ChatStream":
        """Answer from the cache exactly like a model answer: a JSON completion or an SSE stream."""
        self.cache_hit = hit
        self.state.finish_reason = "stop"
        self.ttft = time.monotonic()
        if self.body.stream:
            return ChatStream.from_cache(self, hit.text)
        self.state.text_parts = [hit.text]
        self.finish("ok")
        return ChatResult(self.completion_body(hit.text, "stop", Usage()), self.headers())

    def _store_in_cache(self, text: str) -> None:
        """Queue an ok answer for the cache (the writer thread embeds and inserts it)."""
        scope, st = self.cache_scope, self.state
        if scope is None or st.served is None or not should_store(
                "ok", finish_reason=st.finish_reason, text=text, cached=self.cache_hit is not None,
                continued=bool(self.continuations), bypass=not self.body.cache):
            return
        # Only an answer of the scope's own model or tier: not a failover's or a budget
        # downgrade's, which would otherwise be served to requests that did not need them.
        if self.route is not None:
            if st.served.tier != self.route.tier and st.served.name != self.route.model:
                return
        elif st.served.name != self.body.model:
            return
        ok = next((a for a in reversed(st.attempts) if a.status == "ok"), None)
        if ok is None:
            return
        citations = self.grounding.citations() if self.grounding is not None else None
        policy = self.gateway.cache_policy(self.auth.tenant)
        self.gateway.cache.store(
            scope, answer_text=text, model=st.served.name, usage_tokens=(ok.prompt_tokens, ok.completion_tokens),
            cost_micro_usd=ok.cost_micro_usd, citations=citations,
            doc_versions=doc_versions_from_citations(citations) if citations is not None else None,
            ttl_s=policy.ttl_s if policy is not None else None)

    def cache_saved_micro_usd(self, hit: CacheHit) -> int:
        """What the replaced call would cost today: the entry's tokens at its model's catalog
        price (the entry's own recorded cost if the model left the catalog)."""
        m = self.gateway.catalog.get(hit.model)
        if m is None:
            return hit.cost_micro_usd
        return m.cost_micro_usd(Usage(prompt_tokens=hit.prompt_tokens, completion_tokens=hit.completion_tokens))

    @property
    def deadline(self) -> float:
        return self.started + self.gateway.settings_request_deadline

    def continuation_chain(self, failed: ModelConfig | None) -> list[ModelConfig]:
        """Where a stream that failed mid-answer on ``failed`` may continue: the models after it in
        the chain, if the tenant allows continuation. The ``local`` extractive model cannot
        continue someone else's text, so it is left out."""
        if not self.auth.tenant.settings.allow_continuation or failed is None:
            return []
        names = [m.name for m in self.chain]
        start = names.index(failed.name) + 1 if failed.name in names else len(names)
        return [m for m in self.chain[start:] if m.provider != "local"]

    @property
    def served_name(self) -> str:
        if self.cache_hit is not None and self.state.served is None:
            return self.cache_hit.model
        return self.state.served.name if self.state.served else (self.chain[0].name if self.chain else self.body.model)

    # -- non-streaming ------------------------------------------------------------------

    async def complete(self) -> ChatResult:
        req = self.chat_request()
        try:
            result = await self.gateway.executor.complete(self.chain, req, self.state, self.deadline)
        except ClientFault as cf:
            self.error = cf.error
            self.finish("error")
            raise _client_fault_error(cf.error, self.id) from None
        except ChainExhausted as ex:
            text = await self.degraded_text(ex)
            self.state.text_parts = [text]
            self.state.finish_reason = "stop"
            self.finish("degraded")
            return ChatResult(self.completion_body(text, "stop", Usage()), self.headers(degraded=True))
        except asyncio.CancelledError:
            self.finish("cancelled")
            raise
        self.ttft = time.monotonic()
        self.finish("ok")
        return ChatResult(self.completion_body(result.text, result.finish_reason, self.total_usage()), self.headers())

    def completion_body(self, text: str, finish: str, usage: Usage) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": int(self.created_at.timestamp()),
            "model": self.served_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": _usage_body(usage),
            "loadbear": self.meta(),
        }

    # -- streaming ----------------------------------------------------------------------

    async def open_stream(self) -> "ChatStream":
        """Start the chain and wait for its first event, so the status line can still say 4xx."""
        stream = ChatStream(self)
        await stream.start()
        return stream

    # -- shared -------------------------------------------------------------------------

    async def degraded_text(self, ex: ChainExhausted) -> str:
        self.error = ex.last
        self.degraded_reason = ex.last.kind.value if ex.last else "all_models_unavailable"
        # The first degraded step: a similar cached answer (looser threshold), then the honest message.
        cached = await self.gateway.degraded_from_cache(self)
        if isinstance(cached, CacheHit):
            self.cache_hit = cached
            self.cache_status = f"hit-{cached.kind}"
            return cached.text
        if cached is not None:
            return cached
        return self.auth.tenant.settings.degraded_message()

    def meta(self) -> dict[str, Any]:
        st = self.state
        hit = self.cache_hit
        return {
            "interaction_id": self.id,
            "requested_model": self.body.model,
            "served_model": st.served.name if st.served else (hit.model if hit is not None else None),
            "degraded": self.status == "degraded",
            "cached": hit is not None,
            **({"cache": self.cache_status} if self.cache_status is not None else {}),
            **({"cache_entry_id": hit.entry_id, "cache_similarity": hit.similarity} if hit is not None else {}),
            "attempts": len(st.attempts),
            **({"continued": len(self.continuations)} if self.continuations else {}),
            **({"citations": self.citations()} if self.grounding is not None else {}),
        }

    def citations(self) -> list[dict[str, Any]]:
        # A cached answer cites by the numbers of the sources it was made from, not today's ranking.
        if self.cache_hit is not None and self.cache_hit.citations is not None:
            return self.cache_hit.citations
        return self.grounding.citations() if self.grounding is not None else []

    def headers(self, degraded: bool = False) -> dict[str, str]:
        h = {"x-loadbear-interaction-id": self.id}
        if self.state.served:
            h["x-loadbear-model"] = self.state.served.name
        elif self.cache_hit is not None:
            h["x-loadbear-model"] = self.cache_hit.model
        if degraded:
            h["x-loadbear-degraded"] = "true"
        if self.cache_status is not None:
            h["x-loadbear-cache"] = self.cache_status
        return h

    def total_usage(self) -> Usage:
        """What the interaction consumed: every attempt's tokens, failed ones included."""
        u = Usage()
        for a in self.state.attempts:
            u.prompt_tokens += a.prompt_tokens
            u.completion_tokens += a.completion_tokens
            u.cached_tokens += a.cached_input_tokens
            u.estimated = u.estimated or a.tokens_estimated
        return u

    def finish(self, status: str) -> None:
        """Write the ledger row. Idempotent: the first call wins."""
        if self._recorded:
            return
        self._recorded = True
        self.status = status
        st = self.state
        u = self.total_usage()
        err = self.error
        settings = self.auth.tenant.settings
        text = "".join(st.text_parts)
        gw = self.gateway
        cost = sum(a.cost_micro_usd for a in st.attempts)
        saved = 0
        hit = self.cache_hit
        if hit is not None and status == "ok":
            saved = self.cache_saved_micro_usd(hit)
        elif self.route is not None and status == "ok" and st.served is not None:
            saved = gw.router.savings_micro_usd(gw.catalog, settings, st.served, u.prompt_tokens,
                                                u.completion_tokens, u.cached_tokens, actual_cost_micro_usd=cost)
        if status == "ok" and hit is None and self.cache_scope is not None:
            self._store_in_cache(text)
        gw.budget.settle_nowait(self.reservation, cost)
        gw.limits.adjust_nowait(self.permit, u.prompt_tokens + u.completion_tokens)
        rec = InteractionRecord(
            id=self.id,
            tenant_id=self.auth.tenant_id,
            feature=self.feature,
            requested_model=self.body.model,
            model=self.served_name,
            status=status,
            cached=hit is not None,
            cache_kind=hit.kind if hit is not None else None,
            cache_similarity=hit.similarity if hit is not None else None,
            cache_entry_id=hit.entry_id if hit is not None else None,
            created_at=self.created_at,
            latency_ms=int((time.monotonic() - self.started) * 1000),
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            cached_input_tokens=u.cached_tokens,
            tokens_estimated=u.estimated,
            cost_micro_usd=cost,
            saved_micro_usd=saved,
            user_external_id=self.body.user,
            request_id=self.request_id,
            provider=st.served.provider if st.served else None,
            route="auto" if self.body.model == "auto" else "explicit",
            route_reason=self.route_reason,
            streamed=self.body.stream,
            ttft_ms=None if self.ttft is None else int((self.ttft - self.started) * 1000),
            finish_reason=st.finish_reason if status in ("ok", "degraded") else None,
            error=(err.message[:1000] if err else None) if status != "ok" else None,
            error_type=(self.degraded_reason if status == "degraded" else (err.kind.value if err else None))
            if status != "ok" else None,
            http_status=err.status if err and status != "ok" else None,
            retrieved_chunk_ids=self.grounding.chunk_ids() if self.grounding is not None else None,
            prompt_text=_prompt_text(self.body.messages) if settings.store_content else None,
            response_text=text if settings.store_content else None,
            metadata={**self.body.metadata, **({"skipped": st.skipped} if st.skipped else {}),
                      **({"route": self.route.ledger_metadata()} if self.route is not None else {}),
                      **({"continuations": self.continuations} if self.continuations else {})},
            attempts=st.attempts,
            tenant_slug=self.auth.tenant.slug,
            phases=self.phases,
        )
        self.gateway.record(rec)


class ChatStream:
    """A streamed answer as SSE bytes. ``start()`` peeks the first event; ``body()`` yields the rest."""

    def __init__(self, call: ChatCall) -> None:
        self.call = call
        self.created = int(call.created_at.timestamp())
        self._upstream: AsyncIterator[StreamDelta] | None = None
        self._first: StreamDelta | None = None
        self._degraded: str | None = None
        self._cached: str | None = None
        self.headers: dict[str, str] = {}

    @classmethod
    def from_cache(cls, call: ChatCall, text: str) -> "ChatStream":
        """A cache hit as a stream: the answer in pieces of a few words, like a model's deltas."""
        stream = cls(call)
        stream._cached = text
        stream.headers = call.headers()
        return stream

    async def start(self) -> None:
        c = self.call
        self._upstream = c.gateway.executor.stream(c.chain, c.chat_request(), c.state, c.deadline)
        try:
            self._first = await self._upstream.__anext__()
            c.ttft = time.monotonic()
        except StopAsyncIteration:
            self._first = None
        except ClientFault as cf:
            c.error = cf.error
            c.finish("error")
            raise _client_fault_error(cf.error, c.id) from None
        except ChainExhausted as ex:
            self._degraded = await c.degraded_text(ex)
        except asyncio.CancelledError:
            c.finish("cancelled")
            raise
        self.headers = c.headers(degraded=self._degraded is not None)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.call.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.call.served_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if extra:
            chunk.update(extra)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def body(self) -> AsyncIterator[bytes]:
        c = self.call
        status = "cancelled"
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            if self._cached is not None:
                c.state.text_parts = [self._cached]
                for piece in stream_pieces(self._cached):
                    yield self._chunk({"content": piece})
                yield self._chunk({}, "stop", {"loadbear": c.meta()})
                if c.body.include_usage:
                    yield self._usage_chunk(Usage())
                if c.grounding is not None:
                    yield self._citations_chunk()
                status = "ok"
                c.finish(status)
                yield DONE
                return
            if self._degraded is not None:
                c.state.text_parts = [self._degraded]
                c.state.finish_reason = "stop"
                yield self._chunk({"content": self._degraded})
                yield self._chunk({}, "stop", {"loadbear": {**c.meta(), "degraded": True}})
                if c.body.include_usage:
                    yield self._usage_chunk(Usage())
                if c.grounding is not None:
                    yield self._citations_chunk()
                status = "degraded"
                c.finish(status)  # the row is written before the client sees the end
                yield DONE
                return
            delta = self._first
            shown: list[str] = []  # what the client has received, across continuations
            while True:
                try:
                    while delta is not None:
                        if delta.text:
                            shown.append(delta.text)
                            yield self._chunk({"content": delta.text})
                        delta = await self._upstream.__anext__()
                    break
                except StopAsyncIteration:
                    break
                except MidStreamFailure as mf:
                    delta = await self._continue(mf, shown)
                    if delta is None:
                        c.state.text_parts = shown
                        status = "error"
                        c.finish(status)
                        yield _error_event(c.error or mf.error)
                        return
            c.state.text_parts = shown
            yield self._chunk({}, c.state.finish_reason or "stop",
                              {"loadbear": c.meta()} if c.continuations else None)
            if c.body.include_usage:
                yield self._usage_chunk(c.total_usage())
            if c.grounding is not None:
                yield self._citations_chunk()
            status = "ok"
            c.finish(status)
            yield DONE
        finally:
            if self._upstream is not None:
                try:
                    await self._upstream.aclose()
                except Exception:
                    pass
            c.finish(status)

    async def _continue(self, mf: MidStreamFailure, shown: list[str]) -> StreamDelta | None:
        """After a mid-stream failure: the first delta of another model continuing the answer,
        or None (then the stream ends with an error event). Before that first delta the
        continuation fails over invisibly, like any stream."""
        c = self.call
        c.error = mf.error
        chain = c.continuation_chain(mf.model)
        if not chain:
            return None
        partial = "".join(shown)
        note: dict[str, Any] = {"from_model": mf.model.name if mf.model else None, "error_type": mf.error.kind.value,
                                "after_chars": len(partial), "to_model": None}
        c.continuations.append(note)
        if self._upstream is not None:
            await self._upstream.aclose()
        c.state.committed = False
        self._upstream = c.gateway.executor.stream(chain, continuation_request(c.chat_request(), partial),
                                                   c.state, c.deadline)
        try:
            first = await self._upstream.__anext__()
        except StopAsyncIteration:
            first = None
        except (ChainExhausted, ClientFault) as exc:
            last = exc.last if isinstance(exc, ChainExhausted) else exc.error
            if last is not None:
                c.error = last
            return None
        note["to_model"] = c.state.served.name if c.state.served else None
        if first is None:  # an empty continuation: the answer simply ends here
            return StreamDelta("", c.state.finish_reason or "stop")
        return first

    def _citations_chunk(self) -> bytes:
        """The sources of a grounded answer, as the last event before [DONE]. A chunk with no
        choices (like the usage chunk), so OpenAI clients pass it through untouched."""
        chunk = {
            "id": self.call.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.call.served_name, "choices": [],
            "loadbear": {"citations": self.call.citations()},
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _usage_chunk(self, usage: Usage) -> bytes:
        chunk = {
            "id": self.call.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.call.served_name, "choices": [], "usage": _usage_body(usage),
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def abort(self) -> None:
        """The response never started (client gone): close upstream and record the row."""
        if self._upstream is not None:
            try:
                await self._upstream.aclose()
            except Exception:
                pass
        self.call.finish("cancelled")


def _usage_body(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _error_event(err: ProviderError) -> bytes:
    body = {"error": {
        "message": f"The upstream model failed mid-answer ({err.kind.value}): {err.message}",
        "type": "upstream_error", "param": None, "code": err.kind.value,
    }}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _client_fault_error(err: ProviderError, interaction_id: str) -> ApiError:
    code = "context_length_exceeded" if err.kind.value == "context_length" else "invalid_request"
    # This refusal has a ledger row (the upstream was called): the header lets the client find it.
    return ApiError(400, f"The model rejected the request: {err.message}", code=code,
                    headers={"x-loadbear-interaction-id": interaction_id})


def _prompt_text(messages: list[dict[str, Any]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
