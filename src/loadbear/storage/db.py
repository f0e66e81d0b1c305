"""The two storage backends behind one small interface.

SQL is written once with ``?`` placeholders; the PostgreSQL backend rewrites them to ``%s``.
Two kinds of transaction exist, and the difference is the security boundary:

* ``tenant_tx(tenant_id)`` — tenant work. On PostgreSQL it runs as the application role (no
  BYPASSRLS) with ``loadbear.tenant_id`` set for the transaction, so row-level security holds
  even when application SQL forgets a tenant filter. SQLite has no RLS; there the application
  filter is the boundary, and the isolation tests run on both backends.
* ``system_tx()`` — cross-tenant work that precedes knowing a tenant (key lookup) or is
  explicitly administrative (tenant creation, admin reports, migrations).
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import sqlean as sqlite3
import sqlite_vec

Row = dict[str, Any]

_QMARK = re.compile(r"\?")


class Conn:
    """A connection inside one transaction, with the same calls on both backends."""

    def __init__(self, raw: Any, dialect: str) -> None:
        self.raw = raw
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return _QMARK.sub("%s", sql) if self.dialect == "postgres" else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if not params:
            # No placeholders to bind: send the text as is (migrations contain literal % and ?).
            return self.raw.execute(sql)
        return self.raw.execute(self._sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        if self.dialect == "postgres":
            with self.raw.cursor() as cur:
                cur.executemany(self._sql(sql), rows)
        else:
            self.raw.executemany(sql, rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cur = self.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        cur = self.execute(sql, params)
        r = cur.fetchone()
        if r is None:
            return None
        return dict(zip([d[0] for d in cur.description], r))

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        r = self.execute(sql, params).fetchone()
        return None if r is None else r[0]

    def set_tenant(self, tenant_id: str) -> None:
        """Switch the RLS tenant inside the current transaction (PostgreSQL only)."""
        if self.dialect == "postgres":
            self.raw.execute("SELECT set_config('loadbear.tenant_id', %s, true)", (str(tenant_id),))


class Database:
    dialect: str

    def tenant_tx(self, tenant_id: str) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def system_tx(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def app_tx(self) -> Any:  # pragma: no cover - interface
        """Application role without a tenant set: sees no tenant rows at all on PostgreSQL."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def ping(self) -> bool:
        try:
            with self.system_tx() as c:
                return c.scalar("SELECT 1") == 1
        except Exception:
            return False


class SQLiteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        # A single writer at a time: SQLite serialises writers anyway, and taking the lock in
        # Python avoids busy-timeout spins between our own threads.
        self.write_lock = threading.RLock()

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA cache_size=-65536")
            # sqlite-vec backs the knowledge base's vectors (vec0 tables); every connection
            # needs it because any of them may touch those tables.
            conn.enable_load_extension(True)
            sqlite_vec.load(conn)
            conn.enable_load_extension(False)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _tx(self, write: bool) -> Iterator[Conn]:
        conn = self._conn()
        if write:
            self.write_lock.acquire()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Conn(conn, "sqlite")
                conn.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (disk full, I/O error): a transaction left open
                # would make every later BEGIN on this thread's connection fail.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            if write:
                self.write_lock.release()

    def tenant_tx(self, tenant_id: str, write: bool = True) -> Any:
        return self._tx(write)

    def system_tx(self, write: bool = True) -> Any:
        return self._tx(write)

    def app_tx(self, write: bool = True) -> Any:
        return self._tx(write)

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                try:
                    c.close()
                except Exception:
                    pass
            self._all.clear()
        self._local = threading.local()


class PostgresDatabase(Database):
    dialect = "postgres"

    def __init__(self, url: str, app_role: str = "loadbear_app", pool_size: int = 10) -> None:
        from psycopg_pool import ConnectionPool

        self.url = url
        self.app_role = app_role
        self.pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, open=True, kwargs={"autocommit": False},
            name="loadbear",
        )

    @contextmanager
    def _tx(self, role: str | None, tenant_id: str | None) -> Iterator[Conn]:
        with self.pool.connection() as conn:
            with conn.transaction():
                if role is not None:
                    # One round trip: both settings are local to this transaction.
                    conn.execute(
                        "SELECT set_config('role', %s, true), set_config('loadbear.tenant_id', %s, true)",
                        (role, "" if tenant_id is None else str(tenant_id)),
                    )
                yield Conn(conn, "postgres")

    def tenant_tx(self, tenant_id: str, write: bool = True) -> Any:
        return self._tx(self.app_role, str(tenant_id))

    def app_tx(self, write: bool = True) -> Any:
        return self._tx(self.app_role, None)

    def system_tx(self, write: bool = True) -> Any:
        return self._tx(None, None)

    def close(self) -> None:
        self.pool.close()


def sqlite_path(url: str) -> str:
    # sqlite:///relative.db, sqlite:////abs/path.db, sqlite:///:memory: is not supported
    # because every thread would get its own empty database.
    if not url.startswith("sqlite:///"):
        raise ValueError(f"unsupported SQLite URL {url!r}: use sqlite:///path/to/file.db")
    path = url[len("sqlite:///"):]
    if not path or path == ":memory:":
        raise ValueError("an in-memory SQLite database cannot be shared between threads; use a file")
    return path


def open_database(url: str, app_role: str = "loadbear_app", pool_size: int = 10) -> Database:
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        return SQLiteDatabase(sqlite_path(url))
    if scheme in ("postgres", "postgresql"):
        return PostgresDatabase(url, app_role=app_role, pool_size=pool_size)
    raise ValueError(f"unsupported database URL scheme {scheme!r}: use sqlite:/// or postgresql://")
