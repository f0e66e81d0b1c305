"""The dashboard's JSON endpoints on both backends: numbers against the ledger, tenant isolation,
bad input. A real server (``Stack``) seeded through the real ledger writer."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import httpx
import pytest

from conftest import Stack, sim_models
from loadbear.dashboard.metrics import percentile
from loadbear.dashboard.seed import SeedPlan, seed_eval_runs, seed_history
from loadbear.gateway.breaker import breaker_key
from loadbear.storage.values import utcnow

ENDPOINTS = ["me", "overview", "tenants", "reliability", "cache", "filters", "interactions", "evals"]


class Dash:
    def __init__(self, stack) -> None:
        self.stack = stack
        gw = stack.gateway
        stack.add_tenant("globex", {"monthly_budget_usd": 1})
        stack.add_tenant("initech")
        self.tenants = {t.slug: t for t in gw.tenants.list_tenants()}
        self.keys = {slug: gw.tenants.create_key(slug, "dash", ["usage:read"])[1] for slug in ("acme", "globex")}
        self.chat_only = gw.tenants.create_key("acme", "chat", ["chat"])[1]
        self.seeded = seed_history(gw, self.tenants, SeedPlan(per_day={"acme": 12, "globex": 8, "initech": 4}, days=10))
        self.runs = seed_eval_runs(gw.db, self.tenants["acme"])
        today = utcnow().date()
        self.period = {"from": (today - timedelta(days=13)).isoformat(), "to": today.isoformat()}
        self.http = httpx.Client(base_url=stack.url, timeout=30)

    def get(self, path: str, key: str | None = "admin", **params):
        headers = {}
        if key == "admin":
            headers["Authorization"] = f"Bearer {self.stack.admin_key}"
        elif key is not None:
            headers["Authorization"] = f"Bearer {key}"
        q = {k: v for k, v in params.items() if v is not None}
        return self.http.get(f"/dashboard/api/{path}", params=q, headers=headers)

    def ok(self, path: str, key: str | None = "admin", **params):
        r = self.get(path, key, **params)
        assert r.status_code == 200, r.text
        return r.json()

    def sql(self, sql: str, params=()):
        with self.stack.gateway.db.system_tx(write=False) as c:
            return c.fetchall(sql, params)

    def tid(self, slug: str) -> str:
        return str(self.tenants[slug].id)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def dash(request, tmp_path_factory):
    """One seeded server per backend for the whole module: the tests only read (the two that
    change something put it back)."""
    from loadbear.testing import UpstreamSimulator

    if request.param == "sqlite":
        db_url = f"sqlite:///{tmp_path_factory.mktemp('dash') / 'dash.db'}"
    else:
        db_url = request.getfixturevalue("pg_server").fresh_url()
    sim = UpstreamSimulator(seed=7).start()
    stack = Stack(db_url, sim_models(sim.url), tenant_settings={"store_content": True, "monthly_budget_usd": 5})
    try:
        d = Dash(stack)
        yield d
        d.http.close()
    finally:
        stack.close()
        sim.stop()


def _raw(dash: Dash, slug: str | None, extra: str = "", params=()):
    """Ledger rows of the period (no eval traffic), for one tenant or all."""
    where = "1 = 1"
    args: list = []
    if slug:
        where = "CAST(i.tenant_id AS TEXT) = ?"
        args.append(dash.tid(slug))
    rows = dash.sql(f"SELECT i.*, CAST(i.tenant_id AS TEXT) AS tid FROM ai_interactions i WHERE {where} {extra}",
                    [*args, *params])
    return [r for r in rows if "eval_run" not in _meta(r)]


def _meta(row) -> dict:
    m = row["metadata"]
    return json.loads(m) if isinstance(m, str) else (m or {})


def _usage(dash: Dash, slug: str | None):
    where, args = "1 = 1", []
    if slug:
        where, args = "CAST(tenant_id AS TEXT) = ?", [dash.tid(slug)]
    return dash.sql(f"SELECT * FROM usage_daily WHERE {where}", args)


# -- auth and isolation -------------------------------------------------------------------


def test_auth_and_roles(dash):
    for path in ENDPOINTS:
        r = dash.get(path, key=None)
        assert r.status_code == 401, path
        assert r.json()["error"]["type"] == "authentication_error"
        r = dash.get(path, key="lb_wrong_key")
        assert r.status_code == 401, path
        r = dash.get(path, key=dash.chat_only)
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", path
    assert dash.get("me", key="Basic abc").status_code == 401
    me = dash.ok("me")
    assert me["role"] == "admin" and {t["slug"] for t in me["tenants"]} == {"acme", "globex", "initech"}
    assert dash.get("me").headers["cache-control"] == "no-store"
    me = dash.ok("me", key=dash.keys["globex"])
    assert me["role"] == "tenant" and me["tenant"]["slug"] == "globex"
    assert [t["slug"] for t in me["tenants"]] == ["globex"]


def test_tenant_key_never_sees_another_tenant(dash):
    key = dash.keys["globex"]
    # Asking for another tenant is refused outright, on every endpoint.
    for path in ENDPOINTS:
        r = dash.get(path, key=key, tenant="acme")
        assert r.status_code == 403, path
        assert r.json()["error"]["code"] == "tenant_forbidden"
    # Its own slug is fine and the same as no filter.
    assert dash.ok("overview", key=key, tenant="globex", **dash.period) == dash.ok("overview", key=key, **dash.period)

    own = _usage(dash, "globex")
    ov = dash.ok("overview", key=key, **dash.period)
    assert ov["totals"]["cost_micro_usd"] == sum(r["cost_micro_usd"] for r in own)
    assert ov["totals"]["requests"] == sum(r["requests"] for r in own)
    assert [t["slug"] for t in dash.ok("tenants", key=key, **dash.period)["data"]] == ["globex"]
    assert dash.ok("reliability", key=key, **dash.period)["totals"]["requests"] == len(_raw(dash, "globex"))
    assert dash.ok("cache", key=key, **dash.period)["totals"]["requests"] == len(_raw(dash, "globex"))
    users = dash.ok("filters", key=key, **dash.period)["users"]
    assert users and all(u.startswith("glo-") for u in users)
    assert dash.ok("evals", key=key)["data"] == []  # acme's runs stay acme's

    seen = []
    cursor = None
    while True:
        page = dash.ok("interactions", key=key, limit=100, cursor=cursor)
        seen += page["data"]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    assert len(seen) == len(dash.seeded["interactions"]["globex"])
    assert {r["tenant"] for r in seen} == {"globex"}

    acme_id = dash.seeded["interactions"]["acme"][0]
    r = dash.get(f"interactions/{acme_id}", key=key)
    assert r.status_code == 404 and r.json()["error"]["code"] == "interaction_not_found"
    assert dash.ok(f"interactions/{acme_id}", key=dash.keys["acme"])["tenant"] == "acme"
    r = dash.get("evals/compare", key=key, a=dash.runs[0]["id"], b=dash.runs[1]["id"])
    assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found"


# -- numbers against the ledger -----------------------------------------------------------


@pytest.mark.parametrize("who", ["all", "acme"])
def test_overview_matches_ledger(dash, who):
    slug = None if who == "all" else who
    for group in ("model", "feature"):
        ov = dash.ok("overview", tenant=slug, group_by=group, **dash.period)
        usage = _usage(dash, slug)
        assert ov["totals"]["cost_micro_usd"] == sum(r["cost_micro_usd"] for r in usage) > 0
        assert ov["totals"]["requests"] == sum(r["requests"] for r in usage)
        assert ov["totals"]["prompt_tokens"] == sum(r["prompt_tokens"] for r in usage)
        assert ov["totals"]["completion_tokens"] == sum(r["completion_tokens"] for r in usage)
        by_group: dict[str, int] = {}
        for r in usage:
            by_group[r[group]] = by_group.get(r[group], 0) + r["cost_micro_usd"]
        assert {s["name"]: sum(s["values"]) for s in ov["series"]} == by_group
        per_day: dict[str, int] = {}
        for r in usage:
            day = str(r["day"])[:10]
            per_day[day] = per_day.get(day, 0) + r["cost_micro_usd"]
        assert {d: v for d, v in zip(ov["days"], ov["cost_micro_usd"]) if v} == {d: v for d, v in per_day.items() if v}
    raw = _raw(dash, slug)
    assert ov["totals"]["saved_cache_micro_usd"] == sum(r["saved_micro_usd"] for r in raw if r["cached"]) > 0
    assert ov["totals"]["saved_routing_micro_usd"] == sum(r["saved_micro_usd"] for r in raw if not r["cached"]) > 0


def test_tenants_budgets_and_top_lists(dash):
    data = {t["slug"]: t for t in dash.ok("tenants", **dash.period)["data"]}
    assert set(data) == {"acme", "globex", "initech"}
    for slug, t in data.items():
        usage = _usage(dash, slug)
        assert t["cost_micro_usd"] == sum(r["cost_micro_usd"] for r in usage)
        feats: dict[str, int] = {}
        users: dict[str, int] = {}
        for r in usage:
            feats[r["feature"]] = feats.get(r["feature"], 0) + r["cost_micro_usd"]
            if r["user_external_id"]:
                users[r["user_external_id"]] = users.get(r["user_external_id"], 0) + r["cost_micro_usd"]
        top = sorted(feats.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        assert [(f["name"], f["cost_micro_usd"]) for f in t["features"]] == top
        assert [(u["name"], u["cost_micro_usd"]) for u in t["users"]] == sorted(users.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert data["acme"]["budget"]["monthly_budget_usd"] == 5
    assert data["acme"]["budget"] == dash.stack.gateway.budget.status(dash.tenants["acme"])
    assert data["globex"]["budget"]["monthly_budget_usd"] == 1
    assert data["initech"]["budget"] is None


def test_reliability_matches_ledger(dash):
    gw = dash.stack.gateway
    for _ in range(gw.breakers.threshold):
        asyncio.run(gw.breakers.record(breaker_key(gw.catalog.get("gpt-4o")), False, 10))
    try:
        rel = dash.ok("reliability", tenant="acme", **dash.period)
    finally:
        gw.breakers.reset()
    raw = _raw(dash, "acme")
    t = rel["totals"]
    assert t["requests"] == len(raw) == sum(rel["requests"])
    assert t["errors"] == sum(1 for r in raw if r["status"] == "error") > 0
    assert t["degraded"] == sum(1 for r in raw if r["status"] == "degraded") > 0
    first = {str(a["interaction_id"]): a["model"] for a in dash.sql("SELECT * FROM ai_attempts WHERE attempt_no = 1")}
    fallbacks = [r for r in raw if r["status"] == "ok" and (
        (r["attempt_count"] > 1 and first.get(str(r["id"])) != r["model"]) or "skipped" in _meta(r))]
    assert t["fallbacks"] == len(fallbacks) > 0
    assert t["error_rate"] == round(t["errors"] / t["requests"], 4)
    timed = sorted(r["latency_ms"] for r in raw if r["status"] in ("ok", "degraded") and not r["cached"])
    assert t["latency_p50_ms"] == percentile(timed, 50) and t["latency_p95_ms"] == percentile(timed, 95)
    ttft = sorted(r["ttft_ms"] for r in raw if r["status"] in ("ok", "degraded") and not r["cached"] and r["ttft_ms"] is not None)
    assert t["ttft_p95_ms"] == percentile(ttft, 95)
    models = {m["model"]: m for m in rel["models"]}
    assert models["gpt-4o"]["breaker"] == "open" and models["gpt-4o-mini"]["breaker"] == "closed"
    assert models["gpt-4o"]["requests"] == sum(1 for r in raw if r["model"] == "gpt-4o")


def test_breaker_skip_counts_as_a_fallback_like_metrics(dash):
    """An answer from the fallback because the first choice's breaker was open (one attempt, the
    skip noted in the row's metadata) is a fallback on the dashboard, as in /metrics."""
    gw = dash.stack.gateway
    before = dash.ok("reliability", tenant="initech", **dash.period)["totals"]
    key = gw.tenants.create_key("initech", "chat", ["chat"])[1]
    for _ in range(gw.breakers.threshold):
        asyncio.run(gw.breakers.record(breaker_key(gw.catalog.get("gpt-4o")), False, 10))
    try:
        out = dash.stack.openai(key).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Is the provider down?"}])
    finally:
        gw.breakers.reset()
    gw.ledger.flush(10)
    assert out.model == "gpt-4o-mini"
    [row] = dash.sql("SELECT * FROM ai_interactions WHERE CAST(id AS TEXT) = ?", (out.id,))
    assert row["attempt_count"] == 1 and _meta(row)["skipped"] == ["gpt-4o"]
    after = dash.ok("reliability", tenant="initech", **dash.period)["totals"]
    assert after["requests"] == before["requests"] + 1
    assert after["fallbacks"] == before["fallbacks"] + 1
    metrics = httpx.get(dash.stack.url + "/metrics", headers={"Authorization": f"Bearer {dash.stack.admin_key}"}).text
    assert 'loadbear_fallbacks_total{tenant="initech",model="gpt-4o-mini",feature="chat"} 1' in metrics


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([7], 95) == 7
    assert percentile(list(range(1, 101)), 50) == 50
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile([1, 2, 3, 4], 50) == 2


def test_cache_matches_ledger(dash):
    c = dash.ok("cache", **dash.period)
    raw = _raw(dash, None)
    hits = [r for r in raw if r["cached"]]
    assert c["totals"]["hits"] == len(hits) > 0
    assert c["totals"]["requests"] == len(raw)
    assert c["totals"]["saved_micro_usd"] == sum(r["saved_micro_usd"] for r in hits)
    assert {k["kind"]: k["hits"] for k in c["kinds"]} == {
        kind: sum(1 for r in hits if (r["cache_kind"] or "exact") == kind) for kind in {r["cache_kind"] or "exact" for r in hits}}


# -- explorer -----------------------------------------------------------------------------


def test_interactions_filters_and_pages(dash):
    all_acme = dash.seeded["interactions"]["acme"]
    raw = _raw(dash, "acme")
    for params, pred in (
        ({"status": "error"}, lambda r: r["status"] == "error"),
        ({"cached": "true"}, lambda r: bool(r["cached"])),
        ({"cached": "false", "feature": "summarize"}, lambda r: not r["cached"] and r["feature"] == "summarize"),
        ({"model": "gpt-4o"}, lambda r: r["model"] == "gpt-4o"),
    ):
        got = dash.ok("interactions", tenant="acme", limit=200, **params)
        assert not got["has_more"]
        assert sorted(r["id"] for r in got["data"]) == sorted(str(r["id"]) for r in raw if pred(r)), params
    user = dash.ok("interactions", tenant="acme", user="acm-user-03", limit=200)["data"]
    assert user and all(r["user"] == "acm-user-03" for r in user)

    pages, cursor = [], None
    while True:
        page = dash.ok("interactions", tenant="acme", limit=37, cursor=cursor)
        pages.append(page["data"])
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    flat = [r for p in pages for r in p]
    assert len(pages) > 1 and len(flat) == len(all_acme) == len({r["id"] for r in flat})
    keys = [(r["created_at"], r["id"]) for r in flat]
    assert keys == sorted(keys, reverse=True)

    day = flat[len(flat) // 2]["created_at"][:10]
    one_day = dash.ok("interactions", tenant="acme", limit=200, **{"from": day, "to": day})["data"]
    assert one_day and all(r["created_at"][:10] == day for r in one_day)
    assert len(one_day) == sum(1 for r in flat if r["created_at"][:10] == day)


def test_interaction_detail(dash):
    acme = dash.tenants["acme"]
    rows = dash.sql("SELECT CAST(id AS TEXT) AS id, attempt_count, retrieved_chunk_ids FROM ai_interactions"
                    " WHERE CAST(tenant_id AS TEXT) = ? AND attempt_count > 1 AND status = 'ok'", (str(acme.id),))
    d = dash.ok(f"interactions/{rows[0]['id']}")
    assert d["tenant"] == "acme" and len(d["attempts"]) == rows[0]["attempt_count"] == 2
    assert d["attempts"][0]["status"] == "error" and d["attempts"][1]["status"] == "ok"
    assert d["cost_micro_usd"] == sum(a["cost_micro_usd"] for a in d["attempts"])
    assert d["content_allowed"] and d["prompt"].startswith("user: ")

    grounded = [r for r in dash.sql("SELECT CAST(id AS TEXT) AS id, retrieved_chunk_ids FROM ai_interactions"
                                    " WHERE retrieved_chunk_ids IS NOT NULL")]
    d = dash.ok(f"interactions/{grounded[0]['id']}", key=dash.keys["acme"])
    assert len(d["sources"]) == 2 and all(s["found"] and s["title"].startswith("Help centre") for s in d["sources"])

    fb = dash.sql("SELECT CAST(interaction_id AS TEXT) AS iid, comment FROM feedback"
                  " WHERE CAST(tenant_id AS TEXT) = ?", (str(dash.tenants["globex"].id),))
    d = dash.ok(f"interactions/{fb[0]['iid']}")
    assert d["tenant"] == "globex" and [f["comment"] for f in d["feedback"]] == [fb[0]["comment"]]
    # globex does not allow storing content: nothing is shown, even to the admin.
    assert d["content_allowed"] is False and d["prompt"] is None and d["response"] is None

    # Turning store_content off hides what was stored before.
    dash.stack.gateway.tenants.update_settings("acme", {"store_content": False})
    try:
        d = dash.ok(f"interactions/{rows[0]['id']}")
        assert d["prompt"] is None and d["response"] is None
    finally:
        dash.stack.gateway.tenants.update_settings("acme", {"store_content": True})


def test_eval_runs_and_comparison(dash):
    runs = dash.ok("evals")["data"]
    assert [r["label"] for r in runs] == ["rerank-v2", "baseline"] and runs[0]["tenant"] == "acme"
    assert dash.ok("evals", key=dash.keys["acme"])["data"] == runs
    base, new = dash.runs
    c = dash.ok("evals/compare", key=dash.keys["acme"], a=base["id"], b=new["id"])
    metrics = {m["name"]: m for m in c["metrics"]}
    pa, pb = base["summary"]["metrics"]["pass_rate"], new["summary"]["metrics"]["pass_rate"]
    assert metrics["pass_rate"]["a"] == pa and metrics["pass_rate"]["b"] == pb
    assert metrics["pass_rate"]["delta"] == round(pb - pa, 4)
    assert c["a"]["label"] == "baseline" and c["b"]["label"] == "rerank-v2"
    assert [f["case_id"] for f in c["flips"]["regressions"]] == ["case-03"]
    assert c["flips"]["fixes"]


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("path,params,param", [
    ("overview", {"group_by": "tenant"}, "group_by"),
    ("overview", {"from": "yesterday"}, "from"),
    ("overview", {"from": "2026-02-01", "to": "2026-01-01"}, "from"),
    ("reliability", {"from": "2020-01-01", "to": "2021-06-01"}, "from"),
    ("interactions", {"status": "fine"}, "status"),
    ("interactions", {"cached": "maybe"}, "cached"),
    ("interactions", {"limit": "0"}, "limit"),
    ("interactions", {"limit": "lots"}, "limit"),
    ("interactions", {"cursor": "not-a-cursor"}, "cursor"),
    ("interactions", {"from": "2026-13-01"}, "from"),
    ("interactions", {"from": "2026-02-01", "to": "2026-01-01"}, "from"),
    ("interactions", {"feature": "x" * 201}, "feature"),
    ("interactions/not-a-uuid", {}, "id"),
    ("evals/compare", {"b": "x"}, "a"),
    ("evals/compare", {"a": "nope", "b": "nope"}, "a"),
])
def test_bad_input_is_400(dash, path, params, param):
    r = dash.get(path, **params)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_unknown_tenant_and_interaction_are_404(dash):
    r = dash.get("overview", tenant="nobody")
    assert r.status_code == 404 and r.json()["error"]["param"] == "tenant"
    r = dash.get("interactions/00000000-0000-4000-8000-000000000000")
    assert r.status_code == 404 and r.json()["error"]["code"] == "interaction_not_found"


def test_pages_are_served_from_the_package(dash):
    http = dash.http
    r = http.get("/dashboard", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/dashboard/"
    r = http.get("/dashboard/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "http" not in r.text.replace("http-equiv", "")  # nothing from a CDN
    for name in ("app.js", "charts.js", "app.css"):
        r = http.get(f"/dashboard/static/{name}")
        assert r.status_code == 200 and len(r.content) > 1000
        assert "://" not in r.text.replace("http://www.w3.org/2000/svg", "").replace("https://help", "")
    for bad in ("nope.js", "..%2Fscope.py", "seed.py"):
        assert http.get(f"/dashboard/static/{bad}").status_code == 404


def test_reads_run_under_row_level_security(dash):
    """A tenant's view reads through ``tenant_tx``: on PostgreSQL even a query that forgets the
    tenant filter sees only that tenant's rows (SQLite has no RLS: there the filter is the
    boundary, checked by the isolation test above)."""
    from loadbear.dashboard.scope import View, Viewer, read_tx

    gw = dash.stack.gateway
    if gw.db.dialect != "postgres":
        pytest.skip("row-level security is PostgreSQL's")
    globex = dash.tenants["globex"]
    with read_tx(gw.db, View(Viewer(False, globex), globex)) as c:
        seen = {str(r["tenant_id"]) for r in c.fetchall("SELECT DISTINCT tenant_id FROM ai_interactions")}
        feedback = {str(r["tenant_id"]) for r in c.fetchall("SELECT DISTINCT tenant_id FROM feedback")}
        runs = c.fetchall("SELECT id FROM eval_runs")
    assert seen == {str(globex.id)} and feedback <= {str(globex.id)} and runs == []
