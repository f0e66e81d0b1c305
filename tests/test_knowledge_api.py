"""Knowledge-base API: ingestion of every file type and bad input, jobs, queries, grounded chat."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import sim_models

DOCS = Path(__file__).parent / "data" / "docs"


@pytest.fixture
def kb(stack_factory, simulator):
    return stack_factory(sim_models(simulator.url))


def _h(s, key=None):
    return {"Authorization": f"Bearer {key or s.key}"}


def upload(s, name, data=None, **fields):
    data = (DOCS / name).read_bytes() if data is None else data
    return httpx.post(s.url + "/v1/documents", headers=_h(s), files={"file": (name, data)}, data=fields, timeout=120)


@pytest.mark.parametrize("name", ["guide.md", "handbook.html", "notes.txt", "report.pdf", "policy.docx"])
def test_upload_each_file_type(kb, name):
    r = upload(kb, name, external_id=f"fixtures/{name}", metadata=json.dumps({"kind": "fixture"}))
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["external_id"] == f"fixtures/{name}" and doc["version"] == 1
    assert doc["chunk_count"] >= 1 and doc["char_count"] > 0 and doc["metadata"] == {"kind": "fixture"}
    got = httpx.get(f"{kb.url}/v1/documents/{doc['id']}", headers=_h(kb)).json()
    assert got == doc


@pytest.mark.parametrize(
    "name,status,code",
    [
        ("empty.txt", 422, "empty_file"),
        ("program.exe", 415, "unsupported_type"),
        ("corrupt.pdf", 422, "corrupt_file"),
        ("corrupt.docx", 422, "corrupt_file"),
        ("latin1.txt", 422, "bad_encoding"),
        ("encrypted.pdf", 422, "encrypted_file"),
        ("image_only.pdf", 422, "no_extractable_text"),
    ],
)
def test_upload_bad_files(kb, name, status, code):
    r = upload(kb, name)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    assert httpx.get(kb.url + "/v1/documents", headers=_h(kb)).json()["data"] == []


def test_oversized_upload_is_413(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url))
    s.gateway.settings.max_upload_bytes = 2000
    s.gateway.knowledge.settings.max_upload_bytes = 2000
    r = upload(s, "big.txt", b"word " * 1000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"


def test_json_ingest_validation(kb):
    post = lambda body: httpx.post(kb.url + "/v1/documents", headers=_h(kb), json=body, timeout=60)
    cases = [
        ({"title": "x"}, 400, "invalid_type", "text"),
        ({"text": "   "}, 422, "empty_document", None),
        ({"text": "hello", "metadata": "nope"}, 400, "invalid_type", "metadata"),
        ({"text": "hello", "metadata": {"a": {"nested": 1}}}, 400, "invalid_type", "metadata"),
        ({"text": "hello", "external_id": ""}, 400, "invalid_type", "external_id"),
        ({"text": "hello", "content_type": "application/pdf"}, 415, "unsupported_type", "content_type"),
        ({"text": "hello", "colour": "red"}, 400, "unknown_parameter", "colour"),
    ]
    for body, status, code, param in cases:
        r = post(body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["code"] == code, body
        if param:
            assert err["param"] == param
    r = httpx.post(kb.url + "/v1/documents", headers=_h(kb), content=b"{bad", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.get(kb.url + "/v1/documents", headers=_h(kb)).json()["data"] == []


def test_replace_by_external_id_and_pagination(kb):
    ids = []
    for i in range(5):
        r = httpx.post(kb.url + "/v1/documents", headers=_h(kb), timeout=60,
                       json={"title": f"Doc {i}", "text": f"Document number {i} about topic {i}.", "external_id": f"d{i}"})
        ids.append(r.json()["id"])
    r = httpx.post(kb.url + "/v1/documents", headers=_h(kb), timeout=60,
                   json={"title": "Doc 2 v2", "text": "Replaced text about zebras.", "external_id": "d2"})
    assert r.json()["id"] == ids[2] and r.json()["version"] == 2 and r.json()["title"] == "Doc 2 v2"
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = httpx.get(kb.url + "/v1/documents", headers=_h(kb), params=params).json()
        seen.extend(d["id"] for d in page["data"])
        if not page["has_more"]:
            break
        after = page["next_cursor"]
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    bad = httpx.get(kb.url + "/v1/documents", headers=_h(kb), params={"limit": 500})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    bad = httpx.get(kb.url + "/v1/documents", headers=_h(kb), params={"after": "page-2"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
    assert bad.json()["error"]["code"] == "invalid_value"
    hits = httpx.post(kb.url + "/v1/knowledge/query", headers=_h(kb), json={"query": "zebras", "top_k": 3}, timeout=60).json()
    assert hits["data"][0]["document"]["id"] == ids[2] and hits["data"][0]["document"]["version"] == 2
    assert "topic 2" not in json.dumps(hits), "the old version's chunks are gone"


def test_query_validation_and_shape(kb):
    httpx.post(kb.url + "/v1/documents", headers=_h(kb), timeout=60, json={
        "title": "Refunds", "text": "# Refunds\n\nRefunds are possible within 14 days of purchase.\n",
        "content_type": "text/markdown", "source_url": "https://help.example/refunds"})
    q = lambda body: httpx.post(kb.url + "/v1/knowledge/query", headers=_h(kb), json=body, timeout=60)
    r = q({"query": "How long do I have to get a refund?", "top_k": 2})
    assert r.status_code == 200
    hit = r.json()["data"][0]
    assert set(hit) >= {"id", "score", "text", "document", "span", "heading_path"}
    assert hit["document"]["title"] == "Refunds" and hit["document"]["source_url"] == "https://help.example/refunds"
    assert hit["span"]["end"] > hit["span"]["start"] and "14 days" in hit["text"]
    for body, param in [({"query": ""}, "query"), ({"query": "x", "top_k": 0}, "top_k"),
                        ({"query": "x", "top_k": "5"}, "top_k"), ({"query": "x", "filters": [1]}, "filters"),
                        ({"query": "x", "mode": "psychic"}, "mode")]:
        r = q(body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, body
    for nasty in ['"unbalanced', "refund* OR (", "NEAR(a b)", "a AND NOT", "'; DROP TABLE chunks; --", "ÿ✓ 🙂"]:
        assert q({"query": nasty}).status_code == 200, nasty


def test_scopes(kb):
    _, reader = kb.gateway.tenants.create_key("acme", "reader", ["knowledge:read"])
    r = httpx.post(kb.url + "/v1/documents", headers=_h(kb, reader), json={"text": "x"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert httpx.get(kb.url + "/v1/documents", headers=_h(kb, reader)).status_code == 200


def test_large_upload_runs_as_a_background_job(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url))
    s.gateway.knowledge.settings.inline_max_bytes = 1000
    text = "\n\n".join(f"## Section {i}\n\nParagraph {i} explains how feature {i} works in detail." for i in range(60))
    r = upload(s, "manual.md", text.encode(), external_id="manual")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running", "succeeded") and r.headers["location"] == f"/v1/jobs/{job['id']}"
    deadline = time.monotonic() + 60
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        job = httpx.get(f"{s.url}/v1/jobs/{job['id']}", headers=_h(s)).json()
    assert job["status"] == "succeeded" and job["document_id"]
    doc = httpx.get(f"{s.url}/v1/documents/{job['document_id']}", headers=_h(s)).json()
    assert doc["external_id"] == "manual" and doc["chunk_count"] > 1
    # a job that fails says why
    r = upload(s, "broken.pdf", b"%PDF-1.4 garbage " * 200)
    job = r.json()
    while job["status"] in ("queued", "running"):
        time.sleep(0.1)
        job = httpx.get(f"{s.url}/v1/jobs/{job['id']}", headers=_h(s)).json()
    assert job["status"] == "failed" and job["error"]["code"] == "corrupt_file"
    # another tenant cannot see the job
    other = s.add_tenant("globex")
    assert httpx.get(f"{s.url}/v1/jobs/{job['id']}", headers=_h(s, other)).status_code == 404


def test_grounded_chat_non_stream_stream_and_ledger(kb, simulator):
    r = httpx.post(kb.url + "/v1/documents", headers=_h(kb), timeout=60, json={
        "title": "Refund policy", "external_id": "refunds",
        "text": "# Refund policy\n\nRefunds are available within 14 days of purchase. After 14 days, refunds are prorated.\n",
        "content_type": "text/markdown"})
    doc = r.json()
    client = kb.openai()
    out = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "Within how many days are refunds available?"}],
                                         extra_body={"knowledge": {"top_k": 3}})
    assert "14 days" in out.choices[0].message.content and "[1]" in out.choices[0].message.content
    cites = out.model_extra["loadbear"]["citations"]
    assert cites[0]["document_id"] == doc["id"] and cites[0]["title"] == "Refund policy"
    assert cites[0]["span"]["end"] > cites[0]["span"]["start"]
    row = kb.rows()[0]
    stored = row["retrieved_chunk_ids"]
    stored = json.loads(stored) if isinstance(stored, str) else stored
    assert stored == [c["chunk_id"] for c in cites]

    # streamed: citations arrive as the last event before [DONE]
    with httpx.stream("POST", kb.url + "/v1/chat/completions", headers=_h(kb), timeout=60, json={
            "model": "gpt-4o-mini", "stream": True, "knowledge": {"top_k": 2},
            "messages": [{"role": "user", "content": "What is the refund window?"}]}) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["loadbear"]["citations"][0]["document_id"] == doc["id"]
    # the upstream model received the numbered sources in a system message
    sent = simulator.requests[-1].body["messages"]
    assert sent[0]["role"] == "system" and "[1] Refund policy" in sent[0]["content"] and "14 days" in sent[0]["content"]


def test_grounding_by_feature_default_and_bad_knowledge_param(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), tenant_settings={"knowledge_features": {"helpdesk": {"top_k": 2}}})
    httpx.post(s.url + "/v1/documents", headers=_h(s), timeout=60, json={"title": "Hours", "text": "Support is open 9 to 5 on weekdays."})
    client = s.openai()
    out = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "When is support open?"}],
                                         metadata={"feature": "helpdesk"})
    assert out.model_extra["loadbear"]["citations"]
    plain = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "When is support open?"}])
    assert "citations" not in plain.model_extra["loadbear"]
    r = httpx.post(s.url + "/v1/chat/completions", headers=_h(s), json={
        "model": "local", "messages": [{"role": "user", "content": "x"}], "knowledge": {"top_k": 99}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "knowledge.top_k"


def test_reranking_hook_orders_api_queries_and_grounded_chat(kb):
    ids = {}
    for key, text in [("a", "Refunds are issued within 14 days."), ("b", "Refund requests need an order number."),
                      ("c", "Refunds for annual plans are prorated.")]:
        r = httpx.post(kb.url + "/v1/documents", headers=_h(kb), timeout=60,
                       json={"title": f"Refunds {key}", "text": text, "external_id": key})
        ids[r.json()["id"]] = key
    seen = []

    def rerank(query, chunks):
        seen.append((query, len(chunks)))
        # a deliberately unnatural order (by external id, descending) that fusion would never give
        out = sorted(chunks, key=lambda c: c.external_id, reverse=True)[:2]
        for i, c in enumerate(out):
            c.score = 1.0 - i / 10
        return out

    kb.gateway.knowledge.reranker = rerank
    hits = httpx.post(kb.url + "/v1/knowledge/query", headers=_h(kb), json={"query": "refund", "top_k": 3},
                      timeout=60).json()["data"]
    assert [ids[h["document"]["id"]] for h in hits] == ["c", "b"] and [h["score"] for h in hits] == [1.0, 0.9]
    assert seen == [("refund", 3)], "the hook sees every fused candidate"
    out = kb.openai().chat.completions.create(model="local", messages=[{"role": "user", "content": "How do refunds work?"}],
                                              extra_body={"knowledge": {"top_k": 3}})
    cites = out.model_extra["loadbear"]["citations"]
    assert [ids[c["document_id"]] for c in cites] == ["c", "b"] and seen[-1][0] == "How do refunds work?"


def test_file_types_bad_inputs_and_ledger_chunk_ids_on_both_backends(stack_factory, simulator, db_url):
    s = stack_factory(sim_models(simulator.url), db_url=db_url)
    for name in ["guide.md", "handbook.html", "notes.txt", "report.pdf", "policy.docx"]:
        r = upload(s, name, external_id=name)
        assert r.status_code == 201 and r.json()["chunk_count"] >= 1, (name, r.text)
    for name, status, code in [("empty.txt", 422, "empty_file"), ("program.exe", 415, "unsupported_type"),
                               ("corrupt.pdf", 422, "corrupt_file"), ("latin1.txt", 422, "bad_encoding")]:
        r = upload(s, name)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), name
    s.gateway.knowledge.settings.max_upload_bytes = 100
    r = upload(s, "guide.md")
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    listed = httpx.get(s.url + "/v1/documents", headers=_h(s), params={"limit": 100}).json()["data"]
    assert sorted(d["external_id"] for d in listed) == sorted(
        ["guide.md", "handbook.html", "notes.txt", "report.pdf", "policy.docx"])
    out = s.openai().chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "How do I install it?"}],
                                             extra_body={"knowledge": {"top_k": 4}})
    cites = out.model_extra["loadbear"]["citations"]
    assert len(cites) == 4
    stored = s.rows()[-1]["retrieved_chunk_ids"]
    stored = json.loads(stored) if isinstance(stored, str) else stored
    assert [str(c) for c in stored] == [c["chunk_id"] for c in cites]


def test_uploads_get_their_own_body_limit(tmp_path):
    """Chat bodies stop at max_body_bytes; /v1/documents accepts up to max_upload_bytes (plus the
    multipart envelope), then the parser's own 413, then the middleware's before reading."""
    from loadbear import Gateway, Settings
    from loadbear.api.app import create_app
    from loadbear.testing.server import ServerThread

    gw = Gateway.from_settings(Settings.load(env={}, config_path=None, database_url=f"sqlite:///{tmp_path / 'u.db'}",
                                             max_body_bytes=50_000, max_upload_bytes=200_000))
    gw.migrate()
    gw.tenants.create_tenant("acme", "Acme", {})
    _, key = gw.tenants.create_key("acme", "k")
    try:
        with ServerThread(create_app(gw)) as srv:
            def post(size):
                body = b"%PDF-1.4 " + b"x" * (size - 9)  # corrupt: fails fast, no embedding
                return httpx.post(srv.url + "/v1/documents", headers={"Authorization": f"Bearer {key}"},
                                  files={"file": ("big.pdf", body)}, timeout=60)

            r = post(100_000)  # twice the chat limit: still parsed
            assert r.status_code == 422 and r.json()["error"]["code"] == "corrupt_file"
            r = post(230_000)  # over max_upload_bytes, inside the envelope allowance
            assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
            r = post(300_000)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            r = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "local", "messages": [{"role": "user", "content": "x" * 60_000}]})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    finally:
        gw.close()


def test_chunk_size_and_overlap_come_from_the_settings(tmp_path):
    from loadbear import Gateway, Settings

    text = (DOCS / "guide.md").read_text()
    sizes = {}
    for tokens, overlap in [(350, 0.15), (40, 0.0), (40, 0.3)]:
        env = {"LOADBEAR_CHUNK_TOKENS": str(tokens), "LOADBEAR_CHUNK_OVERLAP": str(overlap)}
        gw = Gateway.from_settings(Settings.load(env=env, config_path=None,
                                                 database_url=f"sqlite:///{tmp_path / f'c{tokens}-{overlap}.db'}"))
        try:
            gw.migrate()
            t = gw.tenants.create_tenant("acme", "Acme", {})
            doc = gw.knowledge.ingest_text(t.id, text=text, content_type="text/markdown")
            chunks = gw.knowledge.store.document_chunks(t.id, doc.id)
        finally:
            gw.close()
        assert max(c.token_count for c in chunks) <= tokens
        sizes[(tokens, overlap)] = chunks
    assert len(sizes[(40, 0.0)]) > len(sizes[(350, 0.15)])
    no_overlap = sizes[(40, 0.0)]
    assert all(a.end <= b.start for a, b in zip(no_overlap, no_overlap[1:]))
    overlapped = sizes[(40, 0.3)]
    assert any(b.start < a.end for a, b in zip(overlapped, overlapped[1:]))


def test_jobs_left_by_a_dead_process_resume_when_the_app_starts(db_url):
    """Queued jobs and running jobs whose heartbeat stopped are run by the next process; a job
    another live process is running (fresh heartbeat) is left alone; a job is claimed once."""
    from datetime import timedelta

    from loadbear import Gateway, Settings
    from loadbear.api.app import create_app
    from loadbear.storage.values import db_time, dumps, utcnow, uuid7
    from loadbear.testing.server import ServerThread

    gw = Gateway.from_settings(Settings.load(env={}, config_path=None, database_url=db_url))
    try:
        gw.migrate()
        t = gw.tenants.create_tenant("acme", "Acme", {})
        _, key = gw.tenants.create_key("acme", "k")
        d = gw.db.dialect
        jobs = {}
        for name, status, age in [("queued", "queued", 0), ("orphan", "running", 600), ("alive", "running", 5)]:
            jobs[name] = uuid7()
            params = {"filename": f"{name}.md", "external_id": name, "content_type": None}
            with gw.db.tenant_tx(t.id) as c:
                c.execute("INSERT INTO ingest_jobs (id, tenant_id, status, params, payload, created_at, updated_at)"
                          " VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (jobs[name], t.id, status, dumps(params), f"# {name}\n\nThe {name} job's text.".encode(),
                           db_time(d, utcnow()), db_time(d, utcnow() - timedelta(seconds=age))))
        with ServerThread(create_app(gw)) as srv:  # startup resumes
            gw.knowledge.wait_idle(60)
            got = {n: httpx.get(f"{srv.url}/v1/jobs/{j}", headers={"Authorization": f"Bearer {key}"}).json()
                   for n, j in jobs.items()}
        assert got["queued"]["status"] == "succeeded" and got["orphan"]["status"] == "succeeded"
        assert got["alive"]["status"] == "running" and got["alive"]["document_id"] is None
        docs, _ = gw.knowledge.list(t.id, limit=10)
        assert sorted(x.external_id for x in docs) == ["orphan", "queued"]
        # a finished job is never run again, by a later resume or a second claim
        assert gw.knowledge.resume_jobs() == 0
        gw.knowledge._run_job(t.id, jobs["queued"])
        assert [x.version for x in gw.knowledge.list(t.id, limit=10)[0]] == [1, 1]
        with gw.db.system_tx(write=False) as c:
            assert c.scalar("SELECT COUNT(*) FROM ingest_jobs WHERE payload IS NOT NULL") == 1  # only "alive"'s
    finally:
        gw.close()


def test_a_running_job_keeps_its_heartbeat_fresh(db, monkeypatch):
    import threading

    import numpy as np

    from loadbear.knowledge import service as svc

    class SlowEmbedder:
        name, dim = "slow-8", 8

        def __init__(self):
            self.started, self.release = threading.Event(), threading.Event()

        def embed(self, texts):
            self.started.set()
            assert self.release.wait(30)
            v = np.ones((len(texts), self.dim), np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    monkeypatch.setattr(svc, "JOB_HEARTBEAT_S", 0.05)
    tenant = str(__import__("uuid").uuid4())
    with db.system_tx() as c:
        c.execute("INSERT INTO tenants (id, slug, name) VALUES (?, ?, 'Beat')", (tenant, f"beat-{tenant[:8]}"))
    emb = SlowEmbedder()
    ks = svc.KnowledgeService(db, lambda: emb)
    try:
        job = ks.submit_job(tenant, filename="a.md", data=b"# A\n\nSome text.", content_type=None)
        assert emb.started.wait(30)
        first = ks.get_job(tenant, job["id"])
        assert first["status"] == "running"
        deadline = time.monotonic() + 10
        while ks.get_job(tenant, job["id"])["updated_at"] == first["updated_at"]:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
        assert ks.resume_jobs(stale_after_s=60) == 0, "a live job is not resumed"
        emb.release.set()
        ks.wait_idle(30)
        assert ks.get_job(tenant, job["id"])["status"] == "succeeded"
    finally:
        emb.release.set()
        ks.close()
