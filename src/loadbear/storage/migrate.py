"""Schema migrations: numbered SQL files per backend, applied in order, each in a transaction.

``schema_migrations`` records what ran. A database is "current" when every file shipped with
this version has been applied; ``/readyz`` checks exactly that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from loadbear.storage.db import Database

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available(dialect: str) -> list[Migration]:
    folder = resources.files("loadbear.storage") / "migrations" / dialect
    found = []
    for entry in folder.iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions for {dialect}: {versions}")
    return found


def _ensure_table(db: Database) -> None:
    with db.system_tx() as c:
        c.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )


def applied(db: Database) -> list[int]:
    _ensure_table(db)
    with db.system_tx(write=False) as c:
        return [r["version"] for r in c.fetchall("SELECT version FROM schema_migrations ORDER BY version")]


def pending(db: Database) -> list[Migration]:
    done = set(applied(db))
    return [m for m in available(db.dialect) if m.version not in done]


def is_current(db: Database) -> bool:
    try:
        return not pending(db)
    except Exception:
        return False


def migrate(db: Database, target: int | None = None, app_role: str | None = None) -> list[int]:
    """Apply pending migrations up to ``target`` (all when None); returns the versions applied.

    On PostgreSQL it also makes sure the application role can log in (``ensure_app_role``), every
    time: the role is cluster-wide, so it may have been created by an older version (NOLOGIN)
    or by another database's migrations.
    """
    app_role = app_role or getattr(db, "app_role", "loadbear_app")
    ran: list[int] = []
    for mig in pending(db):
        if target is not None and mig.version > target:
            break
        sql = mig.sql.replace("__APP_ROLE__", app_role)
        with db.system_tx() as c:
            if db.dialect == "sqlite":
                # executescript would commit our transaction; run statement by statement instead.
                for stmt in _split_sqlite(sql):
                    c.execute(stmt)
            else:
                c.execute(sql)
                _grant_app_role(c, app_role)
            c.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", (mig.version, mig.name))
        ran.append(mig.version)
    if db.dialect == "postgres":
        ensure_app_role(db, app_role)
    return ran


class AppRoleSetupError(RuntimeError):
    """The migrating user may not create or change the application role."""


def ensure_app_role(db: Database, app_role: str) -> None:
    """The application role exists and can log in, with no way around row-level security.

    Idempotent and quiet when nothing is to change (no ALTER, so no CREATEROLE needed then). The
    role gets no password here: with password authentication a DBA sets one and gives the login
    in ``LOADBEAR_DATABASE_APP_URL``.
    """
    import psycopg

    q = _quote_ident(app_role)
    with db.system_tx() as c:
        row = c.fetchone(
            "SELECT rolcanlogin, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb,"
            # No tenants table yet: nothing to grant.
            " COALESCE(has_table_privilege(oid, to_regclass('public.tenants'), 'SELECT'), TRUE) AS granted"
            " FROM pg_roles WHERE rolname = ?",
            (app_role,),
        )
    safe = row is not None and row["rolcanlogin"] and not any(
        row[k] for k in ("rolsuper", "rolbypassrls", "rolcreaterole", "rolcreatedb"))
    if safe and row["granted"]:
        return
    attrs = "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB"
    fix = f"CREATE ROLE {q} {attrs}" if row is None else f"ALTER ROLE {q} {attrs}"
    try:
        with db.system_tx() as c:
            if not safe:  # missing (dropped, or renamed in settings), or with too much power
                c.execute(fix)
            # A recreated role (by us or by a DBA) has none of the data rights the migrations gave.
            if row is None or not row["granted"]:
                _grant_app_role(c, app_role)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise AppRoleSetupError(
            f"the application role {app_role!r} must be able to log in, without bypassing row-level security,"
            f" and this user may not set it up ({str(exc).strip()}). As a superuser or a role with CREATEROLE,"
            f" run: {fix}; then `loadbear migrate` again as the owner of the tables."
        ) from exc
    except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
        pass  # another process created it at the same moment: its migrate did the same work
    except psycopg.errors.InternalError_ as exc:
        # "tuple concurrently updated": another migrate altered the role at the same moment.
        if "concurrently" not in str(exc):
            raise


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _grant_app_role(c, app_role: str) -> None:
    # Tables are owned by the migrating user; the application role gets data rights only.
    q = _quote_ident(app_role)
    c.execute(f"GRANT USAGE ON SCHEMA public TO {q}")
    c.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {q}")
    c.execute(f"REVOKE ALL ON schema_migrations FROM {q}")
    c.execute(f"GRANT SELECT ON schema_migrations TO {q}")


def _split_sqlite(sql: str) -> list[str]:
    import sqlean

    statements, buf = [], ""
    for line in sql.splitlines(keepends=True):
        if not buf and line.strip().startswith("--"):
            continue
        buf += line
        if sqlean.complete_statement(buf):
            if buf.strip():
                statements.append(buf.strip())
            buf = ""
    if buf.strip():
        raise RuntimeError(f"incomplete SQL statement in migration: {buf[:80]!r}")
    return statements
