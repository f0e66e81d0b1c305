"""The response cache (gateway/cache.py) on both backends: hits, scope isolation, look-alikes,
grounded invalidation, TTL, the degraded lookup, what is never stored, and RLS.

The semantic tests use the real all-MiniLM-L6-v2 (the threshold means something only for it);
each embeds a handful of questions.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from loadbear.gateway.cache import (
    CacheHit,
    CachePolicy,
    ResponseCache,
    doc_versions_from_citations,
    should_store,
    stream_pieces,
)
from loadbear.gateway.cache_text import content_words, guard, neighbour_signatures, normalize_exact
from loadbear.knowledge.store import KnowledgeStore
from loadbear.knowledge.types import ChunkDraft
from loadbear.storage.values import utcnow
from loadbear.tenancy.service import TenantService

SYSTEM = "You are Acme's support assistant."
Q = "How do I get a refund for the Team plan?"
ANSWER = "Team plan refunds: within 30 days, from Billing > Refunds."


def conv(question: str, system: str = SYSTEM, history: list[tuple[str, str]] = ()) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": question}]


@pytest.fixture
def tenants(db):
    svc = TenantService(db)
    return svc.create_tenant("acme", "Acme", {}).id, svc.create_tenant("globex", "Globex", {}).id


@pytest.fixture
def cache(db):
    c = ResponseCache(db, background=False)
    yield c
    c.close()


def put(cache: ResponseCache, tenant: str, question: str = Q, answer: str = ANSWER, *, feature: str = "helpdesk",
        system: str = SYSTEM, tier: str = "simple", history=(), versions=None, ttl_s=3600, now=None, **kw):
    scope = cache.key_for(tenant, feature, conv(question, system, history), tier, versions)
    assert cache.store(scope, answer_text=answer, model="gpt-4o-mini", usage_tokens=(120, 30), cost_micro_usd=41,
                       ttl_s=ttl_s, now=now, **kw)
    return scope


def get(cache: ResponseCache, tenant: str, question: str, *, feature: str = "helpdesk", system: str = SYSTEM,
        tier: str = "simple", history=(), versions=None, threshold=None, now=None) -> CacheHit | None:
    scope = cache.key_for(tenant, feature, conv(question, system, history), tier, versions)
    return cache.lookup_sync(scope, threshold=threshold, now=now)


# -- hits -----------------------------------------------------------------------------------


def test_a_repeat_and_a_paraphrase_hit(cache, tenants):
    acme, _ = tenants
    assert get(cache, acme, Q) is None
    put(cache, acme)
    exact = get(cache, acme, "  how do I get a refund for the team plan ")
    assert exact is not None and exact.kind == "exact" and exact.similarity == 1.0
    assert exact.text == ANSWER and exact.model == "gpt-4o-mini" and exact.cost_micro_usd == 41
    assert (exact.prompt_tokens, exact.completion_tokens) == (120, 30) and exact.query_text == Q
    para = get(cache, acme, "How can I get a refund for the Team plan?")
    assert para is not None and para.kind == "semantic" and 0.95 <= para.similarity < 1.0
    assert para.entry_id == exact.entry_id and para.text == ANSWER


async def test_async_lookup_and_background_writer(db, tenants):
    acme, _ = tenants
    cache = ResponseCache(db)  # background writer
    try:
        scope = cache.key_for(acme, "helpdesk", conv(Q), "simple")
        assert await cache.lookup(scope) is None
        assert cache.store(scope, answer_text=ANSWER, model="m", cost_micro_usd=7)
        assert cache.flush(30)
        hit = await cache.lookup(cache.key_for(acme, "helpdesk", conv(Q), "simple"))
        assert hit is not None and hit.kind == "exact"
        await cache.lookup(cache.key_for(acme, "helpdesk", conv(Q), "simple"))
        assert cache.flush(30)
        with db.tenant_tx(acme, write=False) as c:
            assert c.scalar("SELECT hits FROM cache_entries WHERE tenant_id = ?", (acme,)) == 2
    finally:
        cache.close()


def test_semantic_lookup_reuses_the_query_vector_for_the_store(cache, tenants):
    acme, _ = tenants
    put(cache, acme, "How do I export my data as CSV?", "Export: Settings > Data > CSV.")
    scope = cache.key_for(acme, "helpdesk", conv("Can I export my data to CSV?"), "simple")
    assert cache.lookup_sync(scope) is None  # 0.92: below the default threshold
    assert scope.query_vector is not None  # it was embedded to decide; store() takes it along
    before = cache.counters["embedded"]
    cache.store(scope, answer_text="Yes: Settings > Data > CSV.", model="m")
    assert cache.counters["embedded"] == before
    hit = get(cache, acme, "Can I export my data to CSV?")
    assert hit is not None and hit.kind == "exact" and hit.text.startswith("Yes")


# -- scope ----------------------------------------------------------------------------------


def test_scope_isolation(cache, tenants):
    acme, globex = tenants
    put(cache, acme)
    assert get(cache, acme, Q) is not None
    assert get(cache, globex, Q) is None, "another tenant"
    assert get(cache, acme, Q, feature="sales") is None, "another feature"
    assert get(cache, acme, Q, system="You are a pirate.") is None, "another system prompt"
    assert get(cache, acme, Q, system="") is None, "no system prompt"
    assert get(cache, acme, Q, tier="complex") is None, "another model tier"
    assert get(cache, acme, Q, history=[("Hi", "Hello! How can I help?")]) is None, "another conversation"
    extra = cache.key_for(acme, "helpdesk", conv(Q), "simple", extra={"max_tokens": 5})
    assert cache.lookup_sync(extra) is None, "other generation parameters"
    # and the paraphrase path too
    assert get(cache, globex, "How can I get a refund for the Team plan?") is None
    assert get(cache, acme, "How can I get a refund for the Team plan?", feature="sales") is None


def test_follow_ups_hit_only_after_the_same_conversation(cache, tenants):
    acme, _ = tenants
    history = [("How much does the Team plan cost?", "$10 per seat and month.")]
    put(cache, acme, "What about the Business plan?", "$25 per seat and month.", history=history)
    assert get(cache, acme, "What about the Business plan?", history=history) is not None
    assert get(cache, acme, "What about the Business plan?") is None
    other = [("How do I get a refund for the Team plan?", "Within 30 days.")]
    assert get(cache, acme, "What about the Business plan?", history=other) is None


@pytest.mark.parametrize("stored,asked", [
    ("How do I get a refund for the Team plan?", "How do I get a refund for the Business plan?"),
    ("Why was I charged twice this month?", "Why was I charged twice last month?"),  # MiniLM: 0.987
    ("Can I add 5 users to my workspace?", "Can I add 50 users to my workspace?"),
    ("How do I enable two-factor authentication?", "How do I disable two-factor authentication?"),
    ("can i switch from the free plan to the team plan", "can i switch from the team plan to the free plan"),
])
def test_look_alikes_with_another_intent_miss(cache, tenants, stored, asked):
    acme, _ = tenants
    put(cache, acme, stored)
    assert get(cache, acme, stored) is not None
    assert get(cache, acme, asked) is None
    assert get(cache, acme, asked, threshold=0.5) is None, "the guard holds whatever the threshold"
    scope = cache.key_for(acme, "helpdesk", conv(asked), "simple")
    assert cache.lookup_degraded_sync(scope, threshold=0.5) is None


@pytest.mark.parametrize("a,b,same", [
    ("How do I get a refund for the Team plan?", "how do i get refund for team plan", True),
    ("How do I get a refund for the Team plan?", "How do I get a refund for the Business plan?", False),
    ("Is my data stored in the EU?", "Is my data stored in the US?", False),
    ("Does the Team plan include SSO?", "Is SSO included in the Team plan?", True),
    ("How do I move from Team to Business?", "Can I switch to Business from the Team plan?", True),
    ("How do I upgrade from Team to Business?", "How do I upgrade from Business to Team?", False),
    ("Why can't I log in?", "How do I log in?", False),
    ("My invoice #48213 is wrong", "My invoice #48214 is wrong", False),
    ("User anna@contoso.com can't log in", "User ben@contoso.com can't log in", False),
    ("What is comment sprint webhook backup?", "What is comment sprint webhook backup? Thanks!", True),
    ("Why was I charged $49 on March 3?", "Why was I charged $49 on March 4?", False),
])
def test_guard(a, b, same):
    assert (guard(a, b) is None) is same
    assert (guard(b, a) is None) is same


def test_text_keys():
    assert normalize_exact("  How do I   reset MY password?? ") == "how do i reset my password"
    assert content_words("How many seats are included?") == content_words("how many seats does it include")
    sigs = neighbour_signatures(content_words("How do I get a refund for the Team plan?"))
    assert len(sigs) == 5 and sigs[0] == "how plan refund team"
    assert neighbour_signatures(content_words("reset password")) == ["password reset"]
    assert stream_pieces("one two three four five six", 4) == ["one two three four ", "five six"]
    assert "".join(stream_pieces(ANSWER)) == ANSWER


# -- grounded answers -------------------------------------------------------------------------


def _doc(db, tenant: str, external_id: str, text: str):
    store = KnowledgeStore(db)
    rng = np.random.default_rng(abs(hash(text)) % 2**32)
    v = rng.standard_normal((1, 384)).astype(np.float32)
    return store.upsert_document(tenant, title=external_id, external_id=external_id, embedding_model="test",
                                 chunks=[ChunkDraft(text=text, start=0, end=len(text), heading_path=[], token_count=5)],
                                 vectors=v / np.linalg.norm(v))


def test_grounded_answers_die_with_their_documents(db, cache, tenants):
    acme, globex = tenants
    refunds = _doc(db, acme, "refunds.md", "Refunds within 30 days.")
    prices = _doc(db, acme, "prices.md", "Team is $10.")
    v1 = {refunds.id: refunds.version, prices.id: prices.version}
    citations = [{"index": 1, "document_id": refunds.id, "version": refunds.version}]
    assert doc_versions_from_citations(citations) == {refunds.id: 1}
    put(cache, acme, versions=v1, citations=citations)
    hit = get(cache, acme, Q, versions=v1)
    assert hit is not None and hit.citations == citations
    assert get(cache, acme, "How can I get a refund for the Team plan?", versions=v1) is not None
    assert get(cache, acme, Q) is None, "an ungrounded request is another scope"

    # edit: the lookup itself refuses the entry, even before any invalidation ran ...
    edited = _doc(db, acme, "refunds.md", "Refunds within 14 days.")
    assert edited.id == refunds.id and edited.version == 2
    v2 = {refunds.id: 2, prices.id: prices.version}
    assert get(cache, acme, Q, versions=v2) is None
    assert get(cache, acme, Q, versions=v1) is None, "a stale retrieval cannot revive it either"
    assert get(cache, acme, "How can I get a refund for the Team plan?", versions=v2) is None
    assert cache.invalidate_stale(globex) == 0
    assert cache.invalidate_stale(acme) == 1 and cache.count(acme) == 0

    # an answer built from the old version is refused at write time
    scope = cache.key_for(acme, "helpdesk", conv(Q), "simple", v1)
    cache.store(scope, answer_text=ANSWER, model="m")
    assert cache.count(acme) == 0

    # delete: the entry goes (explicitly by document, or as stale)
    put(cache, acme, versions=v2)
    put(cache, acme, "How much is the Team plan?", "$10.", versions={prices.id: prices.version})
    assert get(cache, acme, Q, versions=v2) is not None
    assert KnowledgeStore(db).delete_document(acme, refunds.id)
    assert get(cache, acme, Q, versions=v2) is None
    assert cache.invalidate_documents(globex, [refunds.id]) == 0
    assert cache.invalidate_documents(acme, [refunds.id, "not-a-uuid"]) == 1
    assert get(cache, acme, "How much is the Team plan?", versions={prices.id: prices.version}) is not None


def test_grounded_without_sources_is_not_cached(cache, tenants):
    acme, _ = tenants
    scope = cache.key_for(acme, "helpdesk", conv(Q), "simple", {})
    assert not scope.cacheable and scope.reason == "grounded answer without sources"
    assert not cache.store(scope, answer_text=ANSWER, model="m")
    assert cache.lookup_sync(scope) is None


# -- time to live, degraded, never stored ---------------------------------------------------


def test_ttl_and_purge(cache, tenants):
    acme, globex = tenants
    now = utcnow()
    put(cache, acme, ttl_s=60, now=now)
    put(cache, globex, ttl_s=3600, now=now)
    assert get(cache, acme, Q, now=now + timedelta(seconds=59)) is not None
    assert get(cache, acme, Q, now=now + timedelta(seconds=61)) is None
    assert get(cache, acme, "How can I get a refund for the Team plan?", now=now + timedelta(seconds=61)) is None
    assert cache.purge_expired(now + timedelta(seconds=61)) == 1
    assert cache.count(acme) == 0 and cache.count(globex) == 1
    with cache.db.tenant_tx(acme, write=False) as c:
        assert c.scalar("SELECT COUNT(*) FROM cache_keys WHERE tenant_id = ?", (acme,)) == 0
    scope = cache.key_for(acme, "helpdesk", conv(Q), "simple")
    assert not cache.store(scope, answer_text=ANSWER, model="m", ttl_s=0)


def test_degraded_lookup_uses_the_looser_threshold(cache, tenants):
    acme, globex = tenants
    put(cache, acme, "How do I export my data as CSV?", "Settings > Data > Export > CSV.")
    asked = "Can I export my data to CSV?"  # MiniLM 0.92 to the stored question
    assert get(cache, acme, asked) is None
    scope = cache.key_for(acme, "helpdesk", conv(asked), "simple")
    hit = cache.lookup_degraded_sync(scope)
    assert hit is not None and hit.degraded and hit.kind == "semantic" and 0.85 <= hit.similarity < 0.95
    assert cache.lookup_degraded_sync(scope, threshold=0.97) is None
    assert cache.lookup_degraded_sync(cache.key_for(globex, "helpdesk", conv(asked), "simple")) is None
    exact = cache.lookup_degraded_sync(cache.key_for(acme, "helpdesk", conv("How do I export my data as CSV?"), "simple"))
    assert exact is not None and exact.degraded and exact.kind == "exact"


def test_never_store_errors_degraded_or_cancelled():
    assert should_store("ok", finish_reason="stop", text=ANSWER)
    assert should_store("ok", finish_reason=None, text=ANSWER)
    assert not should_store("error", text=ANSWER)
    assert not should_store("degraded", text=ANSWER)
    assert not should_store("cancelled", text=ANSWER)
    assert not should_store("ok", text=ANSWER, degraded=True)
    assert not should_store("ok", text=ANSWER, cached=True), "a hit is not stored again"
    assert not should_store("ok", text=ANSWER, continued=True), "a spliced stream"
    assert not should_store("ok", text=ANSWER, bypass=True), '"cache": false'
    assert not should_store("ok", finish_reason="length", text=ANSWER), "a truncated answer"
    assert not should_store("ok", text="  ")
    assert not should_store("ok", text=ANSWER, error=RuntimeError("x"))


def test_only_user_questions_are_cacheable(cache, tenants):
    acme, _ = tenants
    msgs = conv(Q) + [{"role": "assistant", "content": "Sure, "}]
    assert not cache.key_for(acme, "helpdesk", msgs, "simple").cacheable
    assert not cache.key_for(acme, "helpdesk", conv("  ?  "), "simple").cacheable
    assert not cache.key_for(acme, "helpdesk", [], "simple").cacheable


def test_policy_defaults_and_tenant_overrides():
    p = CachePolicy.for_tenant(object())
    assert (p.enabled, p.threshold, p.degraded_threshold, p.ttl_s) == (True, 0.95, 0.85, 86_400)

    class TS:
        cache_threshold = 0.9
        cache_ttl_s = 600
        cache_enabled = False

    p = CachePolicy.for_tenant(TS())
    assert (p.enabled, p.threshold, p.ttl_s) == (False, 0.9, 600)


# -- row-level security ---------------------------------------------------------------------


@pytest.fixture
def pg_db(pg_server):
    from loadbear.storage.db import open_database

    database = open_database(pg_server.fresh_url())
    yield database
    database.close()


@pytest.mark.postgres
def test_rls_keeps_cache_rows_apart(pg_db):
    db = pg_db
    svc = TenantService(db)
    acme, globex = svc.create_tenant("acme", "Acme", {}).id, svc.create_tenant("globex", "Globex", {}).id
    cache = ResponseCache(db, background=False)
    doc = _doc(db, acme, "refunds.md", "Refunds within 30 days.")
    put(cache, acme, versions={doc.id: doc.version})
    for table in ("cache_entries", "cache_keys", "cache_entry_documents"):
        with db.tenant_tx(globex, write=False) as c:
            assert c.fetchall(f"SELECT * FROM {table}") == [], table  # no tenant filter, on purpose
        with db.tenant_tx(acme, write=False) as c:
            assert c.fetchall(f"SELECT * FROM {table}"), table
        with db.app_tx(write=False) as c:
            assert c.fetchall(f"SELECT * FROM {table}") == [], table
    with db.tenant_tx(acme, write=False) as c:
        entry = str(c.scalar("SELECT id FROM cache_entries"))
    with pytest.raises(Exception, match="row-level security"):
        with db.tenant_tx(globex) as c:
            c.execute("INSERT INTO cache_keys (tenant_id, key, entry_id) VALUES (?, 1, ?)", (acme, entry))
    with db.tenant_tx(globex) as c:
        assert c.execute("DELETE FROM cache_entries").rowcount == 0
    assert cache.count(acme) == 1


async def test_a_broken_embedder_is_a_miss_not_a_failed_request(db, cache, tenants):
    acme, _ = tenants
    put(cache, acme)  # stored with its MiniLM vector

    class Broken:
        name = cache.embedder.name

        def embed(self, texts):
            raise RuntimeError("embedding service down")

    broken = ResponseCache(db, lambda: Broken(), background=False)
    para = broken.key_for(acme, "helpdesk", conv("How can I get a refund for the Team plan?"), "simple")
    assert await broken.lookup(para) is None and broken.counters["errors"] == 1
    assert (await broken.lookup(broken.key_for(acme, "helpdesk", conv(Q), "simple"))).kind == "exact"
    assert cache.lookup_sync(para, semantic=False) is None, "exact only"
    # storing without an embedding keeps the exact path working
    other = broken.key_for(acme, "helpdesk", conv("How do I pause my subscription?"), "simple")
    assert broken.store(other, answer_text="Settings > Billing > Pause.", model="m")
    assert get(cache, acme, "how do i pause my subscription") is not None
    assert get(cache, acme, "How can I pause my subscription?") is None
