"""Feedback (``POST/GET /v1/feedback``) and the harvest of draft eval cases from it.

Interactions are made through the real API (official openai SDK) against the upstream
simulator; the storage tests run on both backends.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import openai
import pytest
import yaml

from conftest import Stack, sim_models
from loadbear.evals.harvest import (
    NOT_STORED_NOTE,
    SinceError,
    harvest_cases,
    last_user_message,
    parse_since,
)
from loadbear.testing import Fault

REPLY = "Alpha answer one two three."
FALLBACK = "Our assistant is taking a break."
# One model, no retry, no fallback: a scripted server error is a degraded answer at once.
ONLY_MINI = {"allowed_models": ["gpt-4o-mini"], "fallback_message": FALLBACK}
ERROR_KEYS = {"message", "type", "param", "code"}


def make_stack(stack_factory, simulator, db_url: str, **tenant) -> Stack:
    simulator.set_reply(REPLY, model="gpt-4o-mini")
    models = sim_models(simulator.url, **{"gpt-4o-mini": {"max_retries": 0}})
    return stack_factory(models, db_url=db_url, tenant_settings={**ONLY_MINI, **tenant})


# Creating an HTTP client costs ~0.2 s here (its TLS context): one per test, reused.
_CLIENTS: dict = {}


@pytest.fixture(autouse=True)
def _shared_clients():
    yield
    for client in _CLIENTS.values():
        client.close()
    _CLIENTS.clear()


def _http() -> httpx.Client:
    if "http" not in _CLIENTS:
        _CLIENTS["http"] = httpx.Client(timeout=30)
    return _CLIENTS["http"]


def _openai(stack: Stack, key: str | None):
    key = key or stack.key
    if ("openai", key) not in _CLIENTS:
        if "sdk_http" not in _CLIENTS:
            _CLIENTS["sdk_http"] = openai.DefaultHttpxClient(timeout=30)
        _CLIENTS[("openai", key)] = stack.openai(key, http_client=_CLIENTS["sdk_http"])
    return _CLIENTS[("openai", key)]


def ask(stack: Stack, content: str = "What is a gateway?", key: str | None = None, **kw):
    messages = kw.pop("messages", None) or [{"role": "user", "content": content}]
    return _openai(stack, key).chat.completions.create(model="gpt-4o-mini", messages=messages, **kw)


def post(stack: Stack, body, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or stack.key}"}
    if isinstance(body, (bytes, str)):
        return _http().post(stack.url + "/v1/feedback", headers={**headers, "content-type": "application/json"},
                            content=body)
    return _http().post(stack.url + "/v1/feedback", headers=headers, json=body)


def get(stack: Stack, key: str | None = None, **params) -> httpx.Response:
    return _http().get(stack.url + "/v1/feedback", headers={"Authorization": f"Bearer {key or stack.key}"},
                       params=params)


def feedback_rows(stack: Stack) -> list[dict]:
    return stack.rows("SELECT * FROM feedback ORDER BY created_at")


# -- POST and GET ---------------------------------------------------------------------------


def test_thumbs_and_stars_are_stored_and_listed(stack_factory, simulator, db_url):
    stack = make_stack(stack_factory, simulator, db_url)
    answer = ask(stack)
    iid = answer.id
    assert answer.model_extra["loadbear"]["interaction_id"] == iid

    r = post(stack, {"interaction_id": iid, "rating": -1, "comment": "Too vague", "correction": "A proxy for LLMs.",
                     "user": "u-42"})
    assert r.status_code == 201, r.text
    down = r.json()
    assert {k: down[k] for k in ("object", "interaction_id", "rating", "scale", "negative", "comment", "correction",
                                 "user")} == {
        "object": "feedback", "interaction_id": iid, "rating": -1, "scale": "thumbs", "negative": True,
        "comment": "Too vague", "correction": "A proxy for LLMs.", "user": "u-42"}
    assert down["created_at"].endswith("Z") and uuid.UUID(down["id"])

    made = [down]
    for body, scale, negative in [
        ({"rating": 1, "scale": "thumbs"}, "thumbs", False),
        ({"rating": 4}, "stars", False),  # 2..5 can only be stars
        ({"rating": 2}, "stars", True),
        ({"rating": 1, "scale": "stars", "comment": "   "}, "stars", True),  # a blank comment is no comment
        ({"rating": 5.0, "scale": "stars"}, "stars", False),  # an integral float is an integer
    ]:
        r = post(stack, {"interaction_id": iid.upper(), **body})  # ids are case-insensitive
        assert r.status_code == 201, r.text
        out = r.json()
        assert (out["interaction_id"], out["rating"], out["scale"], out["negative"], out["comment"], out["user"]) == (
            iid, int(body["rating"]), scale, negative, None, None)
        made.append(out)

    rows = feedback_rows(stack)
    assert [(int(r["rating"]), r["scale"], bool(r["negative"])) for r in rows] == [
        (-1, "thumbs", True), (1, "thumbs", False), (4, "stars", False), (2, "stars", True), (1, "stars", True),
        (5, "stars", False)]
    assert {str(r["tenant_id"]) for r in rows} == {stack.tenant.id}
    assert {str(r["interaction_id"]) for r in rows} == {iid}
    # The end user row exists, with the same id the ledger would give them.
    users = stack.rows("SELECT * FROM users WHERE external_id = 'u-42'")
    assert [str(u["id"]) for u in users] == [str(rows[0]["user_id"])]

    listed = get(stack, interaction_id=iid)
    assert listed.status_code == 200
    data = listed.json()
    assert data["object"] == "list" and data["has_more"] is False
    assert data["data"] == list(reversed(made))  # newest first, the same objects POST returned

    page = get(stack, limit=2).json()
    assert [f["id"] for f in page["data"]] == [made[-1]["id"], made[-2]["id"]] and page["has_more"] is True
    assert get(stack, interaction_id=str(uuid.uuid4())).json() == {"object": "list", "data": [], "has_more": False}
    for params, code in [({"limit": "x"}, "invalid_type"), ({"limit": 0}, "invalid_value"),
                         ({"limit": 101}, "invalid_value"), ({"interaction_id": "nope"}, "invalid_value")]:
        r = get(stack, **params)
        assert (r.status_code, r.json()["error"]["code"]) == (400, code), params


def test_validation_errors_are_openai_shaped_and_write_nothing(stack_factory, simulator, tmp_path):
    stack = make_stack(stack_factory, simulator, f"sqlite:///{tmp_path / 'v.db'}")
    iid = ask(stack).id
    ok = {"interaction_id": iid, "rating": -1}
    cases = [
        (b"{not json", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        ([1, 2], 400, "invalid_type", None),
        ({"rating": -1}, 400, "missing_required_parameter", "interaction_id"),
        ({**ok, "interaction_id": 42}, 400, "invalid_type", "interaction_id"),
        ({**ok, "interaction_id": "chatcmpl-123"}, 400, "invalid_value", "interaction_id"),
        ({"interaction_id": iid}, 400, "missing_required_parameter", "rating"),
        ({**ok, "rating": "5"}, 400, "invalid_type", "rating"),
        ({**ok, "rating": True}, 400, "invalid_type", "rating"),
        ({**ok, "rating": 4.5}, 400, "invalid_type", "rating"),
        ({**ok, "rating": 0}, 400, "invalid_value", "rating"),
        ({**ok, "rating": 6}, 400, "invalid_value", "rating"),
        ({**ok, "rating": -2}, 400, "invalid_value", "rating"),
        # 1 is a thumbs-up or the worst star rating: the client must say which.
        ({**ok, "rating": 1}, 400, "missing_required_parameter", "scale"),
        ({**ok, "rating": 3, "scale": "thumbs"}, 400, "invalid_value", "rating"),
        ({**ok, "rating": -1, "scale": "stars"}, 400, "invalid_value", "rating"),
        ({**ok, "scale": "emoji"}, 400, "invalid_value", "scale"),
        ({**ok, "comment": 5}, 400, "invalid_type", "comment"),
        ({**ok, "comment": "x" * 2001}, 400, "string_above_max_length", "comment"),
        ({**ok, "correction": "x" * 8001}, 400, "string_above_max_length", "correction"),
        ({**ok, "user": "u" * 257}, 400, "invalid_type", "user"),
        ({**ok, "ratng": 1}, 400, "unknown_parameter", "ratng"),
        ({**ok, "interaction_id": str(uuid.uuid4())}, 404, "interaction_not_found", "interaction_id"),
    ]
    for body, status, code, param in cases:
        r = post(stack, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == ERROR_KEYS
        assert (err["code"], err["param"]) == (code, param), (body, err)
        assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    # At the limits is fine.
    r = post(stack, {**ok, "comment": "c" * 2000, "correction": "k" * 8000, "user": "u" * 256})
    assert r.status_code == 201, r.text

    # Authentication and scope.
    r = _http().post(stack.url + "/v1/feedback", json=ok)
    assert (r.status_code, r.json()["error"]["type"]) == (401, "authentication_error")
    _, chat_only = stack.gateway.tenants.create_key("acme", "chat only", ["chat"])
    r = post(stack, ok, key=chat_only)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "insufficient_scope")
    r = get(stack, key=chat_only)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "insufficient_scope")
    _, feedback_only = stack.gateway.tenants.create_key("acme", "widget", ["feedback:write"])
    assert post(stack, ok, key=feedback_only).status_code == 201
    assert get(stack, key=feedback_only).status_code == 403  # reading needs usage:read

    assert len(feedback_rows(stack)) == 2  # only the two accepted posts


def test_feedback_isolation_between_tenants(stack_factory, simulator, db_url, backend):
    stack = make_stack(stack_factory, simulator, db_url)
    other_key = stack.add_tenant("globex", ONLY_MINI)
    mine = ask(stack).id
    theirs = ask(stack, key=other_key).id

    # Feedback on another tenant's interaction is the same 404 as on an id that never existed.
    unknown = str(uuid.uuid4())
    foreign = post(stack, {"interaction_id": theirs, "rating": -1, "comment": "sneaky"})
    missing = post(stack, {"interaction_id": unknown, "rating": -1, "comment": "sneaky"})
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json() == {"error": {**missing.json()["error"],
                                        "message": missing.json()["error"]["message"].replace(unknown, theirs)}}
    assert foreign.headers.get("content-type") == missing.headers.get("content-type")
    assert feedback_rows(stack) == []  # nothing written

    assert post(stack, {"interaction_id": mine, "rating": 2, "comment": "acme's"}).status_code == 201
    assert post(stack, {"interaction_id": theirs, "rating": -1, "comment": "globex's"}, key=other_key).status_code == 201

    # Listing: each tenant sees only its own, filtered or not.
    assert [f["comment"] for f in get(stack).json()["data"]] == ["acme's"]
    assert [f["comment"] for f in get(stack, key=other_key).json()["data"]] == ["globex's"]
    assert get(stack, interaction_id=theirs).json()["data"] == []
    assert get(stack, key=other_key, interaction_id=mine).json()["data"] == []

    rows = feedback_rows(stack)
    tenant_of = {str(r["interaction_id"]): str(r["tenant_id"]) for r in rows}
    globex = stack.gateway.tenants.get_tenant("globex").id
    assert tenant_of == {mine: stack.tenant.id, theirs: globex}

    if backend == "postgres":
        # Row-level security: a query that forgets the tenant filter still sees one tenant.
        with stack.gateway.db.tenant_tx(stack.tenant.id, write=False) as c:
            assert [r["comment"] for r in c.fetchall("SELECT comment FROM feedback")] == ["acme's"]
        with stack.gateway.db.app_tx(write=False) as c:
            assert c.scalar("SELECT COUNT(*) FROM feedback") == 0
        # ... and cannot write a row for another tenant, even on its own interaction.
        import psycopg

        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            with stack.gateway.db.tenant_tx(stack.tenant.id) as c:
                c.execute("INSERT INTO feedback (id, tenant_id, interaction_id, rating, scale, negative, created_at)"
                          " VALUES (?, ?, ?, -1, 'thumbs', TRUE, now())", (str(uuid.uuid4()), globex, theirs))
        with stack.gateway.db.tenant_tx(stack.tenant.id) as c:
            c.execute("UPDATE feedback SET comment = 'overwritten'")
            c.execute("DELETE FROM feedback WHERE tenant_id <> ?", (stack.tenant.id,))
        assert sorted(r["comment"] for r in feedback_rows(stack)) == ["globex's", "overwritten"]


def test_feedback_right_after_the_answer_waits_for_the_ledger(stack_factory, simulator, tmp_path, monkeypatch):
    """The ledger writes rows off the request path; feedback that arrives first still finds its row."""
    stack = make_stack(stack_factory, simulator, f"sqlite:///{tmp_path / 'w.db'}")
    ledger = stack.gateway.ledger
    slow = ledger._write_batch

    def write_batch_slowly(*args, **kw):
        time.sleep(0.3)
        return slow(*args, **kw)

    monkeypatch.setattr(ledger, "_write_batch", write_batch_slowly)
    iid = ask(stack).id
    assert ledger.pending == 1  # not in the database yet
    r = post(stack, {"interaction_id": iid, "rating": -1})
    assert r.status_code == 201, r.text
    assert [str(f["interaction_id"]) for f in feedback_rows(stack)] == [iid]


# -- harvest --------------------------------------------------------------------------------


def _error_interaction(stack: Stack, simulator, key: str | None = None) -> str:
    """A request the upstream refuses (400): status ``error`` in the ledger."""
    before = {str(r["id"]) for r in stack.rows()}
    simulator.script([Fault("bad_request")], model="gpt-4o-mini")
    with pytest.raises(openai.BadRequestError):
        ask(stack, "Make it fail", key=key)
    (new,) = [str(r["id"]) for r in stack.rows() if str(r["id"]) not in before]
    return new


def test_harvest_turns_negative_feedback_errors_and_degraded_answers_into_cases(stack_factory, simulator, db_url):
    stack = make_stack(stack_factory, simulator, db_url, store_content=True)
    other_key = stack.add_tenant("globex", ONLY_MINI)  # store_content off (the default)

    def fb(iid, key=None, **body):
        r = post(stack, {"interaction_id": iid, **body}, key=key)
        assert r.status_code == 201, r.text

    # acme: a thumbs-down with a correction, on a multi-turn, multi-line prompt.
    corrected = ask(stack, messages=[
        {"role": "system", "content": "You are the helpdesk."},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "How long is the refund window?\nWe pay monthly."},
    ], extra_body={"metadata": {"feature": "helpdesk"}}).id
    fb(corrected, rating=-1, comment="Wrong window", correction="14 days from the first payment")
    liked = ask(stack, "Liked question").id
    fb(liked, rating=5)
    changed = ask(stack, "Changed my mind").id
    fb(changed, rating=-1, comment="bad")
    fb(changed, rating=1, scale="thumbs")  # the latest verdict wins: no longer a complaint
    two_stars = ask(stack, "Two stars question").id
    fb(two_stars, rating=2, comment="meh")
    simulator.script([Fault("server_error")], model="gpt-4o-mini")
    degraded = ask(stack, "Degraded question")
    assert degraded.choices[0].message.content == FALLBACK
    errored = _error_interaction(stack, simulator)
    ok_unrated = ask(stack, "Fine question").id

    # globex: content not stored.
    simulator.script([Fault("server_error")], model="gpt-4o-mini")
    g_degraded = ask(stack, "Globex secret question", key=other_key).id
    g_negative = ask(stack, "Another globex secret", key=other_key).id
    fb(g_negative, key=other_key, rating=1, scale="stars", correction="Globex's right answer")

    cases = harvest_cases(stack.gateway, stack.tenant.id, "7d")
    by_id = {c["source"]["interaction_id"]: c for c in cases}
    # Newest first, one case per interaction, only acme's.
    assert [c["source"]["interaction_id"] for c in cases] == [errored, degraded.id, two_stars, corrected]
    assert ok_unrated not in by_id and liked not in by_id and changed not in by_id
    assert len({c["id"] for c in cases}) == len(cases)

    c = by_id[corrected]
    assert {k: c[k] for k in ("id", "query", "expected", "expected_sources", "feature", "tags", "needs_label")} == {
        "id": f"harvested-{corrected}", "query": "How long is the refund window?\nWe pay monthly.",
        "expected": ["14 days from the first payment"], "expected_sources": [], "feature": "helpdesk",
        "tags": ["harvested", "negative-feedback"], "needs_label": False}
    src = c["source"]
    assert {k: src[k] for k in ("status", "model", "rating", "scale", "negative", "comment", "feedback_count",
                                "content_stored", "answer")} == {
        "status": "ok", "model": "gpt-4o-mini", "rating": -1, "scale": "thumbs", "negative": True,
        "comment": "Wrong window", "feedback_count": 1, "content_stored": True, "answer": REPLY}
    assert src["created_at"].endswith("Z") and src["feedback_at"].endswith("Z")

    c = by_id[two_stars]
    assert (c["query"], c["expected"], c["needs_label"], c["tags"], c["feature"]) == (
        "Two stars question", [], True, ["harvested", "negative-feedback"], "chat")
    assert (c["source"]["rating"], c["source"]["scale"], c["source"]["comment"]) == (2, "stars", "meh")

    c = by_id[degraded.id]
    assert (c["query"], c["expected"], c["needs_label"], c["tags"]) == (
        "Degraded question", [], True, ["harvested", "degraded"])
    assert {k: c["source"][k] for k in ("status", "error_type", "answer", "rating")} == {
        "status": "degraded", "error_type": "server_error", "answer": FALLBACK, "rating": None}

    c = by_id[errored]
    assert (c["query"], c["tags"], c["needs_label"]) == ("Make it fail", ["harvested", "error"], True)
    assert (c["source"]["status"], c["source"]["error_type"], c["source"]["http_status"]) == (
        "error", "bad_request", 400)

    # Without stored content: no query, no answer, a note; the correction is still the expectation.
    g_cases = harvest_cases(stack.gateway, "globex", timedelta(days=1))  # a slug works too
    assert [c["source"]["interaction_id"] for c in g_cases] == [g_negative, g_degraded]
    g = {c["source"]["interaction_id"]: c for c in g_cases}
    assert g[g_negative]["query"] is None and g[g_negative]["needs_label"] is True
    assert g[g_negative]["expected"] == ["Globex's right answer"]
    assert g[g_negative]["tags"] == ["harvested", "negative-feedback"]
    assert (g[g_negative]["source"]["rating"], g[g_negative]["source"]["scale"]) == (1, "stars")
    for c in g_cases:
        assert c["source"]["content_stored"] is False and c["source"]["answer"] is None
        assert c["source"]["note"] == NOT_STORED_NOTE
    assert g[g_degraded]["tags"] == ["harvested", "degraded"]
    # Plain values, ready for the CLI's YAML file.
    assert yaml.safe_load(yaml.safe_dump({"cases": cases}, allow_unicode=True)) == {"cases": cases}
    text = repr(cases)
    assert "globex" not in text.lower() and g_negative not in text and g_degraded not in text

    # The window: interactions count by when they ran, feedback by when it was given.
    mid = datetime.now(timezone.utc)
    time.sleep(0.01)
    fb(liked, rating=1, scale="stars", comment="changed my mind")
    recent = harvest_cases(stack.gateway, stack.tenant.id, mid)
    assert [(c["source"]["interaction_id"], c["tags"]) for c in recent] == [(liked, ["harvested", "negative-feedback"])]
    assert recent[0]["source"]["feedback_count"] == 2 and recent[0]["source"]["rating"] == 1
    assert harvest_cases(stack.gateway, stack.tenant.id, "7d", until=mid) == cases
    assert [c["source"]["interaction_id"] for c in harvest_cases(stack.gateway, stack.tenant.id, "7d", limit=2)] == [
        errored, degraded.id]
    assert [c["source"]["interaction_id"] for c in harvest_cases(stack.gateway, stack.tenant.id, "7d",
                                                                 feature="helpdesk")] == [corrected]
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert harvest_cases(stack.gateway, stack.tenant.id, future) == []

    # The CLI opens a Gateway of its own on the same database (no ledger writer of its own).
    from loadbear import Gateway

    gw = Gateway(stack.settings)
    try:
        assert harvest_cases(gw, "acme", parse_since("24h")) == harvest_cases(stack.gateway, "acme", "24h")
    finally:
        gw.close()


# -- the schema -----------------------------------------------------------------------------


def test_feedback_table_constraints(stack_factory, simulator, db_url):
    stack = make_stack(stack_factory, simulator, db_url)
    iid = ask(stack).id
    stack.gateway.ledger.flush(10)
    db = stack.gateway.db
    tid = stack.tenant.id
    insert = ("INSERT INTO feedback (id, tenant_id, interaction_id, rating, scale, negative, created_at)"
              " VALUES (?, ?, ?, ?, ?, ?, ?)")
    now = "2026-04-02T09:00:00.000000" if db.dialect == "sqlite" else datetime(2026, 4, 2, tzinfo=timezone.utc)
    for rating, scale, negative in [(3, "thumbs", False), (0, "stars", True), (4, "stars", True),
                                    (-1, "thumbs", False), (1, "emoji", False)]:
        with pytest.raises(Exception) as info:
            with db.tenant_tx(tid) as c:
                c.execute(insert, (str(uuid.uuid4()), tid, iid, rating, scale, negative, now))
        assert "constraint" in str(info.value).lower() or "check" in str(info.value).lower()
    with pytest.raises(Exception):  # an interaction that does not exist
        with db.tenant_tx(tid) as c:
            c.execute(insert, (str(uuid.uuid4()), tid, str(uuid.uuid4()), -1, "thumbs", True, now))
    with db.tenant_tx(tid) as c:
        c.execute(insert, (str(uuid.uuid4()), tid, iid, -1, "thumbs", True, now))
    # Feedback goes with its interaction (retention deletes ledger rows, their feedback follows).
    with db.system_tx() as c:
        c.execute("DELETE FROM ai_attempts WHERE interaction_id = ?", (iid,))
        c.execute("DELETE FROM ai_interactions WHERE id = ?", (iid,))
        assert c.scalar("SELECT COUNT(*) FROM feedback") == 0


# -- parsing --------------------------------------------------------------------------------


NOW = datetime(2026, 4, 2, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, expected", [
    ("7d", timedelta(days=7)),
    ("24h", timedelta(hours=24)),
    ("30m", timedelta(minutes=30)),
    ("90s", timedelta(seconds=90)),
    ("2w", timedelta(weeks=2)),
    (" 7D ", timedelta(days=7)),
    ("2026-01-31", datetime(2026, 1, 31, tzinfo=timezone.utc)),
    ("2026-01-31T12:30:00Z", datetime(2026, 1, 31, 12, 30, tzinfo=timezone.utc)),
    ("2026-01-31T12:30:00", datetime(2026, 1, 31, 12, 30, tzinfo=timezone.utc)),  # no offset: UTC
    ("2026-01-31T14:30:00+02:00", datetime(2026, 1, 31, 12, 30, tzinfo=timezone.utc)),
])
def test_parse_since(text, expected):
    got = parse_since(text, now=NOW)
    assert got == expected and type(got) is type(expected)
    if isinstance(got, datetime):
        assert got.tzinfo is not None and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text, message", [
    ("", "got nothing"),
    ("7", "neither a duration"),
    ("d7", "neither a duration"),
    ("7y", "neither a duration"),
    ("-7d", "neither a duration"),
    ("yesterday", "neither a duration"),
    ("2026-13-01", "neither a duration"),
    ("0d", "empty window"),
    ("99999999999d", "too long ago"),
    ("2026-04-03", "in the future"),
])
def test_parse_since_errors(text, message):
    with pytest.raises(SinceError, match=message) as info:
        parse_since(text, now=NOW)
    assert isinstance(info.value, ValueError)


def test_harvest_rejects_a_bad_since():
    class NoDb:
        db = None

    with pytest.raises(SinceError):
        harvest_cases(NoDb(), str(uuid.uuid4()), "last week")
    with pytest.raises(SinceError):
        harvest_cases(NoDb(), str(uuid.uuid4()), timedelta(0))


def test_last_user_message():
    prompt = "system: Be brief.\nuser: First?\nassistant: Yes.\nuser: Second line one\nline two\nassistant: "
    assert last_user_message(prompt) == "Second line one\nline two"
    assert last_user_message("user: Only one") == "Only one"
    assert last_user_message("system: No user here") is None
    assert last_user_message("no roles at all") == "no roles at all"
    assert last_user_message(None) is None
