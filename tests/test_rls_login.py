"""Tenant work logs in as the restricted application role, so SQL inside a tenant transaction (an
injection, a bug) has no more powerful role to switch back to; the owner's login is kept for
migrations and system work. PostgreSQL only: SQLite has no roles (its boundary is the
application's tenant filter, tested on both backends elsewhere)."""

from __future__ import annotations

import threading
import uuid
from typing import Iterator

import pytest

from loadbear.storage.db import AppRoleError, Database, app_conninfo, open_database
from loadbear.storage.migrate import AppRoleSetupError, ensure_app_role, migrate
from loadbear.tenancy.service import TenantService

APP_ROLE = "loadbear_app"


def test_default_app_login_is_the_owner_url_as_the_app_role_without_the_owners_password():
    from psycopg.conninfo import conninfo_to_dict

    got = conninfo_to_dict(app_conninfo("postgresql://owner:s3cret@db.example:6543/lb?sslmode=require", "lb_app"))
    assert got == {"user": "lb_app", "host": "db.example", "port": "6543", "dbname": "lb", "sslmode": "require"}
    # A URL without a user (libpq default) and a socket directory still get the role.
    got = conninfo_to_dict(app_conninfo("postgresql:///lb?host=/var/run/postgresql", "lb_app"))
    assert got == {"user": "lb_app", "dbname": "lb", "host": "/var/run/postgresql"}


def test_settings_take_the_app_login_from_the_environment():
    from loadbear import Settings

    s = Settings.load(env={"LOADBEAR_DATABASE_APP_URL": "postgresql://lb_app:pw@db/lb"}, config_path=None)
    assert s.database_app_url == "postgresql://lb_app:pw@db/lb"
    assert Settings.load(env={}, config_path=None).database_app_url is None


# -- PostgreSQL --------------------------------------------------------------------------------

pg = pytest.mark.postgres


@pytest.fixture(scope="module")
def url(pg_server) -> str:
    return pg_server.fresh_url()


@pytest.fixture(scope="module")
def db(url) -> Iterator[Database]:
    database = open_database(url)
    yield database
    database.close()


@pytest.fixture(scope="module")
def tenants(db) -> dict[str, str]:
    svc = TenantService(db)
    out = {name: svc.create_tenant(f"login-{name}").id for name in ("a", "b")}
    for name, tid in out.items():
        with db.tenant_tx(tid) as c:
            for i in range(3 if name == "a" else 2):
                c.execute(
                    "INSERT INTO ai_interactions (id, tenant_id, feature, model, prompt_tokens, completion_tokens,"
                    " latency_ms, requested_model, status, created_at)"
                    " VALUES (?, ?, 'f', 'm', 1, 1, 1, 'm', 'ok', now())",
                    (str(uuid.uuid4()), tid),
                )
    return out


def _owner(db: Database) -> str:
    with db.system_tx(write=False) as c:
        return c.scalar("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'ai_interactions'")


def _sees_only(c, tenant_id: str) -> None:
    rows = c.fetchall("SELECT tenant_id FROM ai_interactions")  # no tenant filter, on purpose
    assert rows and {str(r["tenant_id"]) for r in rows} == {tenant_id}


@pg
def test_tenant_work_logs_in_as_the_app_role(db, tenants):
    with db.system_tx(write=False) as c:
        role = c.fetchone("SELECT rolsuper, rolbypassrls, rolcanlogin, rolcreaterole FROM pg_roles WHERE rolname = ?",
                          (APP_ROLE,))
        assert c.scalar("SELECT current_user") == _owner(db) != APP_ROLE  # system work: the owner
    assert role == {"rolsuper": False, "rolbypassrls": False, "rolcanlogin": True, "rolcreaterole": False}
    for tx in (db.tenant_tx(tenants["a"]), db.app_tx()):
        with tx as c:
            # The session itself is the app role: not the owner wearing it for a transaction.
            assert c.fetchone("SELECT session_user, current_user") == {
                "session_user": APP_ROLE, "current_user": APP_ROLE}
            assert c.scalar("SELECT pg_has_role(session_user, ?, 'MEMBER')", (_owner(db),)) is False


@pg
@pytest.mark.parametrize("escape", [
    "RESET ROLE",
    "SET ROLE NONE",
    "RESET SESSION AUTHORIZATION",
    "SET LOCAL ROLE NONE",
    "SELECT set_config('role', 'none', false)",
])
def test_resetting_the_role_goes_nowhere(db, tenants, escape):
    with db.tenant_tx(tenants["a"]) as c:
        c.execute(escape)
        assert c.scalar("SELECT current_user") == APP_ROLE
        _sees_only(c, tenants["a"])


@pg
@pytest.mark.parametrize("escape", [
    "SET ROLE {owner}",
    "SET LOCAL ROLE {owner}",
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION {owner}",
    "SET SESSION AUTHORIZATION postgres",
    "SELECT set_config('role', '{owner}', false)",
    "SELECT set_config('session_authorization', '{owner}', true)",
])
def test_switching_to_a_more_powerful_role_is_refused(db, tenants, escape):
    import psycopg

    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        with db.tenant_tx(tenants["a"]) as c:
            c.execute(escape.format(owner=f'"{_owner(db)}"' if "set_config" not in escape else _owner(db)))
    # The connection goes back to the pool fine and the next transaction is still confined.
    with db.tenant_tx(tenants["b"]) as c:
        assert c.scalar("SELECT current_user") == APP_ROLE
        _sees_only(c, tenants["b"])


@pg
def test_another_tenants_insert_is_refused_even_after_reset_role(db, tenants):
    import psycopg

    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        with db.tenant_tx(tenants["a"]) as c:
            c.execute("RESET ROLE")
            c.execute("INSERT INTO users (id, tenant_id, external_id) VALUES (?, ?, 'intruder')",
                      (str(uuid.uuid4()), tenants["b"]))


@pg
def test_a_session_level_tenant_setting_does_not_outlive_its_transaction(url, tenants):
    # One connection, so the next transaction surely reuses the session the SQL changed.
    one = open_database(url, pool_size=1)
    try:
        with one.tenant_tx(tenants["a"]) as c:
            c.execute(f"SET loadbear.tenant_id = '{tenants['b']}'")  # session level, committed
        with one.app_tx() as c:
            assert c.fetchall("SELECT id FROM ai_interactions") == []
        with one.tenant_tx(tenants["a"]) as c:
            _sees_only(c, tenants["a"])
    finally:
        one.close()


@pg
def test_a_temporary_table_cannot_shadow_a_real_one_for_the_next_tenant(url, tenants):
    one = open_database(url, pool_size=1)
    try:
        with one.tenant_tx(tenants["a"]) as c:
            pid = c.scalar("SELECT pg_backend_pid()")
            # Temporary tables come first in the search path: left in the session, this one
            # would receive the next tenant's reads and writes.
            c.execute("CREATE TEMP TABLE ai_interactions (tenant_id uuid)")
            c.execute("INSERT INTO ai_interactions VALUES (?)", (tenants["b"],))
        with one.tenant_tx(tenants["b"]) as c:
            assert c.scalar("SELECT pg_backend_pid()") != pid  # that session was thrown away
            assert c.scalar("SELECT pg_my_temp_schema()") == 0
            _sees_only(c, tenants["b"])
            assert c.scalar("SELECT COUNT(*) FROM ai_interactions") == 2
    finally:
        one.close()


@pg
def test_an_app_login_that_could_bypass_rls_is_refused(url, pg_server):
    import psycopg

    # The owner's own URL given as the app login: tables' owner (here a superuser) skips RLS.
    owner_as_app = open_database(url, app_url=url)
    try:
        with pytest.raises(AppRoleError, match="refusing tenant work"):
            with owner_as_app.tenant_tx(str(uuid.uuid4())):
                pass
        assert owner_as_app.ping() is False  # /readyz says not ready
    finally:
        owner_as_app.close()
    # A separate login with BYPASSRLS.
    role = f"lbtest_bypass_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN BYPASSRLS")
        try:
            bypass = open_database(url, app_url=app_conninfo(url, role))
            try:
                with pytest.raises(AppRoleError, match=f"act as {role}.*BYPASSRLS"):
                    with bypass.app_tx():
                        pass
            finally:
                bypass.close()
        finally:
            admin.execute(f"DROP ROLE {role}")


@pg
def test_an_app_login_that_cannot_connect_fails_fast_and_clearly(url):
    bad = open_database(url, app_url=app_conninfo(url, f"lbtest_nosuch_{uuid.uuid4().hex[:8]}"))
    try:
        with pytest.raises(AppRoleError, match="cannot log in as the application role.*LOADBEAR_DATABASE_APP_URL"):
            with bad.tenant_tx(str(uuid.uuid4())):
                pass
        assert bad.ping() is False
        with bad.system_tx() as c:  # the owner's work is unaffected
            assert c.scalar("SELECT 1") == 1
    finally:
        bad.close()


@pg
def test_migrate_gives_the_app_role_login_and_keeps_it(pg_server):
    """Fresh database with a new role name; then an upgraded one whose role predates LOGIN."""
    import psycopg

    role = f"lbtest_app_{uuid.uuid4().hex[:8]}"
    url = pg_server.fresh_url(migrated=False)
    db = open_database(url, app_role=role)
    try:
        migrate(db)
        svc = TenantService(db)
        tid = svc.create_tenant("login-fresh").id
        svc.create_key("login-fresh", "k")  # tenant work, as the new role
        with db.tenant_tx(tid) as c:
            assert c.scalar("SELECT current_user") == role
            assert c.scalar("SELECT COUNT(*) FROM api_keys") == 1
        db.close()
        with psycopg.connect(pg_server.url, autocommit=True) as admin:
            # What versions before this one left behind: the role without LOGIN.
            admin.execute(f"ALTER ROLE {role} NOLOGIN")
        db = open_database(url, app_role=role)
        with pytest.raises(AppRoleError, match="not permitted to log in"):
            with db.tenant_tx(tid):
                pass
        assert migrate(db) == []  # nothing pending, yet the role is fixed
        with db.tenant_tx(tid) as c:
            assert c.scalar("SELECT COUNT(*) FROM api_keys") == 1
        with db.system_tx(write=False) as c:
            assert c.scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = ?", (role,)) is True
    finally:
        db.close()
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


@pg
def test_migrate_restores_a_dropped_app_roles_grants(pg_server):
    import psycopg

    role = f"lbtest_app_{uuid.uuid4().hex[:8]}"
    url = pg_server.fresh_url(migrated=False)
    db = open_database(url, app_role=role)
    try:
        migrate(db)
        tid = TenantService(db).create_tenant("login-dropped").id
        db.close()
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
        db = open_database(url, app_role=role)
        migrate(db)
        with db.tenant_tx(tid) as c:
            assert c.scalar("SELECT COUNT(*) FROM tenants") == 1
        with db.app_tx() as c:
            assert c.scalar("SELECT COUNT(*) FROM tenants") == 0
        db.close()
        # Recreated by a DBA (with a password, say) instead: it has no data rights until migrate.
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
            admin.execute(f"CREATE ROLE {role} LOGIN")
        db = open_database(url, app_role=role)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with db.tenant_tx(tid) as c:
                c.execute("SELECT COUNT(*) FROM tenants")
        migrate(db)
        with db.tenant_tx(tid) as c:
            assert c.scalar("SELECT COUNT(*) FROM tenants") == 1
    finally:
        db.close()
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


@pg
def test_a_migrating_user_without_createrole_gets_told_what_to_run(url, pg_server):
    import psycopg

    owner, app = (f"lbtest_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("owner", "app"))
    with psycopg.connect(pg_server.url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {owner} LOGIN NOCREATEROLE")
        admin.execute(f"CREATE ROLE {app} NOLOGIN")
        try:
            weak = open_database(url.replace("//postgres@", f"//{owner}@", 1), app_role=app)
            try:
                with pytest.raises(AppRoleSetupError, match=f"ALTER ROLE \"{app}\" LOGIN NOSUPERUSER NOBYPASSRLS"):
                    ensure_app_role(weak, app)
            finally:
                weak.close()
        finally:
            admin.execute(f"DROP ROLE {app}")
            admin.execute(f"DROP ROLE {owner}")


@pg
def test_connections_stay_within_the_pool_sizes(pg_server):
    import psycopg

    url = pg_server.fresh_url()  # its own database: no other pool connects to it
    small = open_database(url, pool_size=3)
    tenant = TenantService(small).create_tenant("login-pool").id
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                with small.tenant_tx(tenant) as c:
                    c.execute("SELECT pg_sleep(0.001)")
                with small.system_tx() as c:
                    c.execute("SELECT 1")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        with psycopg.connect(url, autocommit=True) as admin:
            counts = dict(admin.execute(
                "SELECT usename, COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() GROUP BY usename").fetchall())
        # The app pool has pool_size connections at most; the owner's pool half of that, at least 2.
        assert 1 <= counts.pop(APP_ROLE) <= 3
        assert len(counts) == 1 and 1 <= counts.popitem()[1] <= 2
    finally:
        small.close()



@pg
def test_connections_the_server_dropped_are_replaced_before_any_work(pg_server):
    import psycopg

    url = pg_server.fresh_url()
    db = open_database(url, pool_size=2)
    try:
        tenant = TenantService(db).create_tenant("login-dropped-conns").id
        with db.tenant_tx(tenant) as c:
            c.execute("SELECT 1")
        with psycopg.connect(url, autocommit=True) as admin:  # a server restart, as seen by the pools
            killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                   " WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
        assert killed >= 2  # both pools held a connection
        with db.system_tx(write=False) as c:
            assert c.scalar("SELECT COUNT(*) FROM tenants") == 1
        with db.tenant_tx(tenant) as c:
            assert c.scalar("SELECT current_user") == APP_ROLE
        # A connection that dies in the middle of the caller's work is the caller's error (it may
        # have written something): never silently run twice.
        with pytest.raises(psycopg.OperationalError):
            with db.tenant_tx(tenant) as c:
                c.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    finally:
        db.close()
