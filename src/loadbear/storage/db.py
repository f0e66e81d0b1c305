"""The two storage backends behind one small interface.

SQL is written once with ``?`` placeholders; the PostgreSQL backend rewrites them to ``%s``.
Two kinds of transaction exist, and the difference is the security boundary:

* ``tenant_tx(tenant_id)`` — tenant work. On PostgreSQL it runs on a connection that logged in
  as the application role (no BYPASSRLS, owns nothing) with ``loadbear.tenant_id`` set for the
  transaction, so row-level security holds even when application SQL forgets a tenant filter,
  and no SQL inside can switch to a more powerful role. SQLite has no RLS; there the
  application filter is the boundary, and the isolation tests run on both backends.
* ``app_tx()`` — the application role with no tenant set (sees no tenant rows); the ledger
  writer sets the tenant itself per group of rows.
* ``system_tx()`` — the owner's login: cross-tenant work that precedes knowing a tenant (key
  lookup) or is explicitly administrative (tenant creation, admin reports, migrations).
"""

from __future__ import annotations

import re
import threading
from contextlib import ExitStack, contextmanager
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

    def tenant_fetch(self, tenant_id: str, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """One read-only statement of tenant work, in a transaction of its own: the rows
        (PostgreSQL refuses a write in it; on SQLite, as everywhere there, the caller's filter is
        the boundary).

        The same isolation as ``tenant_tx`` (on PostgreSQL: the app role, the tenant set in that
        transaction, RLS), for hot-path reads that need nothing else in the transaction; the
        backends override it to save round trips."""
        with self.tenant_tx(tenant_id, write=False) as c:
            return c.fetchall(sql, params)

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

    def tenant_fetch(self, tenant_id: str, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        # A lone statement in autocommit mode is its own read transaction (one snapshot):
        # BEGIN and COMMIT around it would only add two statements.
        return Conn(self._conn(), "sqlite").fetchall(sql, params)

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


class AppRoleError(RuntimeError):
    """The application login cannot be used for tenant work (cannot connect, or is not restricted)."""


def app_conninfo(url: str, app_role: str) -> str:
    """The owner's connection parameters with the user replaced by the application role.

    The owner's password is dropped: it is not the app role's. This default suits trust or
    peer/cert authentication (CI, a local socket); with passwords, give the app role's own
    login in ``LOADBEAR_DATABASE_APP_URL``.
    """
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    params.pop("password", None)
    params["user"] = app_role
    return make_conninfo(**params)


def _describe(conninfo: str) -> str:
    """user@host/db of a connection string, for messages (never the password)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        p = conninfo_to_dict(conninfo)
    except Exception:
        return "(unparseable connection string)"
    return f"{p.get('user', '(default user)')}@{p.get('host', '(default host)')}/{p.get('dbname', '')}"


# Run once when the app pool opens: the login must not be able to get past row-level security,
# by itself or through any role it may SET ROLE to (superuser, BYPASSRLS, or owning a table with
# RLS: owners are exempt from their tables' policies).
_APP_ROLE_CHECK = """
SELECT current_user AS login,
  (SELECT string_agg(r.rolname, ', ' ORDER BY r.rolname) FROM pg_roles r
    WHERE (r.rolsuper OR r.rolbypassrls) AND pg_has_role(current_user, r.oid, 'MEMBER')) AS bypassing,
  (SELECT string_agg(DISTINCT pg_get_userbyid(c.relowner), ', ') FROM pg_class c
    WHERE c.relrowsecurity AND pg_has_role(current_user, c.relowner, 'MEMBER')) AS owning
"""


# The tenant, local to the transaction ("" sees no rows); and, in the same round trip, whether
# this session ever created a temporary object. Temporary tables come first in the search path,
# so one left behind by an earlier transaction (of any tenant) could shadow a real table and
# capture the next tenant's rows; loadbear never creates any, so such a connection is dropped.
_SET_TENANT = "SELECT pg_my_temp_schema() <> 0 FROM set_config('loadbear.tenant_id', %s, true)"


# ``_SET_TENANT`` for a pipelined read (``tenant_fetch``): the client sees the temporary-object
# flag only after the whole pipeline ran, so here the server itself must stop before the read is
# parsed (a temporary table would be resolved then). The cast of a text that is not a number
# fails, aborting the pipeline; it is not constant (pg_my_temp_schema() is stable), so the planner
# cannot fold it and fail on a clean connection. The transaction is also made read-only: the
# shortcut is for reads, and the server holds it to that.
_SET_TENANT_OR_FAIL = ("SELECT CASE WHEN pg_my_temp_schema() <> 0 THEN"
                       " ('loadbear: temporary objects in this session, schema ' || pg_my_temp_schema())::int END"
                       " FROM set_config('loadbear.tenant_id', %s, true) t,"
                       " set_config('transaction_read_only', 'on', true) r")


class PostgresDatabase(Database):
    """Two pools, two logins.

    * The system pool logs in as the URL's user (the schema owner): migrations, key lookup,
      tenant creation, admin reports.
    * The app pool logs in as the restricted application role (LOGIN, NOSUPERUSER,
      NOBYPASSRLS, owns nothing, member of nothing that does): all tenant work. Its session
      user IS that role, so ``RESET ROLE``, ``SET ROLE <owner>`` or ``SET SESSION
      AUTHORIZATION`` inside a tenant transaction (an injection, a bug) have nothing to go back
      to. Switching role per transaction on an owner connection could always be undone.

    The app pool opens on first use: before ``migrate`` the role may not exist or log in yet.
    """

    dialect = "postgres"

    def __init__(self, url: str, app_role: str = "loadbear_app", pool_size: int = 10,
                 app_url: str | None = None) -> None:
        from psycopg_pool import ConnectionPool

        self.url = url
        self.app_role = app_role
        self.app_url = app_url or app_conninfo(url, app_role)
        self.pool_size = max(1, pool_size)
        # Request traffic runs on the app pool; the owner's pool serves key lookups (cached per
        # replica), admin work and migrations, so it gets a smaller share of the connections.
        self.pool = ConnectionPool(
            url, min_size=1, max_size=max(2, self.pool_size // 2), open=True, kwargs={"autocommit": False},
            name="loadbear-system",
        )
        self._app_pool: Any = None
        self._app_lock = threading.Lock()

    @property
    def app_pool(self) -> Any:
        pool = self._app_pool
        if pool is None:
            with self._app_lock:
                if self._app_pool is None:
                    self._app_pool = self._open_app_pool()
                pool = self._app_pool
        return pool

    def _open_app_pool(self) -> Any:
        import psycopg
        from psycopg_pool import ConnectionPool

        where = _describe(self.app_url)
        # One direct connection first: a wrong password or a role without LOGIN fails here with
        # the server's own message, instead of as a pool timeout half a minute later.
        try:
            probe = psycopg.connect(self.app_url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise AppRoleError(
                f"cannot log in as the application role ({where}): {str(exc).strip()}. Run `loadbear migrate`"
                " (it gives the role LOGIN), and with password authentication set LOADBEAR_DATABASE_APP_URL"
                " to the role's own login."
            ) from exc
        try:
            row = probe.execute(_APP_ROLE_CHECK).fetchone()
        finally:
            probe.close()
        login, bypassing, owning = row
        if bypassing or owning:
            why = (f"it can act as {bypassing} (superuser or BYPASSRLS)" if bypassing
                   else f"it can act as {owning}, which owns the tenant tables")
            raise AppRoleError(
                f"refusing tenant work as {login!r} ({where}): {why}, so row-level security would not apply."
                " LOADBEAR_DATABASE_APP_URL must log in as the restricted application role."
            )
        return ConnectionPool(
            self.app_url, min_size=1, max_size=self.pool_size, open=True, kwargs={"autocommit": False},
            name="loadbear-app",
        )

    @contextmanager
    def _tx(self, app: bool, tenant_id: str) -> Iterator[Conn]:
        import psycopg

        tries = 0
        while True:
            pool = self.app_pool if app else self.pool
            with ExitStack() as stack:
                conn = stack.enter_context(pool.connection())
                try:
                    stack.enter_context(conn.transaction())
                    dirty = app and conn.execute(_SET_TENANT, (tenant_id,)).fetchone()[0]
                except psycopg.OperationalError:
                    # A pooled connection the server dropped (restart, failover, terminated
                    # backend) fails here, before the caller ran anything: take another one.
                    # Leaving the block hands the broken one back, and the pool discards it.
                    tries += 1
                    if not conn.broken or tries > pool.max_size:
                        raise
                    continue
                if not dirty:
                    yield Conn(conn, "postgres")
                    return
                conn.close()  # the pool drops a closed connection instead of reusing it
                tries += 1
                if tries > pool.max_size:
                    raise AppRoleError("no clean application connection available")

    def tenant_tx(self, tenant_id: str, write: bool = True) -> Any:
        return self._tx(True, str(tenant_id))

    def tenant_fetch(self, tenant_id: str, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """One round trip instead of four: the tenant setting and the read are pipelined and sent
        with one Sync, on an app-role connection in autocommit mode, and no BEGIN or COMMIT.

        Why the tenant still holds: in the extended protocol every statement up to a Sync runs in
        ONE implicit transaction (PostgreSQL's protocol docs, "Pipelining"; the server commits
        only at the Sync), so ``set_config(..., is_local => true)`` covers the read that follows
        it on the same connection and ends with that transaction; the server runs the pipeline in
        order and, after an error, skips everything up to the Sync, so the read never runs
        without the tenant or on a session with temporary objects (``_SET_TENANT_OR_FAIL``
        fails first). Only for one read (the transaction is read-only): a write or a second
        statement needs ``tenant_tx``."""
        import psycopg

        query = _QMARK.sub("%s", sql)
        args = tuple(params)
        tenant_id = str(tenant_id)
        tries = 0
        pool = self.app_pool
        while True:
            with pool.connection() as conn:
                try:
                    conn.autocommit = True  # client-side only: the connection is idle here
                    try:
                        with conn.pipeline():
                            conn.execute(_SET_TENANT_OR_FAIL, (tenant_id,))
                            cur = conn.execute(query, args) if args else conn.execute(sql)
                    finally:
                        try:
                            conn.autocommit = False
                        except psycopg.Error:  # broken, or not idle: never back into the pool
                            conn.close()
                    cols = [d[0] for d in cur.description]
                    return [dict(zip(cols, r)) for r in cur.fetchall()]
                except psycopg.errors.InvalidTextRepresentation as exc:
                    if "loadbear: temporary objects" not in str(exc):
                        raise
                    conn.close()  # the pool drops a closed connection instead of reusing it
                    tries += 1
                    if tries > pool.max_size:
                        raise AppRoleError("no clean application connection available") from exc
                except psycopg.OperationalError:
                    # A pooled connection the server dropped: as in ``_tx``, take another one (a
                    # read-only statement may safely run again). ``closed``: closed just above.
                    tries += 1
                    if not (conn.broken or conn.closed) or tries > pool.max_size:
                        raise

    def app_tx(self, write: bool = True) -> Any:
        return self._tx(True, "")

    def system_tx(self, write: bool = True) -> Any:
        return self._tx(False, "")

    def ping(self) -> bool:
        # Ready means both logins work: the owner's and the application role's.
        if not super().ping():
            return False
        try:
            with self.app_tx() as c:
                return c.scalar("SELECT 1") == 1
        except Exception:
            return False

    def close(self) -> None:
        with self._app_lock:
            if self._app_pool is not None:
                self._app_pool.close()
                self._app_pool = None
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


def open_database(url: str, app_role: str = "loadbear_app", pool_size: int = 10,
                  app_url: str | None = None) -> Database:
    """``app_url``: the PostgreSQL login for tenant work (default: ``url`` as ``app_role``)."""
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        return SQLiteDatabase(sqlite_path(url))
    if scheme in ("postgres", "postgresql"):
        return PostgresDatabase(url, app_role=app_role, pool_size=pool_size, app_url=app_url)
    raise ValueError(f"unsupported database URL scheme {scheme!r}: use sqlite:/// or postgresql://")
