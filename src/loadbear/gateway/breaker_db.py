"""Circuit-breaker state in the database, shared by every worker and replica on it.

The same state machine as :class:`~loadbear.gateway.breaker.RedisBreakerStore`, on the table
``breaker_state`` (migration 0011) of SQLite or PostgreSQL, for deployments without Redis:

* **Reads are local.** Each store keeps a view of the whole table and re-reads it (one SELECT of
  a few rows) at most every ``refresh_s`` (250 ms by default), so ``allow`` on a closed breaker,
  or on an open one still cooling down, is a dict lookup with no round trip. The staleness bound
  is safe because the view only ever decides "call" or "skip": a replica that has not yet seen
  another's trip sends at most ``refresh_s`` worth of extra requests to that model, which are
  ordinary attempts (retried, failed over, recorded) just like the requests that were already in
  flight when the breaker opened; one that has not yet seen a close skips a healthy model for at
  most ``refresh_s`` and fails over along its chain. The one decision that must be exact across
  replicas, who gets the half-open probe, is never taken from the view. A store's own writes
  update its view at once (and a refresh that started before them does not undo them).
* **The probe is one conditional UPDATE** (open and cooled down, or half-open with a free or
  expired claim) that sets ``probe_until = now + probe_timeout`` and a random ``probe_id`` (so
  a release frees only its own claim). PostgreSQL re-checks the WHERE
  clause on the newest row version after waiting for a concurrent writer; SQLite runs writers one
  at a time (across processes too); so exactly one replica's UPDATE matches. A prober that died
  leaves a claim that expires by itself. Within one process, concurrent ``allow`` calls that find
  the probe up for grabs send one UPDATE; the others skip.
* **Writes only on failures and transitions**: a failure is one UPSERT that counts it and trips
  the breaker when due; a success writes only when the view shows the breaker not closed or with
  failures on the count (so a healthy model writes nothing; a count another replica left is reset
  by the first success after the next refresh).
* **Health figures** (recent error rate and latency for ``/admin/providers``) stay per process:
  sharing them would cost a write per call, which is what this design avoids.

The table is not tenant-owned (no ``tenant_id``, no row-level security); the store still works
through ``app_tx`` (the application role, which the migrations grant data rights on every table)
because this is request-path traffic, not administration.

Database calls are synchronous, so they run in worker threads; the request path waits at most
``timeout_s`` for them (a slow database must not stall requests: the stale view answers, and a
probe claim that lands after its caller gave up is released). If the database fails, the store
uses in-process state (:class:`MemoryBreakerStore`) until it answers again, and says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from loadbear.gateway.breaker import CLOSED, HALF_OPEN, OPEN, MemoryBreakerStore, ModelHealth, health_summary
from loadbear.storage.db import Database

log = logging.getLogger("loadbear.breaker")

_COLS = "breaker_key, state, failures, opened_at, probe_until, trips"

# Count a failure; trip when half-open, or closed and at the threshold. SET expressions see the
# row as it was, on both backends.
_TRIP = "(breaker_state.state = 'half_open' OR (breaker_state.state = 'closed' AND breaker_state.failures + 1 >= ?))"
_FAILURE_SQL = (
    "INSERT INTO breaker_state (breaker_key, state, failures, opened_at, probe_until, trips, updated_at)"
    " VALUES (?, ?, 1, ?, NULL, ?, ?)"
    " ON CONFLICT (breaker_key) DO UPDATE SET"
    f" state = CASE WHEN {_TRIP} THEN 'open' ELSE breaker_state.state END,"
    f" opened_at = CASE WHEN {_TRIP} THEN excluded.opened_at ELSE breaker_state.opened_at END,"
    f" probe_until = CASE WHEN {_TRIP} THEN NULL ELSE breaker_state.probe_until END,"
    f" trips = breaker_state.trips + CASE WHEN {_TRIP} THEN 1 ELSE 0 END,"
    " failures = breaker_state.failures + 1,"
    " updated_at = excluded.updated_at"
    f" RETURNING {_COLS}"
)
_SUCCESS_SQL = (
    "UPDATE breaker_state SET state = 'closed', failures = 0, probe_until = NULL, probe_id = NULL, updated_at = ?"
    " WHERE breaker_key = ? AND (state <> 'closed' OR failures <> 0)"
    f" RETURNING {_COLS}"
)
_CLAIM_SQL = (
    "UPDATE breaker_state SET state = 'half_open', probe_until = ?, probe_id = ?, updated_at = ?"
    " WHERE breaker_key = ? AND ((state = 'open' AND opened_at + ? <= ?)"
    " OR (state = 'half_open' AND (probe_until IS NULL OR probe_until <= ?)))"
    f" RETURNING {_COLS}"
)
_RELEASE_SQL = (
    "UPDATE breaker_state SET probe_until = NULL, probe_id = NULL, updated_at = ?"
    " WHERE breaker_key = ? AND state = 'half_open' AND probe_id = ?"
    f" RETURNING {_COLS}"
)


@dataclass
class _View:
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probe_until: float | None = None
    trips: int = 0

    @classmethod
    def of(cls, row: dict[str, Any]) -> "_View":
        pu = row.get("probe_until")
        return cls(str(row["state"]), int(row["failures"]), float(row["opened_at"] or 0.0),
                   None if pu is None else float(pu), int(row["trips"]))


_CLOSED_VIEW = _View()


class DatabaseBreakerStore:
    """Breaker state in ``breaker_state``, shared by every process using the same database."""

    name = "database"
    shared = True

    def __init__(
        self,
        db: Database,
        threshold: int = 5,
        cooldown: float = 30.0,
        probe_timeout: float = 60.0,
        refresh_s: float = 0.25,
        timeout_s: float = 0.5,
    ) -> None:
        self.db = db
        self.threshold = int(threshold)
        self.cooldown = float(cooldown)
        self.probe_timeout = float(probe_timeout)
        self.refresh_s = float(refresh_s)
        self.timeout_s = float(timeout_s)
        self._views: dict[str, _View] = {}
        self._read_at = float("-inf")  # monotonic start of the last successful table read
        self._written_at: dict[str, float] = {}  # monotonic time of this store's last write per key
        self._refresh: asyncio.Task | None = None
        self._claiming: set[str] = set()
        self._claims: dict[str, str] = {}  # key -> token of the half-open probe this store holds
        self._health: dict[str, ModelHealth] = {}
        self._seen: set[str] = set()
        # Used while the database fails, so requests never fail because of the breaker store.
        self.fallback = MemoryBreakerStore(threshold, cooldown, probe_timeout)
        self.degraded = False
        self.errors = 0
        self.reads = 0  # table reads (refreshes): what the local view saves is visible in tests
        self.writes = 0
        self._last_warning = 0.0

    # -- plumbing (the *_now methods run in worker threads)

    def _read_all_now(self) -> list[dict[str, Any]]:
        with self.db.app_tx(write=False) as c:
            return c.fetchall(f"SELECT {_COLS} FROM breaker_state")

    def _write_now(self, sql: str, params: tuple, fallback_select: str | None = None
                   ) -> tuple[bool, dict[str, Any] | None]:
        """(whether the statement changed a row, the row as it is now)."""
        with self.db.app_tx() as c:
            row = c.fetchone(sql, params)
            if row is not None:
                return True, row
            if fallback_select is not None:
                row = c.fetchone(f"SELECT {_COLS} FROM breaker_state WHERE breaker_key = ?", (fallback_select,))
            return False, row

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.degraded = True
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning("breaker store: database unavailable (%s); using in-process breaker state", exc)

    def _apply(self, key: str, row: dict[str, Any] | None) -> _View:
        """Take the row a write of ours returned (None: no row changed, i.e. closed) as the view."""
        view = _View.of(row) if row is not None else _View(trips=self._views.get(key, _CLOSED_VIEW).trips)
        self._views[key] = view
        self._written_at[key] = time.monotonic()
        return view

    async def _refresh_view(self) -> None:
        started = time.monotonic()
        rows = await asyncio.to_thread(self._read_all_now)
        self.reads += 1
        fresh = {str(r["breaker_key"]): _View.of(r) for r in rows}
        # A write of ours that finished after this read began is newer than what the read saw.
        for key, at in self._written_at.items():
            if at > started and key in self._views:
                fresh[key] = self._views[key]
        self._views = fresh
        self._written_at = {k: at for k, at in self._written_at.items() if at > started}
        self._read_at = started
        self.degraded = False

    async def _fresh(self) -> bool:
        """Make the view at most ``refresh_s`` old, give or take one read.

        The caller that finds the view stale starts a read; callers that arrive while it is in
        flight wait for the same read (so a replica that just started never answers from an
        empty view). Nobody waits more than ``timeout_s``: past that the stale view answers and
        the read lands when it lands. False when the database failed: the caller uses the
        in-process fallback.
        """
        if time.monotonic() - self._read_at < self.refresh_s:
            return not self.degraded
        loop = asyncio.get_running_loop()
        task = self._refresh
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._refresh = loop.create_task(self._refresh_view())
        try:
            await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
        except asyncio.TimeoutError:
            return not self.degraded
        except Exception as exc:  # noqa: BLE001 - any database failure: degrade, never fail the request
            self._failed(exc)
            # Do not hammer a database that is down: try again after another refresh interval.
            self._read_at = time.monotonic()
            return False
        return True

    async def _write(self, key: str, sql: str, params: tuple, select_if_none: bool = False,
                     on_late=None) -> tuple[bool, bool, dict[str, Any] | None]:
        """Run one write in a thread: (finished in time, changed a row, the row). Raises on
        database errors. A write that outlives ``timeout_s`` still updates the view when it
        lands, and then calls ``on_late(changed)``."""
        task = asyncio.ensure_future(asyncio.to_thread(self._write_now, sql, params, key if select_if_none else None))
        self.writes += 1
        try:
            changed, row = await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            # Too slow, or the request was cancelled meanwhile: the write still happens.
            def late(t: asyncio.Future) -> None:
                if t.cancelled() or t.exception() is not None:
                    return
                changed, row = t.result()
                if row is not None or not select_if_none:
                    self._apply(key, row)
                if on_late is not None:
                    on_late(changed)
            task.add_done_callback(late)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False, False, None
        return True, changed, row

    # -- the store API

    async def allow(self, key: str, now: float) -> bool:
        self._seen.add(key)
        if not await self._fresh():
            return await self.fallback.allow(key, now)
        view = self._views.get(key, _CLOSED_VIEW)
        if view.state == CLOSED:
            return True
        if view.state == OPEN and now - view.opened_at < self.cooldown:
            return False
        if view.state == HALF_OPEN and view.probe_until is not None and now < view.probe_until:
            return False
        if key in self._claiming:
            return False  # this process is already asking for the probe: only one can have it
        self._claiming.add(key)
        token = uuid.uuid4().hex

        def gave_up(changed: bool) -> None:
            # The claim landed after its caller stopped waiting: free it for the next request.
            if changed:
                asyncio.ensure_future(self._release_claim(key, token))

        try:
            in_time, won, row = await self._write(
                key, _CLAIM_SQL, (now + self.probe_timeout, token, now, key, self.cooldown, now, now),
                select_if_none=True, on_late=gave_up)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return await self.fallback.allow(key, now)
        finally:
            self._claiming.discard(key)
        if not in_time:
            return False
        view = self._apply(key, row)
        if won:
            self._claims[key] = token
            return True
        return view.state == CLOSED  # closed by someone else meanwhile

    async def record(self, key: str, ok: bool, latency_ms: int, now: float) -> str:
        self._seen.add(key)
        h = self._health.get(key)
        if h is None:
            h = self._health[key] = ModelHealth()
        h.add(ok, latency_ms, now)
        if self.degraded:
            return await self.fallback.record(key, ok, latency_ms, now)
        self._claims.pop(key, None)
        try:
            if ok:
                # A long request's view may be stale; refreshing is free when it is not.
                if not await self._fresh():
                    return await self.fallback.record(key, ok, latency_ms, now)
                view = self._views.get(key, _CLOSED_VIEW)
                if view.state == CLOSED and view.failures == 0:
                    return CLOSED  # the common case: nothing to write
                in_time, _, row = await self._write(key, _SUCCESS_SQL, (now, key))
                if in_time:
                    self._apply(key, row)
                return CLOSED
            view = self._views.get(key, _CLOSED_VIEW)
            trip = 1 if self.threshold <= 1 else 0
            in_time, _, row = await self._write(
                key, _FAILURE_SQL, (key, OPEN if trip else CLOSED, now, trip, now, self.threshold, self.threshold,
                                    self.threshold, self.threshold))
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return await self.fallback.record(key, ok, latency_ms, now)
        if not in_time:
            return view.state  # the write lands later and updates the view then
        return self._apply(key, row).state

    async def _release_claim(self, key: str, token: str) -> None:
        try:
            _, changed, row = await self._write(key, _RELEASE_SQL, (time.time(), key, token))
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return
        if changed:
            self._apply(key, row)

    async def release(self, key: str) -> None:
        """Free the half-open probe this store holds (a no-op, and no write, otherwise)."""
        if self.degraded:
            await self.fallback.release(key)
            return
        token = self._claims.pop(key, None)
        if token is not None:
            await self._release_claim(key, token)

    # -- admin (sync: the admin page, the CLI, tests)

    def snapshot(self, key: str, now: float) -> dict[str, Any]:
        try:
            with self.db.app_tx(write=False) as c:
                row = c.fetchone(f"SELECT {_COLS} FROM breaker_state WHERE breaker_key = ?", (key,))
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return {**self.fallback.snapshot(key, now), "store": "memory (database unavailable)"}
        v = _View.of(row) if row is not None else _View()
        state = v.state
        if state == OPEN and now - v.opened_at >= self.cooldown:
            state = HALF_OPEN  # what the next request will find
        out: dict[str, Any] = {
            "breaker": state,
            "consecutive_failures": v.failures,
            "trips": v.trips,
            "opened_seconds_ago": round(now - v.opened_at, 3) if v.state != CLOSED else None,
            "health_scope": "process",
        }
        h = self._health.get(key)
        out.update(h.summary(now) if h else health_summary((), now))
        return out

    def keys(self) -> list[str]:
        found = set(self._seen)
        try:
            with self.db.app_tx(write=False) as c:
                found.update(str(r["breaker_key"]) for r in c.fetchall("SELECT breaker_key FROM breaker_state"))
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
        return sorted(found)

    def reset(self, key: str | None = None) -> None:
        """Forget state (every breaker when ``key`` is None), for every replica on the database."""
        self.fallback.reset(key)
        try:
            with self.db.app_tx() as c:
                if key is None:
                    c.execute("DELETE FROM breaker_state")
                else:
                    c.execute("DELETE FROM breaker_state WHERE breaker_key = ?", (key,))
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
        if key is None:
            self._views, self._health, self._claims = {}, {}, {}
        else:
            for d in (self._views, self._health, self._claims):
                d.pop(key, None)
        self._read_at = float("-inf")

    async def aclose(self) -> None:
        # The database belongs to the Gateway; a refresh still in a thread just finishes.
        self._refresh = None
