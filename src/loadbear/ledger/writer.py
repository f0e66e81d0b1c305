"""The ledger writer: batches rows off the request path and never drops one.

Requests hand a finished :class:`InteractionRecord` to :meth:`LedgerWriter.submit` and move on.
A single thread drains the queue in batches; each batch is one transaction that inserts the
raw rows, their attempts, and updates the daily rollups, so reports never disagree with rows.

Loss is not an option, so the queue is bounded and a full queue blocks the submitter
(backpressure). A failing database is retried with backoff for as long as it takes; a row the
database refuses on its own (a data error, not an outage) goes to a dead-letter file with the
error, never silently away.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

import orjson
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from loadbear.ledger.records import InteractionRecord
from loadbear.storage.db import Conn, Database
from loadbear.storage.values import db_day, db_time, dumps, utcnow, uuid7
from loadbear.tenancy.service import touch_keys, user_uuid

log = logging.getLogger("loadbear.ledger")

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
_ROLLUP_SQL = (
    f"INSERT INTO usage_daily ({', '.join(_ROLLUP_KEY + _ROLLUP_SUMS)}) "
    f"VALUES ({', '.join('?' for _ in _ROLLUP_KEY + _ROLLUP_SUMS)}) "
    f"ON CONFLICT ({', '.join(_ROLLUP_KEY)}) DO UPDATE SET "
    + ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in _ROLLUP_SUMS)
)
# PostgreSQL caps a statement at 65,535 parameters.
_PG_ROWS_PER_INSERT = 1000
_STOP = object()


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
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.dead_letter_path = Path(dead_letter_path)
        self.on_written = on_written
        self._q: queue.Queue[Any] = queue.Queue(maxsize=queue_max)
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self.written = 0
        self.dead_lettered = 0
        self.retries = 0
        self._touches: dict[str, tuple[str, Any]] = {}
        self._touch_lock = threading.Lock()
        self._known_users: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="loadbear-ledger", daemon=True)
        self._closed = False
        # While someone waits in flush(), write what is queued without waiting for more.
        self._flush_waiters = 0
        self._thread.start()

    # -- submitting ---------------------------------------------------------------------

    def submit(self, record: InteractionRecord) -> None:
        """Queue a row; blocks while the queue is full."""
        if self._closed:
            raise RuntimeError("ledger writer is closed")
        with self._cond:
            self._submitted += 1
        self._q.put(record)

    async def asubmit(self, record: InteractionRecord) -> None:
        """Queue a row from async code without blocking the event loop when the queue is full."""
        if self._closed:
            raise RuntimeError("ledger writer is closed")
        with self._cond:
            self._submitted += 1
        try:
            self._q.put_nowait(record)
        except queue.Full:
            await asyncio.to_thread(self._q.put, record)

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
            self._flush_waiters += 1
            try:
                while self._done < target:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining if remaining is not None else 0.5)
            finally:
                self._flush_waiters -= 1
        return True

    def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._q.put(_STOP)
        self._thread.join(timeout)

    # -- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._q.get(timeout=max(self.flush_interval, 0.01))
            except queue.Empty:
                self._write_touches_only()
                continue
            if first is _STOP:
                self._write_touches_only()
                return
            batch = [first]
            stop = False
            # Gather for up to one flush interval: fewer, larger transactions under load.
            deadline = time.monotonic() + self.flush_interval
            while len(batch) < self.batch_size:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._flush_waiters:
                        break
                    try:
                        item = self._q.get(timeout=min(remaining, 0.005))
                    except queue.Empty:
                        continue
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._write_with_retry(batch)
            if stop:
                self._write_touches_only()
                return

    def _take_touches(self) -> dict[str, tuple[str, Any]]:
        with self._touch_lock:
            touches, self._touches = self._touches, {}
        return touches

    def _write_touches_only(self) -> None:
        touches = self._take_touches()
        if not touches:
            return
        try:
            with self.db.app_tx() as c:
                touch_keys(c, self.db.dialect, touches)
        except Exception:  # a missed last-used time is not worth a retry loop
            log.warning("could not record key last-used times", exc_info=True)

    def _write_with_retry(self, batch: list[InteractionRecord]) -> None:
        delay = 0.05
        touches = self._take_touches()
        while True:
            try:
                self._write_batch(batch, touches)
                break
            except Exception as exc:
                if _is_data_error(exc):
                    self._write_rows_one_by_one(batch)
                    break
                self.retries += 1
                log.error("ledger write failed (%s); retrying in %.2fs, %d rows held", exc, delay, len(batch))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._finish(batch)

    def _write_rows_one_by_one(self, batch: list[InteractionRecord]) -> None:
        for rec in batch:
            try:
                self._write_batch([rec], {})
            except Exception as exc:
                if not _is_data_error(exc):
                    raise
                self._dead_letter(rec, exc)

    def _dead_letter(self, rec: InteractionRecord, exc: Exception) -> None:
        self.dead_lettered += 1
        log.error("ledger row %s refused by the database (%s); kept in %s", rec.id, exc, self.dead_letter_path)
        payload = {"error": str(exc), "row": _record_dict(rec)}
        with self.dead_letter_path.open("a", encoding="utf-8") as fh:
            fh.write(dumps(payload) + "\n")

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
        d = self.db.dialect
        by_tenant: dict[str, list[InteractionRecord]] = defaultdict(list)
        for rec in batch:
            by_tenant[rec.tenant_id].append(rec)
        new_users: list[str] = []
        with self.db.app_tx() as c:
            for tenant_id, recs in by_tenant.items():
                c.set_tenant(tenant_id)
                new_users.extend(self._insert_users(c, tenant_id, recs))
                self._insert_rows(c, "ai_interactions", _INTERACTION_COLS, [_interaction_row(d, r) for r in recs])
                attempts = [_attempt_row(d, r, a) for r in recs for a in r.attempts]
                self._insert_rows(c, "ai_attempts", _ATTEMPT_COLS, attempts)
                c.executemany(_ROLLUP_SQL, _rollup_rows(d, recs))
            if touches:
                touch_keys(c, d, touches)
        self._known_users.update(new_users)

    def _insert_users(self, c: Conn, tenant_id: str, recs: Iterable[InteractionRecord]) -> list[str]:
        rows = {}
        for r in recs:
            if r.user_external_id:
                uid = user_uuid(tenant_id, r.user_external_id)
                if uid not in self._known_users:
                    rows[uid] = (uid, tenant_id, r.user_external_id)
        if rows:
            c.executemany(
                "INSERT INTO users (id, tenant_id, external_id) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                list(rows.values()),
            )
        return list(rows)

    def _insert_rows(self, c: Conn, table: str, cols: tuple[str, ...], rows: list[tuple]) -> None:
        if not rows:
            return
        if self.db.dialect == "sqlite":
            c.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})", rows)
            return
        # One statement and one parameter per table: the rows travel as a JSON array that the
        # server expands (json_populate_recordset). Serialising with orjson is an order of
        # magnitude cheaper than binding thousands of parameters, and RLS still applies
        # (COPY would not be allowed under row-level security).
        payload = orjson.dumps([dict(zip(cols, row)) for row in rows]).decode()
        c.raw.execute(
            f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)}"
            f" FROM json_populate_recordset(NULL::{table}, %s::json)",
            (payload,),
        )


def _is_data_error(exc: Exception) -> bool:
    try:
        import psycopg

        if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    import sqlean

    return isinstance(exc, (sqlean.IntegrityError, sqlean.DataError))


def _interaction_row(d: str, r: InteractionRecord) -> tuple:
    return (
        r.id, r.tenant_id,
        user_uuid(r.tenant_id, r.user_external_id) if r.user_external_id else None,
        r.feature, r.model, r.prompt_tokens, r.completion_tokens, r.latency_ms, r.cached, r.error,
        db_time(d, r.created_at), r.request_id, r.provider, r.requested_model, r.route, r.route_reason,
        r.status, r.streamed, r.ttft_ms, r.finish_reason, r.cached_input_tokens, r.tokens_estimated,
        r.cost_micro_usd, r.saved_micro_usd, r.cache_kind, r.cache_similarity, r.cache_entry_id,
        len(r.attempts), r.error_type, r.http_status,
        _json(d, r.retrieved_chunk_ids), r.prompt_text, r.response_text, _json(d, r.metadata or {}),
    )


def _json(d: str, value: Any) -> Any:
    # SQLite stores JSON as text; for PostgreSQL the value rides inside the JSON payload as is.
    if value is None or d != "sqlite":
        return value
    return dumps(value)


def _attempt_row(d: str, r: InteractionRecord, a: Any) -> tuple:
    return (
        a.id or uuid7(), r.id, r.tenant_id, a.attempt_no, a.provider, a.model, a.upstream_model,
        a.status, a.error_type, a.error, a.http_status, a.prompt_tokens, a.completion_tokens,
        a.cached_input_tokens, a.tokens_estimated, a.cost_micro_usd, a.latency_ms, a.ttft_ms,
        db_time(d, a.started_at),
    )


def _rollup_rows(d: str, recs: Iterable[InteractionRecord]) -> list[tuple]:
    sums: dict[tuple, list[int]] = {}
    for r in recs:
        key = (r.tenant_id, db_day(d, r.created_at.date()), r.feature, r.model, r.user_external_id or "")
        s = sums.get(key)
        if s is None:
            s = sums[key] = [0] * len(_ROLLUP_SUMS)
        s[0] += 1
        s[1] += r.status == "error"
        s[2] += r.status == "degraded"
        s[3] += r.status == "cancelled"
        s[4] += r.cached
        s[5] += r.streamed
        s[6] += r.prompt_tokens
        s[7] += r.completion_tokens
        s[8] += r.cached_input_tokens
        s[9] += r.cost_micro_usd
        s[10] += r.saved_micro_usd
        s[11] += r.latency_ms
    return [k + tuple(v) for k, v in sums.items()]


def _record_dict(r: InteractionRecord) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(r)
    data["created_at"] = r.created_at.isoformat()
    for a in data["attempts"]:
        a["started_at"] = a["started_at"].isoformat()
    return data
