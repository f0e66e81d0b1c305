"""Tenant isolation of the knowledge base, attacked from every side through the HTTP API.

Each tenant's documents carry secret canary strings; tenant A tries to reach tenant B's through
search, chat, ids, filters, pagination, deletes and re-ingest. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import httpx
import pytest

from conftest import sim_models

CANARY = {"acme": "CANARY-ACME-7f3a", "globex": "CANARY-GLOBEX-91bd", "initech": "CANARY-INITECH-2c44"}


def doc_text(slug: str) -> str:
    return (
        f"# {slug.title()} refund policy\n\n"
        f"Refunds are available within 14 days. The secret escalation code is {CANARY[slug]}.\n\n"
        f"## Contact\n\nWrite to billing@{slug}.test and quote {CANARY[slug]} for priority handling.\n"
    )


@pytest.fixture
def seeded(stack_factory, simulator, db_url):
    s = stack_factory(sim_models(simulator.url), db_url=db_url)
    keys = {"acme": s.key, "globex": s.add_tenant("globex"), "initech": s.add_tenant("initech")}
    docs = {}
    for slug, key in keys.items():
        r = httpx.post(s.url + "/v1/documents", headers=_h(key), timeout=60, json={
            "title": f"{slug} refunds", "text": doc_text(slug), "external_id": "policies/refunds.md",
            "metadata": {"owner": slug, "kind": "policy"}, "content_type": "text/markdown"})
        assert r.status_code == 201, r.text
        docs[slug] = r.json()
    return s, keys, docs


def _h(key):
    return {"Authorization": f"Bearer {key}"}


def _others(slug):
    return [v for k, v in CANARY.items() if k != slug]


def test_search_never_crosses_tenants(seeded):
    s, keys, docs = seeded
    for slug, key in keys.items():
        for query in [*CANARY.values(), "secret escalation code", "refund policy", "billing contact"]:
            r = httpx.post(s.url + "/v1/knowledge/query", headers=_h(key), json={"query": query, "top_k": 10}, timeout=60)
            assert r.status_code == 200, r.text
            body = r.text
            for canary in _others(slug):
                assert canary not in body, f"{slug} saw {canary} searching {query!r}"
            assert all(c["document"]["id"] == docs[slug]["id"] for c in r.json()["data"])
        # its own canary is findable
        r = httpx.post(s.url + "/v1/knowledge/query", headers=_h(key), json={"query": CANARY[slug]}, timeout=60)
        assert CANARY[slug] in r.text


def test_filters_cannot_reach_other_tenants(seeded):
    s, keys, _ = seeded
    r = httpx.post(s.url + "/v1/knowledge/query", headers=_h(keys["acme"]),
                   json={"query": "refund", "filters": {"owner": "globex"}}, timeout=60)
    assert r.status_code == 200 and r.json()["data"] == []
    r = httpx.post(s.url + "/v1/knowledge/query", headers=_h(keys["acme"]),
                   json={"query": "refund", "filters": {"owner": "acme"}}, timeout=60)
    assert r.json()["data"] and CANARY["acme"] in r.text


def test_ids_on_every_route(seeded):
    s, keys, docs = seeded
    theirs = docs["globex"]["id"]
    a = _h(keys["acme"])
    r = httpx.get(f"{s.url}/v1/documents/{theirs}", headers=a)
    assert r.status_code == 404 and r.json()["error"]["code"] == "document_not_found"
    r = httpx.delete(f"{s.url}/v1/documents/{theirs}", headers=a)
    assert r.status_code == 404
    # enumerated and malformed ids
    for guess in ["00000000-0000-0000-0000-000000000000", "1", "' OR 1=1 --", theirs.upper()]:
        r = httpx.get(f"{s.url}/v1/documents/{guess}", headers=a)
        assert r.status_code == 404, guess
        assert CANARY["globex"] not in r.text
    # globex's document is untouched
    r = httpx.get(f"{s.url}/v1/documents/{theirs}", headers=_h(keys["globex"]))
    assert r.status_code == 200 and r.json()["version"] == 1


def test_listing_and_pagination_stay_in_tenant(seeded):
    s, keys, docs = seeded
    a = _h(keys["acme"])
    listed = httpx.get(s.url + "/v1/documents", headers=a).json()
    assert [d["id"] for d in listed["data"]] == [docs["acme"]["id"]]
    # a cursor made from another tenant's id pages through nothing of theirs
    r = httpx.get(s.url + "/v1/documents", headers=a, params={"after": docs["globex"]["id"], "limit": 5})
    assert r.status_code in (200, 400)
    if r.status_code == 200:
        assert all(d["id"] == docs["acme"]["id"] for d in r.json()["data"])
    assert CANARY["globex"] not in r.text


def test_reingest_with_another_tenants_external_id(seeded):
    s, keys, docs = seeded
    r = httpx.post(s.url + "/v1/documents", headers=_h(keys["acme"]), timeout=60, json={
        "title": "hijack", "text": "Acme's replacement text, version two.", "external_id": "policies/refunds.md"})
    assert r.status_code == 201
    mine = r.json()
    assert mine["id"] == docs["acme"]["id"] and mine["version"] == 2, "replaces acme's own document"
    theirs = httpx.get(f"{s.url}/v1/documents/{docs['globex']['id']}", headers=_h(keys["globex"])).json()
    assert theirs["version"] == 1 and theirs["title"] == "globex refunds"
    r = httpx.post(s.url + "/v1/knowledge/query", headers=_h(keys["globex"]), json={"query": CANARY["globex"]}, timeout=60)
    assert CANARY["globex"] in r.text
    # acme's old chunks are gone with its old version
    r = httpx.post(s.url + "/v1/knowledge/query", headers=_h(keys["acme"]), json={"query": CANARY["acme"]}, timeout=60)
    assert CANARY["acme"] not in r.text


def test_grounded_chat_never_cites_other_tenants(seeded):
    s, keys, docs = seeded
    client = s.openai(keys["acme"])
    for canary in CANARY.values():
        out = client.chat.completions.create(
            model="local", messages=[{"role": "user", "content": f"What is the escalation code {canary}?"}],
            extra_body={"knowledge": {"top_k": 5}})
        text = out.choices[0].message.content
        for other in _others("acme"):
            assert other not in text
        cites = out.model_extra["loadbear"]["citations"]
        assert all(c["document_id"] == docs["acme"]["id"] for c in cites)
    # the local model answers from acme's own document
    out = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "What is the secret escalation code?"}],
                                         extra_body={"knowledge": {"top_k": 3}})
    assert CANARY["acme"] in out.choices[0].message.content


def test_delete_removes_from_search(seeded):
    s, keys, docs = seeded
    a = _h(keys["acme"])
    r = httpx.delete(f"{s.url}/v1/documents/{docs['acme']['id']}", headers=a)
    assert r.status_code == 200 and r.json()["deleted"] is True
    r = httpx.post(s.url + "/v1/knowledge/query", headers=a, json={"query": CANARY["acme"]}, timeout=60)
    assert r.json()["data"] == []
    assert httpx.get(f"{s.url}/v1/documents/{docs['acme']['id']}", headers=a).status_code == 404
    # the others still have theirs
    r = httpx.post(s.url + "/v1/knowledge/query", headers=_h(keys["globex"]), json={"query": CANARY["globex"]}, timeout=60)
    assert CANARY["globex"] in r.text


def test_enumerated_ids_on_delete_and_jobs_routes(seeded):
    s, keys, docs = seeded
    a = _h(keys["acme"])
    for guess in ["00000000-0000-0000-0000-000000000000", "1", "' OR 1=1 --", docs["globex"]["id"].upper(),
                  docs["initech"]["id"]]:
        r = httpx.delete(f"{s.url}/v1/documents/{guess}", headers=a)
        assert r.status_code == 404 and r.json()["error"]["code"] == "document_not_found", guess
        r = httpx.get(f"{s.url}/v1/jobs/{guess}", headers=a)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", guess
    for slug in ("globex", "initech"):
        r = httpx.get(f"{s.url}/v1/documents/{docs[slug]['id']}", headers=_h(keys[slug]))
        assert r.status_code == 200 and r.json()["version"] == 1


def test_the_response_cache_never_serves_another_tenants_grounded_answer(stack_factory, simulator, db_url):
    on = {"cache_enabled": True}
    s = stack_factory(sim_models(simulator.url), db_url=db_url, tenant_settings=on)
    keys = {"acme": s.key, "globex": s.add_tenant("globex", on)}
    for slug, key in keys.items():
        r = httpx.post(s.url + "/v1/documents", headers=_h(key), timeout=60, json={
            "title": "Refunds", "text": doc_text(slug), "external_id": "policies/refunds.md", "content_type": "text/markdown"})
        assert r.status_code == 201

    def ask(slug):
        raw = s.openai(keys[slug]).chat.completions.with_raw_response.create(
            model="local", messages=[{"role": "user", "content": "What is the secret escalation code?"}],
            extra_body={"knowledge": {"top_k": 3}})
        return raw.parse().choices[0].message.content, raw.headers["x-loadbear-cache"]

    text, state = ask("acme")
    assert CANARY["acme"] in text and state == "miss"
    assert s.gateway.cache.flush(30)
    text, state = ask("globex")
    assert state == "miss" and CANARY["globex"] in text and CANARY["acme"] not in text
    assert s.gateway.cache.flush(30)
    text, state = ask("acme")  # the cache is really on: acme's own repeat is a hit
    assert state.startswith("hit") and CANARY["acme"] in text and CANARY["globex"] not in text


def test_grounded_chat_filters_stay_in_tenant(seeded):
    s, keys, docs = seeded
    client = s.openai(keys["acme"])
    ask = lambda flt: client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "What is the secret escalation code?"}],
        extra_body={"knowledge": {"top_k": 3, "filters": flt}})
    out = ask({"owner": "globex"})  # another tenant's metadata value: nothing of theirs, nothing at all
    assert out.model_extra["loadbear"]["citations"] == []
    assert not any(c in out.choices[0].message.content for c in CANARY.values())
    out = ask({"owner": "acme"})
    cites = out.model_extra["loadbear"]["citations"]
    assert cites and {c["document_id"] for c in cites} == {docs["acme"]["id"]}
    assert CANARY["acme"] in out.choices[0].message.content
    r = httpx.post(s.url + "/v1/chat/completions", headers=_h(keys["acme"]), json={
        "model": "local", "messages": [{"role": "user", "content": "x"}], "knowledge": {"filters": ["owner"]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "knowledge.filters"
