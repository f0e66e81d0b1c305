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
