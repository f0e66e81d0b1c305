"""Monthly budgets per tenant: atomic worst-case reservations, a soft threshold, a hard limit.

Before a request runs, :meth:`BudgetGuard.admit` reserves its **worst-case cost** — prompt
tokens plus ``max_tokens`` (or ``default_max_tokens`` when the request sets none) at the
priciest model of its chain — against the tenant's ``monthly_budget_usd`` for the current UTC
month. The reservation succeeds only if ``spent + reserved + amount <= budget``, checked and
applied in one atomic step, so however many requests (and replicas) race, the month's spend
stays within the budget as long as every request costs at most its estimate; a request that
runs over it (no ``max_tokens`` and a longer answer than the default cap, a failed attempt
charged on top of the answer) overspends by at most its own excess. When the request ends,
:meth:`settle` releases the reservation and adds the actual cost.

Spend's source of truth is the ledger (``usage_daily``). The counter a store keeps per tenant
and month starts from the month's ledger spend, adds every settled cost (the ledger writes rows
in batches, so it lags), and is re-synced as ``max(counter, ledger)`` every ``sync_interval_s``
(in the background), which also frees reservations whose lease expired (a replica died
holding them).

Stores (all atomic across the processes that share them):

* :class:`RedisBudgetStore` — one Lua script per reserve/settle (``LOADBEAR_REDIS_URL``); if
  Redis is unreachable it degrades to its fallback store (the database one when built from
  settings) and says so in the logs, never failing a request because of Redis;
* :class:`DatabaseBudgetStore` — a ``budget_counters`` row per tenant and month, reserved by
  one conditional ``UPDATE ... WHERE spent + reserved + amount <= limit`` (migration 0009,
  both backends, under row-level security on PostgreSQL);
* :class:`MemoryBudgetStore` — in-process, under a lock (tests, embedded single-process use).

Events: when a reservation takes the month to ``budget_soft_ratio`` of the budget,
``budget.soft_threshold`` is logged and POSTed (fire-and-forget) to the tenant's
``budget_webhook_url``; the first request refused or downgraded by the hard limit emits
``budget.hard_limit`` the same way. Each fires once per tenant, month and budget value,
across replicas (the flag lives in the store).

Hard limit (``budget_hard_action``): ``downgrade_then_refuse`` (default) first tries the chain
of the tenant's cheapest allowed tier (whose worst case may still fit), then refuses;
``refuse`` refuses at once. A refusal is HTTP 402 ``budget_exceeded`` with what was spent,
what is held, what this request could cost and when the budget resets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Callable, Protocol, Sequence

from loadbear.gateway.errors import ApiError
from loadbear.gateway.redis_scripts import RedisScripts
from loadbear.providers.base import ModelConfig
from loadbear.providers.tokens import count_messages
from loadbear.storage.db import Database
from loadbear.storage.values import db_day

log = logging.getLogger("loadbear.budget")

MICRO = 1_000_000
DEFAULT_MAX_TOKENS = 4096
DEFAULT_LEASE_S = 600.0
DEFAULT_SYNC_INTERVAL_S = 60.0
SOFT_EVENT = "budget.soft_threshold"
HARD_EVENT = "budget.hard_limit"

Key = tuple[str, str]  # (tenant id, "YYYY-MM")


# -- money, months, tokens --------------------------------------------------------------------


def usd_to_micro(usd: float | int | None) -> int | None:
    return None if usd is None else int(round(float(usd) * MICRO))


def micro_to_usd(micro: int) -> float:
    return round(micro / MICRO, 6)


def current_month(now: float | datetime | None = None) -> str:
    """The UTC month of ``now`` (epoch seconds or datetime) as ``YYYY-MM``."""
    if now is None:
        dt = datetime.now(timezone.utc)
    elif isinstance(now, datetime):
        dt = now.astimezone(timezone.utc) if now.tzinfo else now
    else:
        dt = datetime.fromtimestamp(now, timezone.utc)
    return f"{dt.year:04d}-{dt.month:02d}"


def month_bounds(month: str) -> tuple[date, date]:
    """First day of ``month`` and first day of the next one."""
    try:
        y, m = (int(p) for p in month.split("-"))
        start = date(y, m, 1)
    except (ValueError, TypeError):
        raise ValueError(f"month must look like 2026-05, not {month!r}") from None
    return start, date(y + (m == 12), 1 if m == 12 else m + 1, 1)


def month_spend(db: Database, tenant_id: str, month: str) -> int:
    """The tenant's spend in ``month`` according to the ledger rollups (micro-USD)."""
    start, end = month_bounds(month)
    with db.tenant_tx(tenant_id, write=False) as c:
        v = c.scalar(
            "SELECT COALESCE(SUM(cost_micro_usd), 0) FROM usage_daily WHERE tenant_id = ? AND day >= ? AND day < ?",
            (tenant_id, db_day(db.dialect, start), db_day(db.dialect, end)),
        )
    return int(v or 0)


def prompt_tokens(messages: Sequence[dict[str, Any]], model: ModelConfig | None = None) -> int:
    """Prompt tokens of a chat (OpenAI's counting recipe, offline)."""
    return count_messages(messages, model.tokenizer) if model is not None else count_messages(messages)


def worst_case_micro_usd(chain: Sequence[ModelConfig], prompt_tokens: int, max_tokens: int | None,
                         default_max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """The most a request can cost on any model of its chain (uncached input, full answer), rounded up."""
    completion = max_tokens if max_tokens is not None and max_tokens > 0 else default_max_tokens
    worst = 0.0
    for m in chain:
        # price per 1M tokens in USD == price per token in micro-USD
        worst = max(worst, prompt_tokens * float(m.input_price) + completion * float(m.output_price))
    return int(math.ceil(worst - 1e-9)) if worst > 0 else 0


# -- results ----------------------------------------------------------------------------------


@dataclass
class Reservation:
    """Budget held for one request; hand it back with :meth:`BudgetGuard.settle`."""

    tenant_id: str
    month: str
    amount: int  # micro-USD held
    id: str = ""
    limit: int | None = None  # the budget (micro-USD); None: the tenant has no budget
    spent: int = 0  # the month's spend when reserved
    reserved: int = 0  # everything held in flight, this reservation included
    soft: bool = False  # the month is at or over the soft threshold
    via: str = ""  # the store that holds it
    settled: bool = False

    @property
    def unlimited(self) -> bool:
        return self.limit is None


@dataclass
class Refusal:
    """The hard limit: ``amount`` does not fit next to what is spent and held."""

    tenant_id: str
    month: str
    amount: int
    limit: int
    spent: int
    reserved: int
    soft: bool = True
    hard: bool = True

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.spent - self.reserved)


@dataclass
class Admission:
    """What :meth:`BudgetGuard.admit` let through: the chain to call (maybe downgraded) and the hold."""

    chain: list[ModelConfig]
    reservation: Reservation | None
    downgraded: bool = False
    note: str | None = None  # for the route reason when downgraded


@dataclass
class StoreAnswer:
    ok: bool
    spent: int
    reserved: int
    events: tuple[str, ...] = ()  # "soft" / "hard": this call was the first to cross it
    via: str = ""


# -- stores -----------------------------------------------------------------------------------


class BudgetStore(Protocol):
    name: str

    async def reserve(self, key: Key, rid: str, amount: int, limit: int, soft_limit: int, now: float,
                      expires_at: float) -> StoreAnswer | None:
        """None when the month's counter does not exist yet (the guard then calls :meth:`init`)."""

    async def init(self, key: Key, spent: int) -> None: ...

    async def settle(self, key: Key, rid: str, actual: int, via: str = "") -> None: ...

    async def sync(self, key: Key, ledger_spent: int, now: float) -> None:
        """``spent = max(spent, ledger_spent)``; free reservations whose lease expired."""

    def snapshot(self, key: Key) -> dict[str, int] | None: ...

    async def aclose(self) -> None: ...


@dataclass
class _Counter:
    spent: int = 0
    reserved: int = 0
    soft_notified: int = -1
    hard_notified: int = -1
    leases: dict[str, tuple[int, float]] = field(default_factory=dict)
    next_expiry: float = math.inf


class MemoryBudgetStore:
    """Counters in this process, under one lock (also safe from threads)."""

    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[Key, _Counter] = {}

    @staticmethod
    def _purge(c: _Counter, now: float) -> None:
        if now < c.next_expiry:
            return
        nxt = math.inf
        for rid, (amount, exp) in list(c.leases.items()):
            if exp <= now:
                del c.leases[rid]
                c.reserved -= amount
            else:
                nxt = min(nxt, exp)
        c.next_expiry = nxt

    def reserve_now(self, key: Key, rid: str, amount: int, limit: int, soft_limit: int, now: float,
                    expires_at: float) -> StoreAnswer | None:
        with self._lock:
            c = self._counters.get(key)
            if c is None:
                return None
            self._purge(c, now)
            if c.spent + c.reserved + amount > limit:
                events: tuple[str, ...] = ()
                if c.hard_notified < limit:
                    c.hard_notified = limit
                    events = ("hard",)
                return StoreAnswer(False, c.spent, c.reserved, events, self.name)
            c.reserved += amount
            c.leases[rid] = (amount, expires_at)
            c.next_expiry = min(c.next_expiry, expires_at)
            events = ()
            if c.spent + c.reserved >= soft_limit and c.soft_notified < soft_limit:
                c.soft_notified = soft_limit
                events = ("soft",)
            return StoreAnswer(True, c.spent, c.reserved, events, self.name)

    def init_now(self, key: Key, spent: int) -> None:
        with self._lock:
            self._counters.setdefault(key, _Counter(spent=int(spent)))

    def settle_now(self, key: Key, rid: str, actual: int) -> None:
        with self._lock:
            c = self._counters.get(key)
            if c is None:
                return  # the next reservation re-reads the ledger, which has (or will have) this cost
            lease = c.leases.pop(rid, None)
            if lease is not None:
                c.reserved -= lease[0]
            c.spent += int(actual)

    def sync_now(self, key: Key, ledger_spent: int, now: float) -> None:
        with self._lock:
            c = self._counters.get(key)
            if c is None:
                return
            c.next_expiry = min(c.next_expiry, now)
            self._purge(c, now)
            c.spent = max(c.spent, int(ledger_spent))

    async def reserve(self, key, rid, amount, limit, soft_limit, now, expires_at):
        return self.reserve_now(key, rid, amount, limit, soft_limit, now, expires_at)

    async def init(self, key: Key, spent: int) -> None:
        self.init_now(key, spent)

    async def settle(self, key: Key, rid: str, actual: int, via: str = "") -> None:
        self.settle_now(key, rid, actual)

    async def sync(self, key: Key, ledger_spent: int, now: float) -> None:
        self.sync_now(key, ledger_spent, now)

    def snapshot(self, key: Key) -> dict[str, int] | None:
        with self._lock:
            c = self._counters.get(key)
            if c is None:
                return None
            return {"spent": c.spent, "reserved": c.reserved, "soft_notified": c.soft_notified,
                    "hard_notified": c.hard_notified, "in_flight": len(c.leases)}

    def reset(self) -> None:
        with self._lock:
            self._counters.clear()

    async def aclose(self) -> None:
        return None


class DatabaseBudgetStore:
    """``budget_counters`` / ``budget_reservations`` (migration 0009) on SQLite or PostgreSQL.

    A reservation is one conditional UPDATE of the tenant's counter row: PostgreSQL re-checks
    the WHERE clause on the latest row version after waiting for a concurrent writer, SQLite
    runs writers one at a time, so two replicas can never both take the last of a budget.
    Work runs in worker threads (the database calls are synchronous).
    """

    name = "database"

    def __init__(self, db: Database) -> None:
        self.db = db

    def reserve_now(self, key: Key, rid: str, amount: int, limit: int, soft_limit: int, now: float,
                    expires_at: float) -> StoreAnswer | None:
        tenant_id, month = key
        with self.db.tenant_tx(tenant_id) as c:
            # On PostgreSQL (read committed) the SELECT after a refused UPDATE sees a newer state:
            # if a settlement made room in between, try again, so a refusal always reports
            # figures that really do not fit (bounded: every retry means another request settled).
            for _ in range(20):
                row = c.fetchone(
                    "UPDATE budget_counters SET reserved_micro_usd = reserved_micro_usd + ?"
                    " WHERE tenant_id = ? AND month = ? AND spent_micro_usd + reserved_micro_usd + ? <= ?"
                    " RETURNING spent_micro_usd AS spent, reserved_micro_usd AS reserved,"
                    " soft_notified_micro_usd AS soft_notified",
                    (amount, tenant_id, month, amount, limit),
                )
                if row is not None:
                    break
                refused = c.fetchone(
                    "SELECT spent_micro_usd AS spent, reserved_micro_usd AS reserved,"
                    " hard_notified_micro_usd AS hard_notified FROM budget_counters WHERE tenant_id = ? AND month = ?",
                    (tenant_id, month),
                )
                if refused is None:
                    return None
                if int(refused["spent"]) + int(refused["reserved"]) + amount > limit:
                    break
            if row is None:
                row = refused
                events: tuple[str, ...] = ()
                if int(row["hard_notified"]) < limit and c.fetchone(
                    "UPDATE budget_counters SET hard_notified_micro_usd = ?"
                    " WHERE tenant_id = ? AND month = ? AND hard_notified_micro_usd < ? RETURNING 1 AS ok",
                    (limit, tenant_id, month, limit),
                ):
                    events = ("hard",)
                return StoreAnswer(False, int(row["spent"]), int(row["reserved"]), events, self.name)
            c.execute(
                "INSERT INTO budget_reservations (id, tenant_id, month, amount_micro_usd, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (rid, tenant_id, month, amount, float(expires_at)),
            )
            spent, reserved = int(row["spent"]), int(row["reserved"])
            events = ()
            if spent + reserved >= soft_limit and int(row["soft_notified"]) < soft_limit and c.fetchone(
                "UPDATE budget_counters SET soft_notified_micro_usd = ?"
                " WHERE tenant_id = ? AND month = ? AND soft_notified_micro_usd < ? RETURNING 1 AS ok",
                (soft_limit, tenant_id, month, soft_limit),
            ):
                events = ("soft",)
            return StoreAnswer(True, spent, reserved, events, self.name)

    def init_now(self, key: Key, spent: int) -> None:
        tenant_id, month = key
        with self.db.tenant_tx(tenant_id) as c:
            c.execute(
                "INSERT INTO budget_counters (tenant_id, month, spent_micro_usd) VALUES (?, ?, ?)"
                " ON CONFLICT (tenant_id, month) DO NOTHING",
                (tenant_id, month, int(spent)),
            )

    def settle_now(self, key: Key, rid: str, actual: int) -> None:
        tenant_id, month = key
        with self.db.tenant_tx(tenant_id) as c:
            row = c.fetchone("DELETE FROM budget_reservations WHERE id = ? RETURNING amount_micro_usd AS amount", (rid,))
            held = int(row["amount"]) if row else 0
            c.execute(
                "UPDATE budget_counters SET reserved_micro_usd = reserved_micro_usd - ?,"
                " spent_micro_usd = spent_micro_usd + ? WHERE tenant_id = ? AND month = ?",
                (held, int(actual), tenant_id, month),
            )

    def sync_now(self, key: Key, ledger_spent: int, now: float) -> None:
        tenant_id, month = key
        with self.db.tenant_tx(tenant_id) as c:
            rows = c.fetchall(
                "DELETE FROM budget_reservations WHERE tenant_id = ? AND month = ? AND expires_at <= ?"
                " RETURNING amount_micro_usd AS amount",
                (tenant_id, month, float(now)),
            )
            freed = sum(int(r["amount"]) for r in rows)
            c.execute(
                "UPDATE budget_counters SET reserved_micro_usd = reserved_micro_usd - ?,"
                " spent_micro_usd = CASE WHEN spent_micro_usd < ? THEN ? ELSE spent_micro_usd END"
                " WHERE tenant_id = ? AND month = ?",
                (freed, int(ledger_spent), int(ledger_spent), tenant_id, month),
            )

    async def reserve(self, key, rid, amount, limit, soft_limit, now, expires_at):
        return await asyncio.to_thread(self.reserve_now, key, rid, amount, limit, soft_limit, now, expires_at)

    async def init(self, key: Key, spent: int) -> None:
        await asyncio.to_thread(self.init_now, key, spent)

    async def settle(self, key: Key, rid: str, actual: int, via: str = "") -> None:
        await asyncio.to_thread(self.settle_now, key, rid, actual)

    async def sync(self, key: Key, ledger_spent: int, now: float) -> None:
        await asyncio.to_thread(self.sync_now, key, ledger_spent, now)

    def snapshot(self, key: Key) -> dict[str, int] | None:
        tenant_id, month = key
        with self.db.tenant_tx(tenant_id, write=False) as c:
            row = c.fetchone(
                "SELECT spent_micro_usd AS spent, reserved_micro_usd AS reserved,"
                " soft_notified_micro_usd AS soft_notified, hard_notified_micro_usd AS hard_notified,"
                " (SELECT COUNT(*) FROM budget_reservations r WHERE r.tenant_id = ? AND r.month = ?) AS in_flight"
                " FROM budget_counters WHERE tenant_id = ? AND month = ?",
                (tenant_id, month, tenant_id, month),
            )
        return {k: int(v) for k, v in row.items()} if row else None

    async def aclose(self) -> None:
        return None


# Lua: one round trip per step, atomic across replicas. KEYS: counter hash, lease zset (by
# expiry), lease amounts hash. Amounts are integers (micro-USD), passed as strings.
_PURGE_LUA = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV_NOW)
for _, id in ipairs(expired) do
  local a = redis.call('HGET', KEYS[3], id)
  if a then redis.call('HINCRBY', KEYS[1], 'reserved', 0 - tonumber(a)) end
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[2], id)
end
"""

_RESERVE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, 0, 0} end
""" + _PURGE_LUA.replace("ARGV_NOW", "ARGV[5]") + """
local c = redis.call('HMGET', KEYS[1], 'spent', 'reserved', 'soft', 'hard')
local spent = tonumber(c[1] or '0')
local reserved = tonumber(c[2] or '0')
local amount = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local soft = tonumber(ARGV[4])
if spent + reserved + amount > limit then
  local ev = 0
  if tonumber(c[4] or '-1') < limit then
    redis.call('HSET', KEYS[1], 'hard', ARGV[3])
    ev = 2
  end
  return {0, spent, reserved, ev}
end
reserved = redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
local ev = 0
if spent + reserved >= soft and tonumber(c[3] or '-1') < soft then
  redis.call('HSET', KEYS[1], 'soft', ARGV[4])
  ev = 1
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[7]) end
return {1, spent, reserved, ev}
"""

_INIT_LUA = """
redis.call('HSETNX', KEYS[1], 'spent', ARGV[1])
redis.call('HSETNX', KEYS[1], 'reserved', '0')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

_SETTLE_LUA = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
local a = redis.call('HGET', KEYS[3], ARGV[1])
if a then
  if exists then redis.call('HINCRBY', KEYS[1], 'reserved', 0 - tonumber(a)) end
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if exists then redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2]) end
return 1
"""

_SYNC_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
""" + _PURGE_LUA.replace("ARGV_NOW", "ARGV[2]") + """
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
if spent < tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], 'spent', ARGV[1]) end
return 1
"""


class RedisBudgetStore(RedisScripts):
    """Counters in Redis, shared by every replica using the same ``prefix``.

    Keys per tenant and month (one hash tag, so a cluster keeps them on one node):
    ``{prefix}{tenant:month}`` (hash: spent, reserved, soft, hard), ``...:leases`` (zset of
    reservation ids by expiry) and ``...:amounts`` (hash id → amount), all expiring
    ``ttl_s`` after the last reservation.
    """

    name = "redis"
    _logger = log

    def __init__(self, url: str, *, prefix: str = "loadbear:budget:", fallback: BudgetStore | None = None,
                 ttl_s: int = 40 * 86_400, timeout_s: float = 0.25) -> None:
        super().__init__(url, prefix=prefix, ttl_s=ttl_s, timeout_s=timeout_s,
                         scripts={"reserve": _RESERVE_LUA, "init": _INIT_LUA, "settle": _SETTLE_LUA,
                                  "sync": _SYNC_LUA})
        self.fallback: BudgetStore = fallback or MemoryBudgetStore()
        self.unavailable_warning = f"budget store: Redis unavailable (%s); using the {self.fallback.name} store"

    def _keys(self, key: Key) -> list[str]:
        base = f"{self.prefix}{{{key[0]}:{key[1]}}}"
        return [base, base + ":leases", base + ":amounts"]

    async def _run(self, name: str, key: Key, args: list[Any]) -> Any:
        return await self._script(name, self._keys(key), args)

    async def reserve(self, key, rid, amount, limit, soft_limit, now, expires_at):
        try:
            ok, spent, reserved, ev = await self._run(
                "reserve", key, [rid, int(amount), int(limit), int(soft_limit), repr(float(now)),
                                 repr(float(expires_at)), self.ttl_s])
        except Exception as exc:  # noqa: BLE001 - any Redis failure: degrade, never fail the request
            self._failed(exc)
            return await self.fallback.reserve(key, rid, amount, limit, soft_limit, now, expires_at)
        if int(ok) == -1:
            return None
        events = {1: ("soft",), 2: ("hard",)}.get(int(ev), ())
        return StoreAnswer(bool(int(ok)), int(spent), int(reserved), events, self.name)

    async def init(self, key: Key, spent: int) -> None:
        try:
            await self._run("init", key, [int(spent), self.ttl_s])
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            await self.fallback.init(key, spent)

    async def settle(self, key: Key, rid: str, actual: int, via: str = "") -> None:
        if via and via != self.name:
            await self.fallback.settle(key, rid, actual)
            return
        try:
            await self._run("settle", key, [rid, int(actual)])
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            await self.fallback.settle(key, rid, actual)

    async def sync(self, key: Key, ledger_spent: int, now: float) -> None:
        try:
            await self._run("sync", key, [int(ledger_spent), repr(float(now))])
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
        await self.fallback.sync(key, ledger_spent, now)

    def snapshot(self, key: Key) -> dict[str, int] | None:
        base, leases, _ = self._keys(key)
        try:
            pipe = self._sync.pipeline(transaction=False)
            pipe.hgetall(base)
            pipe.zcard(leases)
            raw, in_flight = pipe.execute()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return self.fallback.snapshot(key)
        if not raw:
            return None
        return {"spent": int(raw.get("spent") or 0), "reserved": int(raw.get("reserved") or 0),
                "soft_notified": int(raw.get("soft") or -1), "hard_notified": int(raw.get("hard") or -1),
                "in_flight": int(in_flight)}

    def reset(self, key: Key | None = None) -> None:
        """Forget counters (all under the prefix when ``key`` is None)."""
        self._delete(None if key is None else self._keys(key))

    async def aclose(self) -> None:
        await self._close_clients()
        await self.fallback.aclose()


# -- the guard --------------------------------------------------------------------------------


class BudgetGuard:
    """Budgets of every tenant over one store. One per gateway.

    ``db`` (optional) is the ledger the counters start from and re-sync with; without it a
    month starts at zero. ``clock`` gives epoch seconds (month, lease expiry); ``on_event`` is
    called with ``(event, payload)`` besides the log line and the webhook.
    """

    def __init__(
        self,
        db: Database | None = None,
        store: BudgetStore | None = None,
        *,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        lease_s: float = DEFAULT_LEASE_S,
        sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S,
        webhook_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.db = db
        self.store: BudgetStore = store or (DatabaseBudgetStore(db) if db is not None else MemoryBudgetStore())
        self.default_max_tokens = int(default_max_tokens)
        self.lease_s = float(lease_s)
        self.sync_interval_s = float(sync_interval_s)
        self.webhook_timeout_s = float(webhook_timeout_s)
        self.clock = clock
        self.on_event = on_event
        self._synced: dict[Key, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_settings(cls, settings: Any, db: Database | None = None, **kw: Any) -> "BudgetGuard":
        """Redis (falling back to the database) when ``redis_url`` is set, else the database.

        Optional settings read here: ``budget_store`` ("auto" | "redis" | "database" | "memory"),
        ``budget_key_prefix``, ``budget_default_max_tokens``, ``budget_sync_interval_s``,
        ``budget_lease_s`` (default: twice the request deadline plus a minute, at least 120 s).
        """
        kind = getattr(settings, "budget_store", "auto") or "auto"
        url = getattr(settings, "redis_url", None)
        db_store: BudgetStore = DatabaseBudgetStore(db) if db is not None else MemoryBudgetStore()
        if kind == "memory":
            store: BudgetStore = MemoryBudgetStore()
        elif kind == "database" or (kind == "auto" and not url):
            store = db_store
        elif url:
            store = RedisBudgetStore(url, prefix=getattr(settings, "budget_key_prefix", "loadbear:budget:"),
                                     fallback=db_store)
        else:
            raise ValueError("budget_store = 'redis' needs redis_url")
        deadline = float(getattr(settings, "request_deadline_s", 60.0))
        kw.setdefault("default_max_tokens", int(getattr(settings, "budget_default_max_tokens", DEFAULT_MAX_TOKENS)))
        kw.setdefault("sync_interval_s", float(getattr(settings, "budget_sync_interval_s", DEFAULT_SYNC_INTERVAL_S)))
        kw.setdefault("lease_s", float(getattr(settings, "budget_lease_s", 0) or max(120.0, 2 * deadline + 60)))
        return cls(db, store, **kw)

    # -- estimates

    def estimate(self, chain: Sequence[ModelConfig], prompt_tokens: int, max_tokens: int | None = None) -> int:
        """Worst-case cost (micro-USD) of a request on ``chain``."""
        return worst_case_micro_usd(chain, prompt_tokens, max_tokens, self.default_max_tokens)

    @staticmethod
    def limits(settings: Any) -> tuple[int, int] | None:
        """(hard, soft) limits in micro-USD, or None when the tenant has no budget."""
        limit = usd_to_micro(getattr(settings, "monthly_budget_usd", None))
        if limit is None:
            return None
        ratio = float(getattr(settings, "budget_soft_ratio", 0.8) or 0.8)
        return limit, int(math.ceil(limit * ratio))

    # -- reserve / settle

    async def reserve(self, tenant: Any, month: str | None, amount: int) -> Reservation | Refusal:
        """Hold ``amount`` micro-USD of ``tenant``'s budget for ``month`` (default: the current one)."""
        now = self.clock()
        month = month or current_month(now)
        limits = self.limits(tenant.settings)
        if limits is None:
            return Reservation(tenant.id, month, 0, limit=None, via="none")
        limit, soft = limits
        key: Key = (str(tenant.id), month)
        rid = str(uuid.uuid4())
        amount = max(0, int(amount))
        ans = await self.store.reserve(key, rid, amount, limit, soft, now, now + self.lease_s)
        if ans is None:
            baseline = await asyncio.to_thread(month_spend, self.db, key[0], month) if self.db is not None else 0
            await self.store.init(key, baseline)
            self._synced[key] = time.monotonic()
            ans = await self.store.reserve(key, rid, amount, limit, soft, now, now + self.lease_s)
            if ans is None:  # vanished in between (evicted): treat like a fresh month
                await self.store.init(key, baseline)
                ans = await self.store.reserve(key, rid, amount, limit, soft, now, now + self.lease_s)
                if ans is None:
                    raise RuntimeError("budget store lost the counter twice in a row")
        else:
            self._maybe_sync(key)
        for ev in ans.events:
            self._notify(SOFT_EVENT if ev == "soft" else HARD_EVENT, tenant, month, limit, soft, ans, amount)
        if ans.ok:
            return Reservation(key[0], month, amount, rid, limit, ans.spent, ans.reserved,
                               ans.spent + ans.reserved >= soft, ans.via or self.store.name)
        return Refusal(key[0], month, amount, limit, ans.spent, ans.reserved, ans.spent + ans.reserved >= soft)

    async def settle(self, reservation: Reservation | None, actual_micro_usd: int) -> None:
        """Release the hold and count what the request really cost. Idempotent."""
        if reservation is None or reservation.settled or reservation.unlimited:
            return
        reservation.settled = True
        key = (reservation.tenant_id, reservation.month)
        try:
            await self.store.settle(key, reservation.id, max(0, int(actual_micro_usd)), reservation.via)
        except Exception:  # noqa: BLE001 - never fail a finished request; the lease expires, the ledger syncs
            log.exception("budget: settling reservation %s failed", reservation.id)

    async def release(self, reservation: Reservation | None) -> None:
        """The request never ran (refused later, failed before any call): nothing was spent."""
        await self.settle(reservation, 0)

    def settle_nowait(self, reservation: Reservation | None, actual_micro_usd: int) -> None:
        """:meth:`settle` from synchronous code (``ChatCall.finish``): scheduled on the running
        loop, or run in a thread when there is none."""
        if reservation is None or reservation.settled or reservation.unlimited:
            return
        self._background(self.settle(reservation, actual_micro_usd))

    # -- the request path

    async def admit(self, tenant: Any, chain: Sequence[ModelConfig], prompt_tokens: int,
                    max_tokens: int | None = None,
                    downgrade: Sequence[ModelConfig] | Callable[[], Sequence[ModelConfig] | None] | None = None,
                    ) -> Admission:
        """Reserve the request's worst case; downgrade or refuse (ApiError 402) at the hard limit.

        ``downgrade``: the chain of the tenant's cheapest allowed tier (or a callable giving it,
        called only when needed), tried when the tenant's hard action allows it.
        """
        chain = list(chain)
        settings = tenant.settings
        if getattr(settings, "monthly_budget_usd", None) is None:
            return Admission(chain, None)
        amount = self.estimate(chain, prompt_tokens, max_tokens)
        r = await self.reserve(tenant, None, amount)
        if isinstance(r, Reservation):
            return Admission(chain, r)
        if getattr(settings, "budget_hard_action", "downgrade_then_refuse") == "downgrade_then_refuse" and downgrade:
            alt = downgrade() if callable(downgrade) else downgrade
            alt = list(alt or [])
            if alt and chain and alt[0].name != chain[0].name:
                alt_amount = self.estimate(alt, prompt_tokens, max_tokens)
                if alt_amount < amount:
                    r2 = await self.reserve(tenant, r.month, alt_amount)
                    if isinstance(r2, Reservation):
                        note = (f"budget: downgraded {chain[0].name} → {alt[0].name} (up to "
                                f"${amount / MICRO:.4f} did not fit in the ${r.remaining / MICRO:.4f} left "
                                f"of the ${r.limit / MICRO:.2f} monthly budget)")
                        return Admission(alt, r2, True, note)
                    r = r2
        raise self.refusal_error(r, tenant)

    def refusal_error(self, r: Refusal, tenant: Any) -> ApiError:
        _, next_month = month_bounds(r.month)
        msg = (f"The monthly budget of ${r.limit / MICRO:,.2f} for {r.month} is used up: "
               f"${r.spent / MICRO:,.4f} spent, ${r.reserved / MICRO:,.4f} held by requests in progress, "
               f"and this request could cost up to ${r.amount / MICRO:,.4f}. "
               f"The budget resets on {next_month.isoformat()} (UTC); an administrator can raise "
               f"monthly_budget_usd.")
        contact = getattr(tenant.settings, "support_contact", None)
        if contact:
            msg += f" Contact {contact}."
        return ApiError(402, msg, type="insufficient_quota", code="budget_exceeded")

    # -- reporting

    def status(self, tenant: Any, month: str | None = None) -> dict[str, Any] | None:
        """Budget state for the usage API (synchronous: reads the ledger and the store).
        None when the tenant has no budget."""
        limits = self.limits(tenant.settings)
        if limits is None:
            return None
        limit, soft = limits
        month = month or current_month(self.clock())
        snap = self.store.snapshot((str(tenant.id), month)) or {}
        ledger = month_spend(self.db, str(tenant.id), month) if self.db is not None else 0
        spent = max(int(snap.get("spent", 0)), ledger)
        reserved = max(0, int(snap.get("reserved", 0)))
        _, next_month = month_bounds(month)
        return {
            "month": month,
            "monthly_budget_usd": micro_to_usd(limit),
            "spent_usd": micro_to_usd(spent),
            "reserved_usd": micro_to_usd(reserved),
            "remaining_usd": micro_to_usd(max(0, limit - spent - reserved)),
            "soft_threshold_usd": micro_to_usd(soft),
            "soft_threshold_reached": spent >= soft or int(snap.get("soft_notified", -1)) >= soft,
            "hard_limit_reached": spent >= limit or int(snap.get("hard_notified", -1)) >= limit,
            "hard_action": getattr(tenant.settings, "budget_hard_action", "downgrade_then_refuse"),
            "resets_at": next_month.isoformat() + "T00:00:00Z",
            "store": self.store.name,
        }

    # -- background work

    def _maybe_sync(self, key: Key) -> None:
        if self.db is None:
            return
        mono = time.monotonic()
        if mono - self._synced.get(key, -math.inf) < self.sync_interval_s:
            return
        self._synced[key] = mono
        self._background(self.sync(key))

    async def sync(self, key: Key) -> None:
        """``spent = max(counter, ledger)`` and expired leases freed, for one tenant and month."""
        try:
            ledger = await asyncio.to_thread(month_spend, self.db, key[0], key[1]) if self.db is not None else 0
            await self.store.sync(key, ledger, self.clock())
        except Exception:  # noqa: BLE001
            log.exception("budget: sync of %s %s failed", *key)

    def _background(self, coro: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            task = loop.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        t = threading.Thread(target=asyncio.run, args=(coro,), name="loadbear-budget", daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _notify(self, event: str, tenant: Any, month: str, limit: int, soft: int, ans: StoreAnswer,
                amount: int) -> None:
        payload = {
            "event": event,
            "tenant_id": str(tenant.id),
            "tenant": getattr(tenant, "slug", None),
            "month": month,
            "monthly_budget_usd": micro_to_usd(limit),
            "soft_threshold_usd": micro_to_usd(soft),
            "spent_usd": micro_to_usd(ans.spent),
            "reserved_usd": micro_to_usd(ans.reserved),
            "request_worst_case_usd": micro_to_usd(amount),
            "hard_action": getattr(tenant.settings, "budget_hard_action", None),
            "at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        }
        log.warning("%s tenant=%s month=%s budget=$%.2f spent=$%.4f reserved=$%.4f", event,
                    payload["tenant"] or payload["tenant_id"], month, payload["monthly_budget_usd"],
                    payload["spent_usd"], payload["reserved_usd"], extra={"budget_event": payload})
        if self.on_event is not None:
            try:
                self.on_event(event, payload)
            except Exception:  # noqa: BLE001
                log.exception("budget: on_event hook failed")
        url = getattr(tenant.settings, "budget_webhook_url", None)
        if url:
            self._background(self._post_webhook(url, payload))

    async def _post_webhook(self, url: str, payload: dict[str, Any]) -> None:
        import aiohttp

        try:
            timeout = aiohttp.ClientTimeout(total=self.webhook_timeout_s)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(url, json=payload, headers={
                    "user-agent": "loadbear-budget-webhook", "x-loadbear-event": payload["event"]}) as resp:
                    if resp.status >= 300:
                        log.warning("budget webhook %s answered %s for %s", url, resp.status, payload["event"])
        except Exception as exc:  # noqa: BLE001 - fire and forget: a broken webhook never hurts requests
            log.warning("budget webhook %s failed for %s: %s", url, payload["event"], exc)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for background work (settles, syncs, webhooks) started on this loop."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for t in list(self._threads):
            await asyncio.to_thread(t.join, timeout)

    async def aclose(self) -> None:
        await self.drain(2.0)
        await self.store.aclose()
