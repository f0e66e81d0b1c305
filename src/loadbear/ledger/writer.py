"""The ledger writer: batches rows off the request path and never drops one.

Requests hand a finished :class:`InteractionRecord` to :meth:`LedgerWriter.submit` and move on.
Writer threads drain the queue in batches; each batch is one transaction that inserts the raw
rows, their attempts, and updates the daily rollups, so reports never disagree with rows.

Loss is not an option, so the queue is bounded and a full queue blocks the submitter
(backpressure). A failing database is retried with backoff for as long as it takes; a row the
database refuses on its own (a data error, not an outage) is found by halving the batch and goes
to a dead-letter file with the error, never silently away; the rest of the batch is written. A
row whose interaction id is already stored (a retry after a commit whose acknowledgement was
lost) counts as written, not twice.

The hot path (numbers in docs/benchmarks.md, "Ledger"): rows are built once as tuples, with
times as UTC text and rollups summed in Python, then

* SQLite: multi-row ``INSERT ... VALUES (...), (...)`` statements, a few hundred rows each, for
  end users, interactions, attempts and the upserts of the three rollups (``usage_daily`` and
  the narrow ``usage_daily_models`` / ``usage_daily_users`` that reports read);
* PostgreSQL: per tenant, because of row-level security (the writer runs as the application
  role with the tenant set, like any tenant work), ONE statement whose parameters are the rows
  as JSON arrays (orjson on our side, ``jsonb_array_elements`` on the server) inserting end
  users, interactions, attempts and upserting the three rollups. A batch's statements go out in one
  pipeline (one network round trip), and two writer lanes let the server work on two batches
  at once, each lane serving its own tenants (so they never wait for each other's row locks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import threading
import time
from collections import deque
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson
import sqlean

from loadbear.ledger.records import InteractionRecord
from loadbear.storage.db import Database
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
    # saved_micro_usd split by where it came from (migration 0014): a cache hit saves the call it
    # replaced, an uncached routed answer the difference to the strong tier. The two add up to it.
    "saved_cache_micro_usd", "saved_routing_micro_usd",
)

# The same sums in narrower rollups that the usage reports read (migration 0012): without the
# end user, and with only the end user. Derived from usage_daily's sums per batch, so the three
# always agree.
_MODEL_KEY = ("tenant_id", "day", "feature", "model")
_USER_KEY = ("tenant_id", "day", "user_external_id")


def _rollup_update(table: str, key: tuple[str, ...]) -> str:
    return (f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
            + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in _ROLLUP_SUMS))


_ROLLUP_UPDATE = _rollup_update("usage_daily", _ROLLUP_KEY)


class _SqliteInsert:
    """``INSERT INTO table (cols) VALUES (?, ...)[, (?, ...) ...] [tail]`` for any number of rows."""

    def __init__(self, table: str, cols: tuple[str, ...], tail: str = "") -> None:
        self.head = f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
        self.one = "(" + ", ".join("?" for _ in cols) + ")"
        self.tail = tail
        self.ncols = len(cols)
        # Rows per statement: as many as SQLite takes parameters for, at most one batch.
        self.max_rows = max(1, min(_SQLITE_MAX_ROWS, _SQLITE_MAX_PARAMS // self.ncols))

    @functools.lru_cache(maxsize=64)  # noqa: B019 - a handful of module-level instances
    def sql(self, rows: int) -> str:
        return self.head + ", ".join([self.one] * rows) + self.tail


_SQLITE_MAX_PARAMS = 32766  # SQLITE_MAX_VARIABLE_NUMBER since 3.32
_SQLITE_MAX_ROWS = 1000


_SQLITE_USERS = _SqliteInsert("users", ("id", "tenant_id", "external_id"), " ON CONFLICT DO NOTHING")
_SQLITE_INTERACTIONS = _SqliteInsert("ai_interactions", _INTERACTION_COLS)
_SQLITE_ATTEMPTS = _SqliteInsert("ai_attempts", _ATTEMPT_COLS)
_SQLITE_ROLLUPS = _SqliteInsert("usage_daily", _ROLLUP_KEY + _ROLLUP_SUMS, " " + _ROLLUP_UPDATE)
_SQLITE_MODEL_ROLLUPS = _SqliteInsert(
    "usage_daily_models", _MODEL_KEY + _ROLLUP_SUMS, " " + _rollup_update("usage_daily_models", _MODEL_KEY))
_SQLITE_USER_ROLLUPS = _SqliteInsert(
    "usage_daily_users", _USER_KEY + _ROLLUP_SUMS, " " + _rollup_update("usage_daily_users", _USER_KEY))

# PostgreSQL: per tenant and batch ONE statement whose parameters are the rows as JSON arrays
# (serialised by orjson, expanded by the server): end users, interactions, attempts and the
# rollup upserts. Positional arrays parse about twice as cheaply as objects with keys.
_PG_CAST = {
    "id": "uuid", "tenant_id": "uuid", "user_id": "uuid", "interaction_id": "uuid", "cache_entry_id": "uuid",
    "prompt_tokens": "int", "completion_tokens": "int", "latency_ms": "int", "ttft_ms": "int",
    "cached_input_tokens": "int", "attempt_count": "int", "http_status": "int", "attempt_no": "int",
    "cost_micro_usd": "bigint", "saved_micro_usd": "bigint", "cache_similarity": "real",
    "cached": "bool", "streamed": "bool", "tokens_estimated": "bool",
    "retrieved_chunk_ids": "jsonb", "metadata": "jsonb", "day": "date",
}


def _pg_fields(cols: tuple[str, ...]) -> str:
    out = []
    for i, col in enumerate(cols):
        if col in ("created_at", "started_at"):
            out.append(f"(e->>{i})::timestamp AT TIME ZONE 'UTC'")  # UTC text, as SQLite stores it
        elif col in _PG_CAST:
            out.append(f"(e->>{i})::{_PG_CAST[col]}")
        elif col in _ROLLUP_SUMS:
            out.append(f"(e->>{i})::bigint")
        else:
            out.append(f"e->>{i}")
    return ", ".join(out)


def _pg_insert(table: str, cols: tuple[str, ...], param: str) -> str:
    return (
        f"INSERT INTO {table} ({', '.join(cols)}) SELECT {_pg_fields(cols)}"
        f" FROM jsonb_array_elements(%({param})s::jsonb) AS e"
    )


_PG_BATCH_SQL = (
    f"WITH u AS ({_pg_insert('users', ('id', 'tenant_id', 'external_id'), 'users')} ON CONFLICT DO NOTHING),"
    f" i AS ({_pg_insert('ai_interactions', _INTERACTION_COLS, 'interactions')}),"
    f" a AS ({_pg_insert('ai_attempts', _ATTEMPT_COLS, 'attempts')}),"
    f" m AS ({_pg_insert('usage_daily_models', _MODEL_KEY + _ROLLUP_SUMS, 'model_rollups')}"
    f" {_rollup_update('usage_daily_models', _MODEL_KEY)}),"
    f" n AS ({_pg_insert('usage_daily_users', _USER_KEY + _ROLLUP_SUMS, 'user_rollups')}"
    f" {_rollup_update('usage_daily_users', _USER_KEY)})"
    f" {_pg_insert('usage_daily', _ROLLUP_KEY + _ROLLUP_SUMS, 'rollups')} {_ROLLUP_UPDATE}"
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
        full = min(n, self.maxsize)  # a queue smaller than a batch is full sooner
        with self._not_empty:
            if not self._items and not self._urgent:
                self._wake_at = 1
                self._not_empty.wait(idle)
            if self._items and len(self._items) < full and linger > 0 and not self._urgent:
                deadline = time.monotonic() + linger
                self._wake_at = full
                while len(self._items) < full and not self._urgent:
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


class _Lane:
    """One writer thread with its own queue. Every tenant is served by exactly one lane, so
    lanes never write the same rollup or end-user rows and never wait for each other's locks."""

    def __init__(self, index: int, queue_max: int) -> None:
        self.index = index
        self.buf = _Buffer(queue_max)
        self.known_users: set[str] = set()  # end users whose rows exist (this lane's tenants)
        self.thread: threading.Thread | None = None


class LedgerWriter:
    """Hands ledger rows to the database in batches, off the request path, without losing any.

    ``lanes`` is the number of writer threads (and connections). SQLite takes one writer at a
    time, so it gets one; PostgreSQL gets two by default, which lets the server work on two
    batches at once (tenants are spread over the lanes; one tenant always uses the same lane).
    ``queue_max`` bounds the rows waiting in all lanes together. ``on_written`` is called with
    every written batch (rows refused into the dead-letter file included), one call at a time.
    ``flush()`` waits until everything submitted before it is durable; ``close()`` flushes and
    stops; neither loses a row.
    """

    def __init__(
        self,
        db: Database,
        batch_size: int = 1000,
        flush_interval: float = 0.05,
        queue_max: int = 50_000,
        dead_letter_path: str | Path = "loadbear-ledger-deadletter.jsonl",
        on_written: Callable[[list[InteractionRecord]], None] | None = None,
        lanes: int | None = None,
    ) -> None:
        self.db = db
        self.batch_size = max(1, batch_size)
        self.flush_interval = flush_interval
        self.dead_letter_path = Path(dead_letter_path)
        self.on_written = on_written
        n = lanes if lanes is not None else (2 if db.dialect == "postgres" else 1)
        if db.dialect != "postgres":
            n = 1  # one SQLite writer at a time: more lanes would only queue on its lock
        n = max(1, n)
        self._lanes = [_Lane(i, max(1, queue_max // n)) for i in range(n)]
        self._lane_of: dict[str, _Lane] = {}
        self._route_lock = threading.Lock()
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self.written = 0
        self.dead_lettered = 0
        self.retries = 0
        # Key last-used times waiting to be written (by lane 0); flush() also waits for these.
        self._touches: dict[str, tuple[str, Any]] = {}
        self._touch_lock = threading.Lock()
        self._touch_seq = 0  # touches handed in
        self._touch_done = 0  # touches handled (written, or given up on: they are best effort)
        self._dead_letter_lock = threading.Lock()
        self._hook_lock = threading.Lock()
        self._closed = False
        self._stopping = False
        for lane in self._lanes:
            lane.thread = threading.Thread(target=self._run, args=(lane,), name=f"loadbear-ledger-{lane.index}",
                                           daemon=True)
            lane.thread.start()

    # -- submitting ---------------------------------------------------------------------

    def submit(self, record: InteractionRecord) -> None:
        """Queue a row; blocks while the queue is full."""
        self._count_submit()
        self._lane(record.tenant_id).buf.put(record)

    async def asubmit(self, record: InteractionRecord) -> None:
        """Queue a row from async code without blocking the event loop when the queue is full."""
        self._count_submit()
        buf = self._lane(record.tenant_id).buf
        if not buf.put(record, block=False):
            await asyncio.to_thread(buf.put, record)

    def _count_submit(self) -> None:
        # Counted before the put, under the lock that close() takes: a row that got past this
        # check is part of close()'s final flush.
        with self._cond:
            if self._closed:
                raise RuntimeError("ledger writer is closed")
            self._submitted += 1

    def _lane(self, tenant_id: str) -> _Lane:
        if len(self._lanes) == 1:
            return self._lanes[0]
        lane = self._lane_of.get(tenant_id)
        if lane is None:
            with self._route_lock:  # tenants are dealt out in turn: even with a few tenants
                lane = self._lane_of.setdefault(tenant_id, self._lanes[len(self._lane_of) % len(self._lanes)])
        return lane

    def touch_key(self, key_id: str, tenant_id: str) -> None:
        with self._touch_lock:
            self._touches[key_id] = (tenant_id, utcnow())
            self._touch_seq += 1

    @property
    def pending(self) -> int:
        with self._cond:
            return self._submitted - self._done

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row submitted so far is written (or dead-lettered), and key touches."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._touch_lock:
            touch_target = self._touch_seq
        with self._cond:
            target = self._submitted
        while True:
            for lane in self._lanes:
                lane.buf.hurry()  # no lingering for more rows while someone waits
            with self._cond:
                if self._done >= target and self._touch_done >= touch_target:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(0.1 if remaining is None else min(remaining, 0.1))

    def close(self, timeout: float | None = None) -> None:
        """Refuse new rows, write everything queued (and pending key touches), stop the threads."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self.flush(timeout)
        self._stopping = True
        deadline = None if timeout is None else time.monotonic() + timeout
        for lane in self._lanes:
            lane.buf.hurry()
            assert lane.thread is not None
            lane.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # -- the writer threads -------------------------------------------------------------
    #
    # Building a batch's rows and writing them happen one after the other in the lane's thread.
    # (Building the next batch in a second thread while the database works was measured: slower
    # on both backends, the GIL hand-offs cost more than the overlap gains.)

    def _run(self, lane: _Lane) -> None:
        idle = max(self.flush_interval, 0.01)
        while True:
            batch = lane.buf.take(self.batch_size, idle, self.flush_interval)
            if batch:
                self._write_with_retry(lane, batch)
            elif lane.index == 0:
                self._write_touches_only()
            if not batch and self._stopping:
                return

    def _take_touches(self, lane: _Lane) -> tuple[dict[str, tuple[str, Any]], int]:
        if lane.index != 0:
            return {}, 0
        with self._touch_lock:
            touches, self._touches = self._touches, {}
            return touches, self._touch_seq

    def _touches_handled(self, seq: int) -> None:
        with self._cond:
            if seq > self._touch_done:
                self._touch_done = seq
                self._cond.notify_all()

    def _write_touches_only(self) -> None:
        touches, seq = self._take_touches(self._lanes[0])
        self._write_touches(touches)
        self._touches_handled(seq)

    def _write_touches(self, touches: dict[str, tuple[str, Any]]) -> None:
        if not touches:
            return
        try:
            with self.db.app_tx() as c:
                touch_keys(c, self.db.dialect, touches)
        except Exception:  # a missed last-used time is not worth a retry loop
            log.warning("could not record key last-used times", exc_info=True)

    def _write_with_retry(self, lane: _Lane, batch: list[InteractionRecord]) -> None:
        """Write the batch whatever it takes: outages are retried, refused rows isolated."""
        touches, touch_seq = self._take_touches(lane)
        todo = [batch]
        delay = 0.05
        while todo:
            part = todo.pop()
            try:
                self._write_batch(lane, part, touches)
                touches = {}
                delay = 0.05
            except Exception as exc:
                if not _is_data_error(exc):
                    with self._cond:
                        self.retries += 1
                    log.error("ledger write failed (%s); retrying in %.2fs, %d rows held", exc, delay, len(part))
                    todo.append(part)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                # Something in this part is refused: set key touches aside (they must not take
                # rows down with them), forget cached users, and halve until the row is found.
                self._write_touches(touches)
                touches = {}
                lane.known_users.clear()
                if len(part) > 1:
                    mid = len(part) // 2
                    todo += [part[mid:], part[:mid]]
                elif self._already_written(part[0]):
                    log.warning("ledger row %s is already stored; not writing it twice", part[0].id)
                else:
                    self._dead_letter(part[0], exc)
        self._finish(batch)
        self._touches_handled(touch_seq)

    def _already_written(self, rec: InteractionRecord) -> bool:
        """Whether the row is stored: a retry after a commit whose acknowledgement was lost."""
        try:
            with self.db.tenant_tx(rec.tenant_id, write=False) as c:
                return c.scalar("SELECT 1 FROM ai_interactions WHERE id = ?", (rec.id,)) is not None
        except Exception:
            return False

    def _dead_letter(self, rec: InteractionRecord, exc: Exception) -> None:
        with self._cond:
            self.dead_lettered += 1
        log.error("ledger row %s refused by the database (%s); kept in %s", rec.id, exc, self.dead_letter_path)
        line = orjson.dumps({"error": str(exc), "row": rec}, option=_JSON_OPTS, default=str) + b"\n"
        try:
            with self._dead_letter_lock, self.dead_letter_path.open("ab") as fh:
                fh.write(line)
        except OSError:
            # Last resort: the row goes to the log rather than nowhere, but never the prompt or the
            # answer: logs are shipped and kept under weaker rules than the tenant's stored content.
            redacted = dataclasses.replace(rec, prompt_text=None, response_text=None)
            row = orjson.dumps({"error": str(exc), "row": redacted}, option=_JSON_OPTS, default=str).decode()
            log.critical("could not write the ledger dead-letter file; row (content withheld): %s", row)

    def _finish(self, batch: list[InteractionRecord]) -> None:
        if self.on_written is not None:
            try:
                with self._hook_lock:  # one call at a time, whichever lane wrote the batch
                    self.on_written(batch)
            except Exception:
                log.warning("ledger on_written hook failed", exc_info=True)
        with self._cond:
            self._done += len(batch)
            self.written += len(batch)
            self._cond.notify_all()

    def _write_batch(self, lane: _Lane, batch: list[InteractionRecord], touches: dict[str, tuple[str, Any]]) -> None:
        known = lane.known_users
        new_users = self._commit(self._prepare(batch, known), touches)
        if len(known) > _KNOWN_USERS_MAX:
            known.clear()
        known.update(new_users)  # only once the transaction committed

    def _prepare(self, batch: list[InteractionRecord], known: set[str]) -> Any:
        """The batch as rows/parameters for the backend (no database access)."""
        if self.db.dialect == "postgres":
            return _pg_statements(batch, known)
        return _build_rows(batch, known)

    def _commit(self, prepared: Any, touches: dict[str, tuple[str, Any]]) -> Iterable[str]:
        """One transaction; returns the ids of the end users it created."""
        # The application login, not the owner's, although a batch spans tenants and the writer
        # runs no user-supplied SQL (request content only ever travels as bound parameters): with
        # the tenant set per group, a grouping bug that put one tenant's row under another's
        # statement is refused by row-level security instead of stored under the wrong tenant,
        # and the hot path never holds an owner connection. It costs one set_config per tenant
        # in the batch, inside the same pipeline (no extra round trip).
        with self.db.app_tx() as c:
            raw = c.raw
            if self.db.dialect == "postgres":
                statements, new_users = prepared
                # One network round trip for the whole batch; errors surface when it syncs.
                with raw.pipeline():
                    for tenant_id, params in statements:
                        raw.execute("SELECT set_config('loadbear.tenant_id', %s, true)", (tenant_id,))
                        raw.execute(_PG_BATCH_SQL, params)
                    if touches:
                        touch_keys(c, "postgres", touches)
                return new_users
            users, rows, attempts, rollups, model_rollups, user_rollups = prepared
            _sqlite_insert(raw, _SQLITE_USERS, list(users.values()))
            _sqlite_insert(raw, _SQLITE_INTERACTIONS, rows)
            _sqlite_insert(raw, _SQLITE_ATTEMPTS, attempts)
            _sqlite_insert(raw, _SQLITE_ROLLUPS, rollups)
            _sqlite_insert(raw, _SQLITE_MODEL_ROLLUPS, model_rollups)
            _sqlite_insert(raw, _SQLITE_USER_ROLLUPS, user_rollups)
            if touches:
                touch_keys(c, "sqlite", touches)
            return users


def _pg_statements(batch: list[InteractionRecord], known: set[str]) -> tuple[list[tuple[str, dict]], list[str]]:
    """Per tenant (row-level security: each tenant's rows are written with that tenant set), the
    JSON parameters of one ``_PG_BATCH_SQL``; and the end users that will be created."""
    by_tenant: dict[str, list[InteractionRecord]] = {}
    for rec in batch:
        group = by_tenant.get(rec.tenant_id)
        if group is None:
            group = by_tenant[rec.tenant_id] = []
        group.append(rec)
    statements = []
    new_users: list[str] = []
    for tenant_id, recs in by_tenant.items():
        users, rows, attempts, rollups, model_rollups, user_rollups = _build_rows(recs, known)
        new_users.extend(users)
        try:
            params = {
                "users": orjson.dumps(list(users.values())).decode(),
                "interactions": orjson.dumps(rows).decode(),
                "attempts": orjson.dumps(attempts).decode(),
                "rollups": orjson.dumps(rollups).decode(),
                "model_rollups": orjson.dumps(model_rollups).decode(),
                "user_rollups": orjson.dumps(user_rollups).decode(),
            }
        except TypeError as exc:  # e.g. a value in a text column that JSON cannot carry
            raise _RowError(f"cannot encode ledger row: {exc}") from exc
        statements.append((str(tenant_id), params))
    return statements, new_users


def _sqlite_insert(raw: Any, stmt: _SqliteInsert, rows: list[tuple]) -> None:
    """INSERT rows with as few statements as possible: ``VALUES (...), (...), ...``.

    A multi-row statement binds and steps once per chunk instead of once per row: less work, and
    the GIL is released for the whole chunk instead of once per row (each time another thread
    may keep it for up to a switch interval). Chunks are of equal size, so a full batch always
    uses the same statement texts, which stay in the connection's statement cache.
    """
    n = len(rows)
    if not n:
        return
    chunks = -(-n // stmt.max_rows)
    size = -(-n // chunks)
    for i in range(0, n, size):
        part = rows[i:i + size]
        raw.execute(stmt.sql(len(part)), tuple(chain.from_iterable(part)))


# -- rows ---------------------------------------------------------------------------------


def _utc(dt: datetime) -> datetime:
    tz = dt.tzinfo
    if tz is timezone.utc:
        return dt
    if tz is None:
        return dt.replace(tzinfo=timezone.utc)  # naive means UTC in the ledger
    return dt.astimezone(timezone.utc)


def _sqlite_time(dt: datetime) -> str:
    """The text ``values.db_time`` stores: UTC, microseconds, no offset (``2026-01-31T12:00:00.000000``).

    orjson formats a datetime ~5x faster than strftime/isoformat; it leaves out a zero fraction.
    """
    text = orjson.dumps(_utc(dt), option=orjson.OPT_UTC_Z)[1:-2].decode()
    return text if len(text) == 26 else text + ".000000"


def _build_rows(batch: list[InteractionRecord], known_users: set[str]):
    """Rows for both backends: (new users, interactions, attempts, rollups, model rollups, user
    rollups) as tuples.

    Times are UTC text (what SQLite stores; PostgreSQL casts it back), JSON columns are text,
    rollups are summed here and sorted by key so that concurrent writers lock them in order.
    """
    try:
        return _build_rows_unchecked(batch, known_users)
    except Exception as exc:  # a record that cannot become a row is that row's problem
        raise _RowError(f"cannot encode ledger row: {exc!r}") from exc


def _build_rows_unchecked(batch: list[InteractionRecord], known_users: set[str]):
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
        if r.metadata and r.metadata.get("eval_run"):
            # Evaluation traffic (runs and their LLM judge) is kept row by row for debugging,
            # but it is not product spend: usage reports, which read the rollups, leave it out.
            continue
        key = (tid, created[:10], r.feature, r.model, ext or "")
        s = sums.get(key)
        status = r.status
        saved = r.saved_micro_usd
        if s is None:
            sums[key] = [
                1, int(status == "error"), int(status == "degraded"), int(status == "cancelled"),
                int(r.cached), int(r.streamed),
                r.prompt_tokens, r.completion_tokens, r.cached_input_tokens, r.cost_micro_usd,
                saved, r.latency_ms, saved if r.cached else 0, 0 if r.cached else saved,
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
            s[10] += saved
            s[11] += r.latency_ms
            if saved:
                s[12 if r.cached else 13] += saved
    # Sorted keys: concurrent writers take the rollup rows' locks in the same order.
    rollups = [k + tuple(sums[k]) for k in sorted(sums)]
    return users, rows, attempts, rollups, _regroup(rollups, (0, 1, 2, 3)), _regroup(rollups, (0, 1, 4))


def _regroup(rollups: list[tuple], key: tuple[int, ...]) -> list[tuple]:
    """usage_daily rollup rows (5 key columns, then the sums) summed by a subset of the key."""
    out: dict[tuple, list[int]] = {}
    for r in rollups:
        k = tuple(r[i] for i in key)
        acc = out.get(k)
        if acc is None:
            out[k] = list(r[5:])
        else:
            for i, v in enumerate(r[5:]):
                acc[i] += v
    return [k + tuple(out[k]) for k in sorted(out)]


def _uuid7() -> str:
    """A time-ordered UUID (RFC 9562 v7) for an attempt that came without an id.

    Unlike ``values.uuid7`` it draws its random bits from ``random`` (reseeded in forked
    children) instead of ``os.urandom``: ids need to be unique, not secret, and a system call
    per attempt would hand the GIL to another thread in the middle of building a batch.
    """
    ms = time.time_ns() // 1_000_000
    rand = random.getrandbits(74)
    h = "%032x" % (
        (ms & 0xFFFFFFFFFFFF) << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | rand & ((1 << 62) - 1)
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
