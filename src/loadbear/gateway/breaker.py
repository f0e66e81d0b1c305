"""Circuit breakers per model, and the recent health figures shown by ``/admin/providers``.

A breaker opens after ``threshold`` consecutive failures, lets one probe through after
``cooldown`` seconds (half-open), and closes on the probe's success. An open breaker makes the
fallback chain skip the model at once instead of waiting on a provider that is down.

This implementation keeps state in the process. ``BreakerRegistry`` is the seam for a shared
store (Redis or the database) so that several workers and replicas agree.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class Breaker:
    threshold: int = 5
    cooldown: float = 30.0
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trips: int = 0
    probing: bool = False

    def allow(self, now: float) -> bool:
        if self.state == CLOSED:
            return True
        if self.state == OPEN and now - self.opened_at >= self.cooldown:
            self.state = HALF_OPEN
            self.probing = False
        if self.state == HALF_OPEN and not self.probing:
            self.probing = True  # exactly one probe at a time
            return True
        return False

    def success(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self.probing = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            if self.state != OPEN:
                self.trips += 1
            self.state = OPEN
            self.opened_at = now
            self.probing = False


@dataclass
class ModelHealth:
    # (monotonic time, ok, latency ms) of recent calls, bounded.
    recent: deque = field(default_factory=lambda: deque(maxlen=200))

    def add(self, ok: bool, latency_ms: int, now: float) -> None:
        self.recent.append((now, ok, latency_ms))

    def summary(self, now: float, window: float = 300.0) -> dict[str, Any]:
        calls = [r for r in self.recent if now - r[0] <= window]
        if not calls:
            return {"calls": 0, "error_rate": None, "p50_latency_ms": None, "p95_latency_ms": None}
        lat = sorted(r[2] for r in calls)
        errors = sum(1 for r in calls if not r[1])
        return {
            "calls": len(calls),
            "error_rate": round(errors / len(calls), 4),
            "p50_latency_ms": lat[len(lat) // 2],
            "p95_latency_ms": lat[min(len(lat) - 1, int(len(lat) * 0.95))],
        }


class BreakerRegistry:
    def __init__(self, threshold: int = 5, cooldown: float = 30.0, clock=time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self._breakers: dict[str, Breaker] = {}
        self._health: dict[str, ModelHealth] = {}

    def _get(self, key: str) -> Breaker:
        b = self._breakers.get(key)
        if b is None:
            b = self._breakers[key] = Breaker(self.threshold, self.cooldown)
        return b

    def allow(self, key: str) -> bool:
        return self._get(key).allow(self.clock())

    def record(self, key: str, ok: bool, latency_ms: int) -> None:
        now = self.clock()
        b = self._get(key)
        if ok:
            b.success()
        else:
            b.failure(now)
        h = self._health.get(key)
        if h is None:
            h = self._health[key] = ModelHealth()
        h.add(ok, latency_ms, now)

    def state(self, key: str) -> str:
        b = self._breakers.get(key)
        return b.state if b else CLOSED

    def snapshot(self, key: str) -> dict[str, Any]:
        b = self._breakers.get(key)
        h = self._health.get(key)
        now = self.clock()
        out: dict[str, Any] = {
            "breaker": b.state if b else CLOSED,
            "consecutive_failures": b.failures if b else 0,
            "trips": b.trips if b else 0,
        }
        out.update(h.summary(now) if h else ModelHealth().summary(now))
        return out

    def total_trips(self) -> int:
        return sum(b.trips for b in self._breakers.values())
