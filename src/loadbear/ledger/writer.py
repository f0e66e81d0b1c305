"""The ledger writer: batches rows off the request path and never drops one.

Requests hand a finished :class:`InteractionRecord` to :meth:`LedgerWriter.submit` and move on.
A single thread drains the queue in batches; each batch is one transaction that inserts the
raw rows, their attempts, and updates the daily rollups, so reports never disagree with rows.

Loss is not an option, so the queue is bounded and a full queue blocks the submitter
(backpressure). A failing database is retried with backoff for as long as it takes; a row the
database refuses on its own (a data error, not an outage) is isolated by splitting the batch
and goes to a dead-letter file with the error, never silently away; the rest of the batch is
written. Interaction ids make writes idempotent: a row whose id is already stored (a retry
after a commit whose acknowledgement was lost) counts as written, not twice.

How a batch reaches each backend (the hot path; see docs/benchmarks.md for the numbers):

* SQLite: plain prepared INSERTs through ``executemany`` for rows, attempts and the rollup
  upserts that the writer sums in Python.
* PostgreSQL: per tenant (row-level security: the writer runs as the application role with the
  tenant set, like any tenant work), the records travel as one JSON document serialised by
  orjson straight from the dataclasses, and ONE statement expands it server-side into the
  interaction rows, their attempt rows and the rollup upserts (grouped and sorted, so
  concurrent writers lock rollup rows in the same order). All statements of a batch go out
  in one pipeline, i.e. one network round trip.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson
import sqlean

from loadbear.ledger.records import InteractionRecord
from loadbear.storage.db import Conn, Database
from loadbear.storage.values import utcnow
from loadbear.tenancy.service import touch_keys, user_uuid

log = logging.getLogger("loadbear.ledger")

# sqlean (like the stdlib sqlite3 before 3.12) binds None and bool through a failed adapter
# lookup that costs ~2 µs per value, and a ledger row carries ~15 NULLs. Registering identity
# adapters makes binding them ~10x cheaper and stores exactly the same values (NULL, 0/1).
sqlean.register_adapter(type(None), lambda v: v)
sqlean.register_adapter(bool, int)

_INTERACTION_COLS = (
    "id", "tenant_id", "user_id", "feature", "model", "prompt_tokens", "completion_tokens",
    "latency_ms", "cached", "error", "created_at", "request_id", "provider", "requested_model",
    "route", "route_reason", "status", "streamed", "ttft_ms", "finish_reason", "cached_input_tokens",
    "tokens_estimated", "cost_micro_usd", "saved_micro_usd", "cache_kind", "cache_similarity",
    "cache_entry_id", "attempt_count", "error_type", "http_status", "retrieved_chunk_ids",
    "prompt_text", "response_text", "metadata",
)
_ATTEMPT_COLS = (
    "id", "interaction_id", "tenant_id", "attempt_no", "provider", "model", "upstream_model",
    "status", "error_type", "error", "http_status", "prompt_tokens", "completion_tokens",
    "cached_input_tokens", "tokens_estimated", "cost_micro_usd", "latency_ms", "ttft_ms", "started_at",
)
_ROLLUP_KEY = ("tenant_id", "day", "feature", "model", "user_external_id")
_ROLLUP_SUMS = (
    "requests", "errors", "degraded", "cancelled", "cached_requests", "streamed_requests",
    "prompt_tokens", "completion_tokens", "cached_input_tokens", "cost_micro_usd",
    "saved_micro_usd", "latency_ms_sum",
)
_ROLLUP_UPDATE = (
    f"ON CONFLICT ({', '.join(_ROLLUP_KEY)}) DO UPDATE SET "
    + ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in _ROLLUP_SUMS)
)


def _insert_sql(table: str, cols: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"


_SQLITE_INTERACTIONS = _insert_sql("ai_interactions", _INTERACTION_COLS)
_SQLITE_ATTEMPTS = _insert_sql("ai_attempts", _ATTEMPT_COLS)
_SQLITE_ROLLUPS = _insert_sql("usage_daily", _ROLLUP_KEY + _ROLLUP_SUMS) + " " + _ROLLUP_UPDATE
_SQLITE_USERS = "INSERT INTO users (id, tenant_id, external_id) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"

# PostgreSQL: one statement per tenant and batch. %(rows)s is a JSON array of serialised
# InteractionRecords (their attempts nested); %(users)s maps end-user external ids to user ids.
# json_to_recordset picks the fields by name and casts them to the column types, so a bad value
# is a data error of this statement (and the batch is split to find the row).
_PG_RECORD_FIELDS = (
    "id uuid, tenant_id uuid, feature varchar(100), model varchar(100), prompt_tokens int,"
    " completion_tokens int, latency_ms int, cached bool, error text, created_at timestamptz,"
    " request_id text, provider varchar(50), requested_model varchar(100), route varchar(50),"
    " route_reason text, status varchar(16), streamed bool, ttft_ms int, finish_reason varchar(32),"
    " cached_input_tokens int, tokens_estimated bool, cost_micro_usd bigint, saved_micro_usd bigint,"
    " cache_kind varchar(16), cache_similarity real, cache_entry_id uuid, error_type varchar(50),"
    " http_status int, retrieved_chunk_ids jsonb, prompt_text text, response_text text, metadata jsonb,"
    " user_external_id text, attempts json"
)
_PG_ATTEMPT_FIELDS = (
    "id uuid, attempt_no int, provider varchar(50), model varchar(100), upstream_model varchar(200),"
    " status varchar(16), error_type varchar(50), error text, http_status int, prompt_tokens int,"
    " completion_tokens int, cached_input_tokens int, tokens_estimated bool, cost_micro_usd bigint,"
    " latency_ms int, ttft_ms int, started_at timestamptz"
)
_PG_UTC_DAY = "(r.created_at AT TIME ZONE 'UTC')::date"  # the same expression as the tenant-day index
_PG_BATCH_SQL = (
    f"WITH r AS MATERIALIZED (SELECT * FROM json_to_recordset(%(rows)s::json) AS x({_PG_RECORD_FIELDS})),"
    f" i AS (INSERT INTO ai_interactions ({', '.join(_INTERACTION_COLS)})"
    "  SELECT r.id, r.tenant_id, (%(users)s::jsonb ->> r.user_external_id)::uuid, r.feature, r.model,"
    "   r.prompt_tokens, r.completion_tokens, r.latency_ms, r.cached, r.error, r.created_at, r.request_id,"
    "   r.provider, r.requested_model, r.route, r.route_reason, r.status, r.streamed, r.ttft_ms,"
    "   r.finish_reason, r.cached_input_tokens, r.tokens_estimated, r.cost_micro_usd, r.saved_micro_usd,"
    "   r.cache_kind, r.cache_similarity, r.cache_entry_id, COALESCE(json_array_length(r.attempts), 0),"
    "   r.error_type, r.http_status, r.retrieved_chunk_ids, r.prompt_text, r.response_text,"
    "   COALESCE(r.metadata, '{}')"
    "  FROM r),"
    f" a AS (INSERT INTO ai_attempts ({', '.join(_ATTEMPT_COLS)})"
    "  SELECT a.id, r.id, r.tenant_id, a.attempt_no, a.provider, a.model, a.upstream_model, a.status,"
    "   a.error_type, a.error, a.http_status, a.prompt_tokens, a.completion_tokens, a.cached_input_tokens,"
    "   a.tokens_estimated, a.cost_micro_usd, a.latency_ms, a.ttft_ms, a.started_at"
    f"  FROM r CROSS JOIN LATERAL json_to_recordset(r.attempts) AS a({_PG_ATTEMPT_FIELDS}))"
    f" INSERT INTO usage_daily ({', '.join(_ROLLUP_KEY + _ROLLUP_SUMS)})"
    f" SELECT r.tenant_id, {_PG_UTC_DAY}, r.feature, r.model, COALESCE(r.user_external_id, ''),"
    "  count(*), count(*) FILTER (WHERE r.status = 'error'), count(*) FILTER (WHERE r.status = 'degraded'),"
    "  count(*) FILTER (WHERE r.status = 'cancelled'), count(*) FILTER (WHERE r.cached),"
    "  count(*) FILTER (WHERE r.streamed), sum(r.prompt_tokens), sum(r.completion_tokens),"
    "  sum(r.cached_input_tokens), sum(r.cost_micro_usd), sum(r.saved_micro_usd), sum(r.latency_ms)"
    " FROM r GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5 "
    + _ROLLUP_UPDATE
)
_PG_USERS_SQL = (
    "INSERT INTO users (id, tenant_id, external_id)"
    " SELECT value::uuid, %s, key FROM json_each_text(%s::json) ON CONFLICT DO NOTHING"
)
_JSON_OPTS = orjson.OPT_NAIVE_UTC  # naive datetimes in a record are UTC, on both backends

# Remembered end users (their rows exist); bounded so that a long-running writer stays small.
_KNOWN_USERS_MAX = 200_000


class _RowError(Exception):
    """A record that cannot even be turned into a row (e.g. metadata orjson cannot encode)."""


class _Buffer:
    """A bounded FIFO that the writer drains a whole batch at a time.

    ``queue.Queue`` hands out one item per lock round trip and wakes the consumer on every put;
    here producers wake the writer only when it is idle or a full batch is waiting.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(1, maxsize)
        self._items: deque[Any] = deque()
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)
        self._not_full = threading.Condition(lock)
        self._wake_at = 1  # queue length at which a put wakes the writer
        self._urgent = False  # flush()/close(): stop lingering

    def put(self, item: Any, block: bool = True) -> bool:
        with self._not_full:
            while len(self._items) >= self.maxsize:
                if not block:
                    return False
                self._not_full.wait()
            self._items.append(item)
            if len(self._items) >= self._wake_at:
                self._not_empty.notify()
        return True

    def hurry(self) -> None:
        with self._not_empty:
            self._urgent = True
            self._not_empty.notify()

    def take(self, n: int, idle: float, linger: float) -> list[Any]:
        """Up to ``n`` items: waits up to ``idle`` for the first, then up to ``linger`` for a full batch."""
        with self._not_empty:
            if not self._items and not self._urgent:
                self._wake_at = 1
                self._not_empty.wait(idle)
            if self._items and len(self._items) < n and linger > 0 and not self._urgent:
                deadline = time.monotonic() + linger
                self._wake_at = n
                while len(self._items) < n and not self._urgent:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._not_empty.wait(remaining)
            self._wake_at = 1
            self._urgent = False
            items = self._items
            k = min(n, len(items))
            out = [items.popleft() for _ in range(k)]
            if out:
                self._not_full.notify(k)
            return out


class LedgerWriter:
    def __init__(
        self,
        db: Database,
        batch_size: int = 1000,
        flush_interval: float = 0.05,
        queue_max: int = 50_000,
        dead_letter_path: str | Path = "loadbear-ledger-deadletter.jsonl",
        on_written: Callable[[list[InteractionRecord]], None] | None = None,
    ) -> None:
        self.db = db
        self.batch_size = max(1, batch_size)
        self.flush_interval = flush_interval
        self.dead_letter_path = Path(dead_letter_path)
        self.on_written = on_written
        self._buf = _Buffer(queue_max)
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self.written = 0
        self.dead_lettered = 0
        self.retries = 0
        self._touches: dict[str, tuple[str, Any]] = {}
        self._touch_lock = threading.Lock()
        self._known_users: set[str] = set()
        self._closed = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="loadbear-ledger", daemon=True)
        self._thread.start()

    # -- submitting ---------------------------------------------------------------------

    def submit(self, record: InteractionRecord) -> None:
        """Queue a row; blocks while the queue is full."""
        self._count_submit()
        self._buf.put(record)

    async def asubmit(self, record: InteractionRecord) -> None:
        """Queue a row from async code without blocking the event loop when the queue is full."""
        self._count_submit()
        if not self._buf.put(record, block=False):
            await asyncio.to_thread(self._buf.put, record)

    def _count_submit(self) -> None:
        # Counted before the put, under the lock that close() takes: a row that got past this
        # check is part of close()'s final flush.
        with self._cond:
            if self._closed:
                raise RuntimeError("ledger writer is closed")
            self._submitted += 1

    def touch_key(self, key_id: str, tenant_id: str) -> None:
        with self._touch_lock:
            self._touches[key_id] = (tenant_id, utcnow())

    @property
    def pending(self) -> int:
        with self._cond:
            return self._submitted - self._done

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row submitted so far is written (or dead-lettered)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._submitted
        while True:
            self._buf.hurry()  # no lingering for more rows while someone waits
            with self._cond:
                if self._done >= target:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(0.1 if remaining is None else min(remaining, 0.1))

    def close(self, timeout: float | None = None) -> None:
        """Refuse new rows, write everything queued (and pending key touches), stop the thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self.flush(timeout)
        self._stopping = True
        self._buf.hurry()
        self._thread.join(timeout)

    # -- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        idle = max(self.flush_interval, 0.01)
        while True:
            batch = self._buf.take(self.batch_size, idle, self.flush_interval)
            if batch:
                self._write_with_retry(batch)
            elif self._stopping:
                self._write_touches_only()
                return
            else:
                self._write_touches_only()

    def _take_touches(self) -> dict[str, tuple[str, Any]]:
        with self._touch_lock:
            touches, self._touches = self._touches, {}
        return touches

    def _write_touches_only(self, touches: dict[str, tuple[str, Any]] | None = None) -> None:
        touches = self._take_touches() if touches is None else touches
        if not touches:
            return
        try:
            with self.db.app_tx() as c:
                touch_keys(c, self.db.dialect, touches)
        except Exception:  # a missed last-used time is not worth a retry loop
            log.warning("could not record key last-used times", exc_info=True)

    def _write_with_retry(self, batch: list[InteractionRecord]) -> None:
        """Write the batch whatever it takes: outages are retried, refused rows isolated."""
        touches = self._take_touches()
        todo = [batch]
        delay = 0.05
        while todo:
            part = todo.pop()
            try:
                self._write_batch(part, touches)
                touches = {}
                delay = 0.05
            except Exception as exc:
                if not _is_data_error(exc):
                    self.retries += 1
                    log.error("ledger write failed (%s); retrying in %.2fs, %d rows held", exc, delay, len(part))
                    todo.append(part)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                # Something in this part is refused: set key touches aside (they must not take
                # rows down with them), forget cached users, and halve until the row is found.
                if touches:
                    self._write_touches_only(touches)
                    touches = {}
                self._known_users.clear()
                if len(part) > 1:
                    mid = len(part) // 2
                    todo += [part[mid:], part[:mid]]
                elif _is_duplicate_interaction(exc):
                    log.info("ledger row %s was already written; not writing it twice", part[0].id)
                else:
                    self._dead_letter(part[0], exc)
        self._finish(batch)

    def _dead_letter(self, rec: InteractionRecord, exc: Exception) -> None:
        self.dead_lettered += 1
        log.error("ledger row %s refused by the database (%s); kept in %s", rec.id, exc, self.dead_letter_path)
        line = orjson.dumps({"error": str(exc), "row": rec}, option=_JSON_OPTS, default=str) + b"\n"
        try:
            with self.dead_letter_path.open("ab") as fh:
                fh.write(line)
        except OSError:
            # Last resort: the row goes to the log rather than nowhere.
            log.critical("could not write the ledger dead-letter file; row: %s", line.decode().strip())

    def _finish(self, batch: list[InteractionRecord]) -> None:
        if self.on_written is not None:
            try:
                self.on_written(batch)
            except Exception:
                log.warning("ledger on_written hook failed", exc_info=True)
        with self._cond:
            self._done += len(batch)
            self.written += len(batch)
            self._cond.notify_all()

    def _write_batch(self, batch: list[InteractionRecord], touches: dict[str, tuple[str, Any]]) -> None:
        if self.db.dialect == "postgres":
            new_users = self._write_postgres(batch, touches)
        else:
            new_users = self._write_sqlite(batch, touches)
        if len(self._known_users) > _KNOWN_USERS_MAX:
            self._known_users.clear()
        self._known_users.update(new_users)

    # -- SQLite -------------------------------------------------------------------------

    def _write_sqlite(self, batch: list[InteractionRecord], touches: dict[str, tuple[str, Any]]) -> Iterable[str]:
        try:
            users, rows, attempts, rollups = _sqlite_rows(batch, self._known_users)
        except Exception as exc:
            raise _RowError(f"cannot encode ledger row: {exc}") from exc
        with self.db.app_tx() as c:
            if users:
                c.executemany(_SQLITE_USERS, list(users.values()))
            c.executemany(_SQLITE_INTERACTIONS, rows)
            c.executemany(_SQLITE_ATTEMPTS, attempts)
            c.executemany(_SQLITE_ROLLUPS, rollups)
            if touches:
                touch_keys(c, "sqlite", touches)
        return users

    # -- PostgreSQL ---------------------------------------------------------------------

    def _write_postgres(self, batch: list[InteractionRecord], touches: dict[str, tuple[str, Any]]) -> Iterable[str]:
        by_tenant: dict[str, list[InteractionRecord]] = {}
        for rec in batch:
            group = by_tenant.get(rec.tenant_id)
            if group is None:
                group = by_tenant[rec.tenant_id] = []
            group.append(rec)
            for a in rec.attempts:
                if a.id is None:
                    a.id = _uuid7()  # assigned once: a retried batch writes the same ids
        known = self._known_users
        statements: list[tuple[str, tuple | dict]] = []
        new_users: list[str] = []
        try:
            for tenant_id, recs in by_tenant.items():
                users = {r.user_external_id: user_uuid(tenant_id, r.user_external_id) for r in recs if r.user_external_id}
                fresh = {ext: uid for ext, uid in users.items() if uid not in known}
                statements.append(("SELECT set_config('loadbear.tenant_id', %s, true)", (str(tenant_id),)))
                if fresh:
                    statements.append((_PG_USERS_SQL, (tenant_id, orjson.dumps(fresh).decode())))
                    new_users.extend(fresh.values())
                statements.append((_PG_BATCH_SQL, {
                    "rows": orjson.dumps(recs, option=_JSON_OPTS).decode(),
                    "users": orjson.dumps(users).decode(),
                }))
        except (TypeError, ValueError) as exc:
            raise _RowError(f"cannot encode ledger row: {exc}") from exc
        with self.db.app_tx() as c:
            # One round trip for the whole batch; errors surface when the pipeline syncs.
            with c.raw.pipeline():
                for sql, params in statements:
                    c.raw.execute(sql, params)
                if touches:
                    touch_keys(c, "postgres", touches)
        return new_users


# -- rows ---------------------------------------------------------------------------------


def _utc(dt: datetime) -> datetime:
    tz = dt.tzinfo
    if tz is timezone.utc:
        return dt
    if tz is None:
        return dt.replace(tzinfo=timezone.utc)  # naive means UTC in the ledger
    return dt.astimezone(timezone.utc)


def _sqlite_time(dt: datetime) -> str:
    """The text ``values.db_time`` stores (UTC, microseconds), without strftime's cost."""
    return _utc(dt).isoformat(timespec="microseconds")[:26]


def _sqlite_rows(batch: list[InteractionRecord], known_users: set[str]):
    users: dict[str, tuple[str, str, str]] = {}
    rows: list[tuple] = []
    attempts: list[tuple] = []
    sums: dict[tuple, list[int]] = {}
    dumps = orjson.dumps
    for r in batch:
        tid = r.tenant_id
        ext = r.user_external_id
        if ext:
            uid = user_uuid(tid, ext)
            if uid not in known_users:
                users[uid] = (uid, tid, ext)
        else:
            uid = None
        created = _sqlite_time(r.created_at)
        chunks = r.retrieved_chunk_ids
        rows.append((
            r.id, tid, uid, r.feature, r.model, r.prompt_tokens, r.completion_tokens, r.latency_ms,
            r.cached, r.error, created, r.request_id, r.provider, r.requested_model, r.route,
            r.route_reason, r.status, r.streamed, r.ttft_ms, r.finish_reason, r.cached_input_tokens,
            r.tokens_estimated, r.cost_micro_usd, r.saved_micro_usd, r.cache_kind, r.cache_similarity,
            r.cache_entry_id, len(r.attempts), r.error_type, r.http_status,
            None if chunks is None else dumps(chunks).decode(), r.prompt_text, r.response_text,
            dumps(r.metadata or {}).decode(),
        ))
        for a in r.attempts:
            if a.id is None:
                a.id = _uuid7()  # assigned once: a retried batch writes the same ids
            attempts.append((
                a.id, r.id, tid, a.attempt_no, a.provider, a.model, a.upstream_model, a.status,
                a.error_type, a.error, a.http_status, a.prompt_tokens, a.completion_tokens,
                a.cached_input_tokens, a.tokens_estimated, a.cost_micro_usd, a.latency_ms, a.ttft_ms,
                _sqlite_time(a.started_at),
            ))
        key = (tid, created[:10], r.feature, r.model, ext or "")
        s = sums.get(key)
        status = r.status
        if s is None:
            sums[key] = [
                1, int(status == "error"), int(status == "degraded"), int(status == "cancelled"),
                int(r.cached), int(r.streamed),
                r.prompt_tokens, r.completion_tokens, r.cached_input_tokens, r.cost_micro_usd,
                r.saved_micro_usd, r.latency_ms,
            ]
        else:
            s[0] += 1
            s[1] += status == "error"
            s[2] += status == "degraded"
            s[3] += status == "cancelled"
            s[4] += r.cached
            s[5] += r.streamed
            s[6] += r.prompt_tokens
            s[7] += r.completion_tokens
            s[8] += r.cached_input_tokens
            s[9] += r.cost_micro_usd
            s[10] += r.saved_micro_usd
            s[11] += r.latency_ms
    # Sorted keys: concurrent writers take the rollup rows' locks in the same order.
    rollups = [k + tuple(sums[k]) for k in sorted(sums)]
    return users, rows, attempts, rollups


def _uuid7() -> str:
    """A time-ordered UUID (RFC 9562 v7), as ``values.uuid7`` makes, formatted without uuid.UUID."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    h = "%032x" % (
        (ms & 0xFFFFFFFFFFFF) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & ((1 << 62) - 1)
    )
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# -- errors -------------------------------------------------------------------------------


def _is_data_error(exc: BaseException) -> bool:
    """A row the database refuses on its own (retrying cannot help), as opposed to an outage."""
    if isinstance(exc, _RowError):
        return True
    try:
        import psycopg

        if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (sqlean.IntegrityError, sqlean.DataError)):
        return True
    # A value of a type SQLite cannot store (e.g. a dict where text belongs).
    return isinstance(exc, (sqlean.ProgrammingError, sqlean.InterfaceError)) and "binding parameter" in str(exc)


def _is_duplicate_interaction(exc: BaseException) -> bool:
    """The interaction id is already stored: an earlier attempt committed this very row."""
    diag = getattr(exc, "diag", None)
    if diag is not None:
        return getattr(exc, "sqlstate", None) == "23505" and diag.constraint_name == "ai_interactions_pkey"
    return isinstance(exc, sqlean.IntegrityError) and "UNIQUE constraint failed: ai_interactions.id" in str(exc)
