"""Admin API, health endpoints, usage reports over HTTP, and tenant isolation at the API."""

from __future__ import annotations

import httpx
import pytest

from conftest import Stack, sim_models

MSG = [{"role": "user", "content": "hello"}]


def admin(stack, method, path, **kw):
    return httpx.request(method, stack.url + path, headers={"Authorization": f"Bearer {stack.admin_key}"}, **kw)


def test_health_and_ready(stack):
    assert httpx.get(stack.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(stack.url + "/readyz")
    assert r.status_code == 200 and r.json()["migrations_current"] is True


def test_readyz_reports_pending_migrations(tmp_path):
    from loadbear import Gateway, Settings
    from loadbear.api.app import create_app
    from loadbear.testing.server import ServerThread

    settings = Settings.load(env={}, database_url=f"sqlite:///{tmp_path / 'old.db'}")
    gw = Gateway(settings)
    from loadbear.storage.migrate import migrate

    migrate(gw.db, target=1)
    with ServerThread(create_app(gw)) as srv:
        r = httpx.get(srv.url + "/readyz")
        assert r.status_code == 503
        assert r.json() == {"status": "not_ready", "database": True, "migrations_current": False}
    gw.close()


def test_admin_tenant_and_key_lifecycle(stack):
    r = admin(stack, "POST", "/admin/tenants", json={"slug": "globex", "name": "Globex",
                                                      "settings": {"monthly_budget_usd": 50, "support_contact": "help@globex.test"}})
    assert r.status_code == 201
    tenant = r.json()
    assert tenant["slug"] == "globex" and tenant["settings"]["monthly_budget_usd"] == 50
    assert admin(stack, "POST", "/admin/tenants", json={"slug": "globex"}).status_code == 409
    bad = admin(stack, "POST", "/admin/tenants", json={"slug": "Not A Slug"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "slug"
    bad = admin(stack, "POST", "/admin/tenants", json={"slug": "ok-slug", "settings": {"colour": "red"}})
    assert bad.status_code == 400 and "colour" in bad.json()["error"]["message"]
    assert admin(stack, "GET", "/admin/tenants/ok-slug").status_code == 404, "nothing half-written"

    r = admin(stack, "POST", "/admin/tenants/globex/keys", json={"name": "backend", "scopes": ["chat"]})
    assert r.status_code == 201
    key = r.json()
    assert key["key"].startswith(key["prefix"] + "_") and key["scopes"] == ["chat"]
    listed = admin(stack, "GET", "/admin/tenants/globex/keys").json()["data"]
    assert [k["prefix"] for k in listed] == [key["prefix"]]
    assert all("key" not in k and "key_hash" not in k for k in listed)
    assert admin(stack, "POST", "/admin/tenants/nope/keys", json={}).status_code == 404
    bad = admin(stack, "POST", "/admin/tenants/globex/keys", json={"scopes": ["root"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "scopes"

    r = admin(stack, "PATCH", "/admin/tenants/globex", json={"settings": {"allowed_models": ["local"]}})
    assert r.status_code == 200 and r.json()["settings"]["allowed_models"] == ["local"]
    slugs = [t["slug"] for t in admin(stack, "GET", "/admin/tenants").json()["data"]]
    assert slugs == ["acme", "globex"]

    r = admin(stack, "DELETE", f"/admin/tenants/globex/keys/{key['prefix']}")
    assert r.status_code == 200 and r.json()["revoked_at"]
    assert admin(stack, "DELETE", "/admin/tenants/globex/keys/lb_missing").status_code == 404


def test_admin_routes_need_the_admin_key(stack):
    r = httpx.get(stack.url + "/admin/tenants")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.get(stack.url + "/admin/tenants", headers={"Authorization": f"Bearer {stack.key}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(stack.url + "/admin/tenants", json={"slug": "evil"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert [t.slug for t in stack.gateway.tenants.list_tenants()] == ["acme"]


def test_admin_disabled_without_admin_key(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), admin_key=None)
    r = httpx.get(s.url + "/admin/tenants", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_usage_api_is_tenant_scoped_and_matches_ledger(stack):
    other = stack.add_tenant("globex")
    client, other_client = stack.openai(), stack.openai(other)
    for i in range(3):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, user=f"u{i % 2}")
    client.chat.completions.create(model="gpt-4o", messages=MSG, extra_headers={"X-Loadbear-Feature": "summarize"})
    other_client.chat.completions.create(model="gpt-4o", messages=MSG)
    rows = stack.rows()
    assert len(rows) == 5
    acme_rows = [r for r in rows if str(r["tenant_id"]) == stack.tenant.id]

    h = {"Authorization": f"Bearer {stack.key}"}
    by_model = httpx.get(stack.url + "/v1/usage", params={"group_by": "model"}, headers=h).json()
    assert {d["model"]: d["requests"] for d in by_model["data"]} == {"gpt-4o-mini": 3, "gpt-4o": 1}
    assert by_model["totals"]["cost_micro_usd"] == sum(r["cost_micro_usd"] for r in acme_rows)
    assert by_model["totals"]["prompt_tokens"] == sum(r["prompt_tokens"] for r in acme_rows)
    by_user = httpx.get(stack.url + "/v1/usage", params={"group_by": "user"}, headers=h).json()
    assert {d["user"]: d["requests"] for d in by_user["data"]} == {"": 1, "u0": 2, "u1": 1}
    by_feature = httpx.get(stack.url + "/v1/usage", params={"group_by": "feature"}, headers=h).json()
    assert {d["feature"]: d["requests"] for d in by_feature["data"]} == {"chat": 3, "summarize": 1}
    by_day = httpx.get(stack.url + "/v1/usage", headers=h).json()
    assert by_day["totals"]["requests"] == 4

    bad = httpx.get(stack.url + "/v1/usage", params={"group_by": "colour"}, headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
    bad = httpx.get(stack.url + "/v1/usage", params={"from": "yesterday"}, headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "from"

    all_t = admin(stack, "GET", "/admin/usage").json()
    assert {d["tenant"]: d["requests"] for d in all_t["data"]} == {"acme": 4, "globex": 1}
    only = admin(stack, "GET", "/admin/usage", params={"tenant": "globex", "group_by": "model"}).json()
    assert {d["model"]: d["requests"] for d in only["data"]} == {"gpt-4o": 1}


def test_tenant_from_key_never_from_body_or_headers(stack):
    """A tenant key cannot act as another tenant by naming it anywhere in the request."""
    other = stack.add_tenant("globex")
    other_tenant = stack.gateway.tenants.get_tenant("globex")
    h = {"Authorization": f"Bearer {other}", "X-Tenant-Id": stack.tenant.id, "X-Loadbear-Tenant": "acme"}
    body = {"model": "gpt-4o-mini", "messages": MSG, "tenant": "acme", "tenant_id": stack.tenant.id,
            "metadata": {"tenant": "acme", "tenant_id": stack.tenant.id}}
    r = httpx.post(stack.url + "/v1/chat/completions", json=body, headers=h)
    assert r.status_code == 200
    rows = stack.rows()
    assert [str(r["tenant_id"]) for r in rows] == [other_tenant.id]
    usage = httpx.get(stack.url + "/v1/usage", headers={"Authorization": f"Bearer {stack.key}", "X-Tenant-Id": other_tenant.id}).json()
    assert usage["totals"]["requests"] == 0


@pytest.mark.postgres
def test_gateway_on_postgres(stack_factory, simulator, pg_server):
    s = stack_factory(sim_models(simulator.url), db_url=pg_server.fresh_url())
    out = s.openai().chat.completions.create(model="gpt-4o-mini", messages=MSG, user="u1")
    chunks = list(s.openai().chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True))
    rows = s.rows()
    assert {str(r["id"]) for r in rows} == {out.id, chunks[0].id}
    assert all(r["status"] == "ok" and r["cost_micro_usd"] > 0 for r in rows)
    usage = httpx.get(s.url + "/v1/usage", headers={"Authorization": f"Bearer {s.key}"}).json()
    assert usage["totals"]["requests"] == 2
