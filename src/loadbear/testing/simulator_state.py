"""Configuration and bookkeeping of the upstream simulator: the runtime-tunable config, one
record per API call, and the thread-safe ledger that keeps records and counters."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from .simulator_faults import DEFAULT_RATE_FAULTS, FAULT_KINDS, validate_kinds


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """The tunables that can change while the simulator runs (see ``configure``)."""

    latency_ms: tuple[float, float] = (0.0, 0.0)
    tokens_per_second: float | None = None
    fault_rate: float = 0.0
    faults: tuple[str, ...] | None = None  # None: DEFAULT_RATE_FAULTS
    seed: int = 0
    reply_words: int = 20
    retry_after: float = 1.0
    stall_s: float = 60.0

    def __post_init__(self) -> None:
        latency = self.latency_ms
        if isinstance(latency, (int, float)):
            latency = (float(latency), float(latency))
        low, high = (float(v) for v in latency)
        if low < 0 or high < low:
            raise ValueError(f"latency_ms must be (min, max) with 0 <= min <= max, got {self.latency_ms!r}")
        object.__setattr__(self, "latency_ms", (low, high))
        object.__setattr__(self, "faults", validate_kinds(self.faults))
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate must be within [0, 1]")
        if self.tokens_per_second is not None and self.tokens_per_second <= 0:
            raise ValueError("tokens_per_second must be > 0 or None")
        if self.reply_words < 0 or self.retry_after < 0 or self.stall_s < 0:
            raise ValueError("reply_words, retry_after and stall_s must be >= 0")

    @property
    def rate_kinds(self) -> tuple[str, ...]:
        return DEFAULT_RATE_FAULTS if self.faults is None else self.faults

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(slots=True)
class RequestRecord:
    """One API call as the simulator saw it. ``status`` is None when no response was sent
    (dropped connection); ``ended`` is None while in flight. Times are ``time.monotonic()``."""

    index: int
    path: str
    started: float
    model: str | None = None
    stream: bool = False
    fault: str | None = None
    scripted: bool = False
    latency_ms: float = 0.0  # the sampled delay before the response headers
    status: int | None = None
    ended: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    client_disconnected: bool = False
    body: dict[str, Any] | None = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    _generation: int = field(default=0, repr=False, compare=False)

    def to_json(self, full: bool = False) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_generation"}
        if not full:
            del data["body"], data["headers"]
        return data


class Ledger:
    """Records and counters, shared between the server thread and the test thread."""

    def __init__(self, max_records: int) -> None:
        self._lock = threading.Lock()
        self._max_records = max_records
        self._in_flight = 0  # a live gauge: survives clear() since those requests still run
        self._generation = 0
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._records: deque[RequestRecord] = deque(maxlen=self._max_records)
            self._index = itertools.count()
            self._counts: dict[str, Counter[str]] = {k: Counter() for k in ("path", "model", "fault", "status")}
            self._total = 0
            self._generation += 1

    def open(self, path: str, headers: dict[str, str]) -> RequestRecord:
        with self._lock:
            record = RequestRecord(next(self._index), path, time.monotonic(), headers=headers)
            record._generation = self._generation
            self._records.append(record)
            self._total += 1
            self._in_flight += 1
            self._counts["path"][path] += 1
            return record

    def count_model(self, model: str | None) -> None:
        with self._lock:
            self._counts["model"][model or "?"] += 1

    def count_fault(self, kind: str) -> None:
        with self._lock:
            self._counts["fault"][kind] += 1

    def close(self, record: RequestRecord) -> None:
        with self._lock:
            record.ended = time.monotonic()
            self._in_flight -= 1
            if record._generation == self._generation:  # not counted if a reset came in between
                self._counts["status"]["none" if record.status is None else str(record.status)] += 1

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def models(self) -> list[str]:
        with self._lock:
            return [m for m in self._counts["model"] if m != "?"]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_fault = {kind: self._counts["fault"][kind] for kind in FAULT_KINDS}
            return {
                "total": self._total,
                "in_flight": self._in_flight,
                "faults": sum(by_fault.values()),
                "by_model": dict(self._counts["model"]),
                "by_fault": by_fault,
                "by_path": dict(self._counts["path"]),
                "by_status": dict(self._counts["status"]),
            }
