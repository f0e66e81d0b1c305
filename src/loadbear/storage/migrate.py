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


def migrate(db: Database, target: int | None = None, app_role: str = "loadbear_app") -> list[int]:
    """Apply pending migrations up to ``target`` (all when None); returns the versions applied."""
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
    return ran


def _grant_app_role(c, app_role: str) -> None:
    # Tables are owned by the migrating user; the application role gets data rights only.
    c.execute(f'GRANT USAGE ON SCHEMA public TO "{app_role}"')
    c.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{app_role}"')
    c.execute(f'REVOKE ALL ON schema_migrations FROM "{app_role}"')
    c.execute(f'GRANT SELECT ON schema_migrations TO "{app_role}"')


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
