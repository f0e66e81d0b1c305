"""The foundation's promises that no other module pins down on its own: where the embedded
database and the config file live, reports that never look at raw ledger rows, end users scoped to
their tenant, prices that never rewrite history, and bad admin input answered in OpenAI's shape
with nothing written."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import httpx
import pytest

from conftest import sim_models, write_ledger
from loadbear.ledger.records import AttemptRecord, InteractionRecord
from loadbear.ledger.reports import tenant_usage
from loadbear.storage.db import Database
from loadbear.storage.values import db_time, utcnow, uuid7
from loadbear.tenancy.service import TenantService, user_uuid
from loadbear.testing import Fault

MSG = [{"role": "user", "content": "hello"}]


def record(tenant_id: str, *, user: str | None = None, cost: int = 100) -> InteractionRecord:
    now = utcnow()
    r = InteractionRecord(id=uuid7(), tenant_id=tenant_id, feature="chat", requested_model="gpt-4o-mini",
                          model="gpt-4o-mini", status="ok", created_at=now, latency_ms=12, prompt_tokens=10,
                          completion_tokens=5, cost_micro_usd=cost, user_external_id=user)
    r.attempts.append(AttemptRecord(1, "openai", "gpt-4o-mini", "gpt-4o-mini", "ok", now, 11, cost_micro_usd=cost))
    return r


def write(db: Database, records, tmp_path: Path) -> None:
    write_ledger(db, records, tmp_path, flush_timeout=10)


def this_month() -> tuple[date, date]:
    today = utcnow().date()
    return today - timedelta(days=29), today


# -- the embedded defaults -------------------------------------------------------------------


def test_default_database_is_a_wal_sqlite_file_in_the_working_directory(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADBEAR_")}
    p = subprocess.run([sys.executable, "-m", "loadbear.cli", "migrate"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "applied migrations" in p.stdout
    assert (tmp_path / "loadbear.db").is_file()
    with sqlite3.connect(tmp_path / "loadbear.db") as conn:
        # WAL is a property of the file: readers never block the ledger writer.
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] > 0


def test_loadbear_toml_in_the_working_directory_is_read_and_env_wins(tmp_path: Path, monkeypatch):
    from loadbear.config.settings import Settings

    (tmp_path / "loadbear.toml").write_text(
        'port = 9100\nadmin_key = "from-the-file"\nmax_body_bytes = 4096\n'
        '[models.cheap]\nprovider = "openai"\ninput_price = 0.1\ncached_input_price = 0.05\noutput_price = 0.4\n'
    )
    monkeypatch.chdir(tmp_path)
    s = Settings.load(env={})
    assert (s.port, s.admin_key, s.max_body_bytes) == (9100, "from-the-file", 4096)
    assert s.models["cheap"]["cached_input_price"] == 0.05  # prices are edited in settings
    s = Settings.load(env={"LOADBEAR_PORT": "9200", "LOADBEAR_ADMIN_KEY": "from-env"})
    assert (s.port, s.admin_key) == (9200, "from-env")
    other = tmp_path / "elsewhere.toml"
    other.write_text("port = 9300\n")
    assert Settings.load(env={"LOADBEAR_CONFIG": str(other)}).port == 9300


# -- reports read the rollups ------------------------------------------------------------------


def test_reports_read_the_rollups_never_the_raw_rows(db: Database, tmp_path: Path):
    tenant = TenantService(db).create_tenant(f"rollup-{uuid.uuid4().hex[:8]}").id
    write(db, [record(tenant, cost=100) for _ in range(5)], tmp_path)
    start, end = this_month()
    before = tenant_usage(db, tenant, start, end, "model")
    assert before["totals"]["requests"] == 5 and before["totals"]["cost_micro_usd"] == 500

    with db.system_tx() as c:
        # A raw row that bypassed the writer (so no rollup knows it) ...
        c.execute(
            "INSERT INTO ai_interactions (id, tenant_id, feature, model, requested_model, prompt_tokens,"
            " completion_tokens, latency_ms, status, cost_micro_usd, created_at)"
            " VALUES (?, ?, 'chat', 'gpt-4o-mini', 'gpt-4o-mini', 1, 1, 1, 'ok', 999999, ?)",
            (uuid7(), tenant, db_time(db.dialect, utcnow())))
    assert tenant_usage(db, tenant, start, end, "model") == before  # ... is not counted,

    with db.system_tx() as c:
        c.execute("DELETE FROM ai_attempts WHERE tenant_id = ?", (tenant,))
        c.execute("DELETE FROM ai_interactions WHERE tenant_id = ?", (tenant,))
    for group_by in ("day", "feature", "model", "user"):
        # ... and with no raw rows left at all, every report still says what was written.
        assert tenant_usage(db, tenant, start, end, group_by)["totals"] == before["totals"], group_by


# -- end users ----------------------------------------------------------------------------------


def test_end_users_are_scoped_to_their_tenant(db: Database, tmp_path: Path):
    svc = TenantService(db)
    run = uuid.uuid4().hex[:8]
    a, b = (svc.create_tenant(f"{s}-{run}").id for s in ("eu-a", "eu-b"))
    # The SaaS's own user id "42" exists in both tenants: two different end users.
    write(db, [record(a, user="42"), record(a, user="42"), record(b, user="42"), record(b)], tmp_path)
    with db.system_tx(write=False) as c:
        users = {str(r["id"]): (str(r["tenant_id"]), r["external_id"]) for r in c.fetchall(
            "SELECT id, tenant_id, external_id FROM users WHERE tenant_id IN (?, ?)", (a, b))}
        rows = c.fetchall("SELECT tenant_id, user_id FROM ai_interactions WHERE tenant_id IN (?, ?)", (a, b))
    assert users == {user_uuid(a, "42"): (a, "42"), user_uuid(b, "42"): (b, "42")}
    linked = Counter((str(r["tenant_id"]), str(r["user_id"]) if r["user_id"] else None) for r in rows)
    assert linked == Counter({(a, user_uuid(a, "42")): 2, (b, user_uuid(b, "42")): 1, (b, None): 1})
    start, end = this_month()
    assert {d["user"]: d["requests"] for d in tenant_usage(db, a, start, end, "user")["data"]} == {"42": 2}
    assert {d["user"]: d["requests"] for d in tenant_usage(db, b, start, end, "user")["data"]} == {"42": 1, "": 1}


# -- prices -------------------------------------------------------------------------------------


def test_a_price_change_never_rewrites_recorded_cost(stack_factory, simulator, db_url):
    from loadbear import Gateway, Settings
    from loadbear.api.app import create_app
    from loadbear.config.catalog import Catalog
    from loadbear.testing.server import ServerThread

    s = stack_factory(sim_models(simulator.url), db_url=db_url)
    first = s.openai().chat.completions.create(model="gpt-4o-mini", messages=MSG)
    old_cost = round(first.usage.prompt_tokens * 0.15 + first.usage.completion_tokens * 0.60)
    [row] = s.rows()
    assert row["cost_micro_usd"] == old_cost > 0

    # The operator re-prices the model (10x) and restarts: a new gateway on the same database.
    repriced = sim_models(simulator.url, **{"gpt-4o-mini": {"input_price": 1.5, "output_price": 6.0}})
    settings = Settings.load(env={}, config_path=None, database_url=db_url, admin_key="x", models=repriced,
                             ledger_flush_interval_ms=5)
    gw = Gateway(settings, catalog=Catalog.from_settings(repriced, env={}))
    try:
        with ServerThread(create_app(gw)) as srv:
            import openai

            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=s.key, max_retries=0)
            second = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            gw.ledger.flush(10)
            new_cost = round(second.usage.prompt_tokens * 1.5 + second.usage.completion_tokens * 6.0)
            costs = {str(r["id"]): r["cost_micro_usd"] for r in s.rows()}
            assert costs == {first.id: old_cost, second.id: new_cost}
            usage = httpx.get(srv.url + "/v1/usage", headers={"Authorization": f"Bearer {s.key}"}).json()
            assert usage["totals"]["cost_micro_usd"] == old_cost + new_cost
            # from/to bound the report by UTC day, both ends included.
            day = lambda n: (utcnow().date() + timedelta(days=n)).isoformat()  # noqa: E731
            for period, requests in (((day(0), day(0)), 2), ((day(-1), day(-1)), 0), ((day(-3), day(0)), 2)):
                got = httpx.get(srv.url + "/v1/usage", params={"from": period[0], "to": period[1]},
                                headers={"Authorization": f"Bearer {s.key}"}).json()
                assert (got["from"], got["to"], got["totals"]["requests"]) == (*period, requests)
    finally:
        gw.close()


# -- the ledger row's debugging columns ------------------------------------------------------------


def test_ledger_row_carries_the_request_id_and_the_error_text(stack, simulator):
    r = httpx.post(stack.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG},
                   headers={"Authorization": f"Bearer {stack.key}", "X-Request-Id": "req-from-the-caller"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-from-the-caller"
    simulator.script([Fault("context_length")])
    r = httpx.post(stack.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG},
                   headers={"Authorization": f"Bearer {stack.key}"})
    assert r.status_code == 400
    ok, failed = stack.rows()
    assert ok["request_id"] == "req-from-the-caller" and ok["error"] is None and ok["status"] == "ok"
    assert failed["request_id"] == r.headers["x-request-id"] and failed["request_id"]
    assert failed["status"] == "error" and failed["error_type"] == "context_length"
    assert failed["error"] and "context" in failed["error"].lower()
    [attempt] = stack.attempts(failed["id"])
    assert attempt["error_type"] == "context_length" and attempt["error"] and attempt["latency_ms"] >= 0


# -- bad admin input ----------------------------------------------------------------------------


def assert_openai_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def test_bad_admin_input_is_a_clear_4xx_and_writes_nothing(stack_factory, simulator, db_url):
    s = stack_factory(sim_models(simulator.url), db_url=db_url)
    admin = {"Authorization": f"Bearer {s.admin_key}"}
    post = lambda path, **kw: httpx.post(s.url + path, headers={**admin, **kw.pop("headers", {})}, **kw)  # noqa: E731

    assert_openai_error(post("/admin/tenants", content=b"{nope", headers={"Content-Type": "application/json"}),
                        400, "invalid_json")
    assert_openai_error(post("/admin/tenants", content=b"[]"), 400, "invalid_type")
    assert_openai_error(post("/admin/tenants", json={"slug": 7}), 400, "invalid_request", "slug")
    assert_openai_error(post("/admin/tenants", json={"slug": "typed", "name": ["x"]}), 400, "invalid_type", "name")
    assert_openai_error(post("/admin/tenants", json={"slug": "typed", "settings": {"default_model": 4}}), 400,
                        "invalid_request", "settings.default_model")
    big = {"slug": "huge", "name": "x" * (s.settings.max_body_bytes + 1)}
    assert_openai_error(post("/admin/tenants", json=big), 413, "request_too_large")
    assert_openai_error(post("/admin/tenants/acme/keys", content=b"{", headers={"Content-Type": "application/json"}),
                        400, "invalid_json")
    assert_openai_error(post("/admin/tenants/nope/keys", json={}), 404, "tenant_not_found", "slug")
    assert [t.slug for t in s.gateway.tenants.list_tenants()] == ["acme"]
    assert len(s.gateway.tenants.list_keys("acme")) == 1

    # Usage for a tenant that does not exist is a 404, not an empty report that reads as "no traffic".
    err = assert_openai_error(httpx.get(s.url + "/admin/usage", params={"tenant": "acmee"}, headers=admin),
                              404, "tenant_not_found", "tenant")
    assert "acmee" in err["message"]
    ok = httpx.get(s.url + "/admin/usage", params={"tenant": "acme"}, headers=admin)
    assert ok.status_code == 200 and ok.json()["totals"]["requests"] == 0


def test_cli_reports_an_unknown_tenant(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADBEAR_")}
    env["LOADBEAR_DATABASE_URL"] = f"sqlite:///{tmp_path / 'cli.db'}"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "loadbear.cli", *args], env=env, capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)

    # Before any migration: a clear error naming the fix, not a traceback about a missing table.
    p = cli("keys", "list", "--tenant", "acme", "--json")
    assert p.returncode == 2 and "loadbear migrate" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert cli("migrate").returncode == 0
    p = cli("usage", "--tenant", "nope", "--json")
    assert p.returncode == 2 and "no tenant with slug 'nope'" in p.stderr and p.stdout == "", (p.stdout, p.stderr)


# -- readiness ----------------------------------------------------------------------------------


@pytest.mark.postgres
def test_readyz_is_503_when_tenant_work_cannot_reach_the_database(pg_server):
    from loadbear import Gateway, Settings
    from loadbear.api.app import create_app
    from loadbear.storage.db import app_conninfo
    from loadbear.testing.server import ServerThread

    url = pg_server.fresh_url()
    # The application role's login fails (no such role): the owner's login alone is not "ready".
    settings = Settings.load(env={}, config_path=None, database_url=url,
                             database_app_url=app_conninfo(url, f"lbtest_gone_{uuid.uuid4().hex[:8]}"))
    gw = Gateway(settings)
    try:
        with ServerThread(create_app(gw)) as srv:
            assert httpx.get(srv.url + "/healthz").status_code == 200  # alive, just not ready
            r = httpx.get(srv.url + "/readyz")
            assert r.status_code == 503
            assert r.json() == {"status": "not_ready", "database": False, "migrations_current": False}
    finally:
        gw.close()


# -- shutdown ------------------------------------------------------------------------------------


def test_serve_writes_every_queued_ledger_row_on_shutdown(tmp_path: Path):
    """`loadbear serve` stopped with SIGTERM while rows still wait in the writer's queue."""
    import time

    from loadbear import Gateway, Settings
    from loadbear.testing.server import free_port

    url = f"sqlite:///{tmp_path / 'lb.db'}"
    gw = Gateway(Settings.load(env={}, config_path=None, database_url=url))
    gw.migrate()
    gw.tenants.create_tenant("acme")
    _, key = gw.tenants.create_key("acme")
    gw.close()

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADBEAR_")}
    # A flush interval far beyond the test: only a full batch or the shutdown writes rows.
    env.update(LOADBEAR_DATABASE_URL=url, LOADBEAR_PORT=str(port), LOADBEAR_LEDGER_FLUSH_INTERVAL_MS="600000",
               LOADBEAR_LOG_FORMAT="text")
    proc = subprocess.Popen([sys.executable, "-m", "loadbear.cli", "serve"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        ids = set()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}) as client:
            for i in range(12):
                r = client.post("/v1/chat/completions", json={"model": "local", "messages": MSG, "user": f"u{i % 3}"})
                assert r.status_code == 200, r.text
                ids.add(r.json()["id"])
        with sqlite3.connect(tmp_path / "lb.db") as conn:
            waiting = 12 - conn.execute("SELECT COUNT(*) FROM ai_interactions").fetchone()[0]
        assert waiting > 0, "rows were written before shutdown: this test would prove nothing"
    finally:
        proc.terminate()
        proc.wait(30)
    with sqlite3.connect(tmp_path / "lb.db") as conn:
        assert {r[0] for r in conn.execute("SELECT id FROM ai_interactions")} == ids
        assert conn.execute("SELECT SUM(requests) FROM usage_daily_models").fetchone()[0] == 12
