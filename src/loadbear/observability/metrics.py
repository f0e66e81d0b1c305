"""Prometheus metrics, derived from the ledger record of each request.

Every request ends in exactly one :class:`~loadbear.ledger.records.InteractionRecord`; counting
from it (in :meth:`Metrics.observe`) keeps the request path free of metric calls and makes the
metrics agree with the ledger by construction: the same tokens, the same cost, the same status.

The exposition is written here rather than with ``prometheus_client``: one request updates about
fifteen values, and doing that through labelled client objects costs tens of microseconds; here
it is one dict lookup for the (tenant, model, feature) series and plain integer adds (measured in
``tests/test_metrics.py::test_observe_cpu_cost``). State is per instance (one per Gateway), so
many gateways in one process never share counters.

Label cardinality is capped per label (``metrics_label_cap``): the first N distinct values of
tenant, model and feature keep their name, later ones are counted under ``"other"``. Feature
names come from clients, so without the cap one tenant could grow the scrape without bound.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Any, Iterable

from loadbear.ledger.records import InteractionRecord

OTHER = "other"
# Whole-request latency of LLM calls spans milliseconds (cache hits) to minutes (long answers).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
STATUSES = ("ok", "error", "degraded", "cancelled")
_STATUS_INDEX = {s: i for i, s in enumerate(STATUSES)}
# Error kinds and cache kinds are small enums today; capped anyway so a new producer cannot
# turn them into an unbounded label.
_SMALL_CAP = 32


class LabelCap:
    """Maps a label value to itself for the first ``limit`` distinct values, then to ``other``."""

    __slots__ = ("seen", "limit")

    def __init__(self, limit: int) -> None:
        self.seen: dict[str, str] = {}
        self.limit = max(0, int(limit))

    def __call__(self, value: str | None) -> str:
        got = self.seen.get(value)  # type: ignore[arg-type]
        if got is not None:
            return got
        if value is None or value == "":
            return "none"
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen[value] = value
        return value


class Histogram:
    """Bucket counts (not cumulative: the exposition sums them), sum and count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus "le").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> "Histogram":
        h = Histogram(self.bounds)
        h.counts = list(self.counts)
        h.sum = self.sum
        return h


class _Series:
    """Everything counted for one (tenant, model, feature)."""

    __slots__ = ("requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost", "saved_cache", "saved_routing",
                 "cache_hits", "fallbacks", "degraded", "errors", "latency", "ttft")

    def __init__(self) -> None:
        self.requests = [0, 0, 0, 0]  # by STATUSES
        self.input_tokens = 0
        self.output_tokens = 0
        self.cached_input_tokens = 0
        self.cost = 0  # micro-USD, like the ledger
        self.saved_cache = 0  # micro-USD saved by answering from the response cache
        self.saved_routing = 0  # micro-USD saved by routing to a cheaper tier
        self.cache_hits: dict[str, int] = {}
        self.fallbacks = 0
        self.degraded = 0
        self.errors: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)

    def copy(self) -> "_Series":
        s = _Series()
        s.requests = list(self.requests)
        s.input_tokens, s.output_tokens, s.cached_input_tokens = self.input_tokens, self.output_tokens, self.cached_input_tokens
        s.cost, s.fallbacks, s.degraded = self.cost, self.fallbacks, self.degraded
        s.saved_cache, s.saved_routing = self.saved_cache, self.saved_routing
        s.cache_hits, s.errors = dict(self.cache_hits), dict(self.errors)
        s.latency, s.ttft = self.latency.copy(), self.ttft.copy()
        return s


class _Upstream:
    """One (provider, model): its calls by outcome and their latency."""

    __slots__ = ("outcomes", "latency")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)

    def copy(self) -> "_Upstream":
        u = _Upstream()
        u.outcomes = dict(self.outcomes)
        u.latency = self.latency.copy()
        return u


class Metrics:
    """Counters and histograms of one Gateway; :meth:`observe` once per ledger record."""

    def __init__(self, label_cap: int = 100) -> None:
        if int(label_cap) < 0:
            # Refused rather than clamped: a typo would otherwise fold every label into "other".
            raise ValueError(f"LOADBEAR_METRICS_LABEL_CAP must be 0 or more, not {label_cap}")
        self._lock = threading.Lock()
        self.tenants = LabelCap(label_cap)
        self.models = LabelCap(label_cap)
        self.features = LabelCap(label_cap)
        self._error_kinds = LabelCap(_SMALL_CAP)
        self._cache_kinds = LabelCap(_SMALL_CAP)
        self._outcomes = LabelCap(_SMALL_CAP)
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._upstream: dict[tuple[str, str], _Upstream] = {}
        self._http: dict[tuple[str, str, str], int] = {}

    def observe(self, rec: InteractionRecord) -> None:
        attempts = rec.attempts
        # Evaluation traffic is not product traffic (the usage rollups leave it out too), but its
        # upstream calls are real calls that tell about the providers' health.
        product = not (rec.metadata and rec.metadata.get("eval_run"))
        with self._lock:
            if product:
                key = (self.tenants(rec.tenant_slug or rec.tenant_id), self.models(rec.model),
                       self.features(rec.feature))
                s = self._series.get(key)
                if s is None:
                    s = self._series[key] = _Series()
                status = rec.status
                s.requests[_STATUS_INDEX[status]] += 1
                s.input_tokens += rec.prompt_tokens
                s.output_tokens += rec.completion_tokens
                s.cached_input_tokens += rec.cached_input_tokens
                s.cost += rec.cost_micro_usd
                # Split like the usage rollups: a cached row's saving is the cache's, any other routing's.
                if rec.cached:
                    s.saved_cache += rec.saved_micro_usd
                else:
                    s.saved_routing += rec.saved_micro_usd
                if rec.cached:
                    kind = self._cache_kinds(rec.cache_kind or "exact")
                    s.cache_hits[kind] = s.cache_hits.get(kind, 0) + 1
                if status == "ok":
                    # Served by another model than the first choice: a failover happened, or the
                    # first choice was skipped because its breaker was open.
                    if (attempts and attempts[0].model != rec.model) or (rec.metadata and rec.metadata.get("skipped")):
                        s.fallbacks += 1
                elif status == "degraded":
                    s.degraded += 1
                elif status == "error":
                    kind = self._error_kinds(rec.error_type or "unknown")
                    s.errors[kind] = s.errors.get(kind, 0) + 1
                s.latency.observe(rec.latency_ms / 1000)
                if rec.streamed and rec.ttft_ms is not None:
                    s.ttft.observe(rec.ttft_ms / 1000)
            for a in attempts:
                ukey = (a.provider, self.models(a.model))
                u = self._upstream.get(ukey)
                if u is None:
                    u = self._upstream[ukey] = _Upstream()
                outcome = "ok" if a.status == "ok" else self._outcomes(a.error_type or a.status)
                u.outcomes[outcome] = u.outcomes.get(outcome, 0) + 1
                u.latency.observe(a.latency_ms / 1000)

    def observe_http(self, method: str, route: str, status: int) -> None:
        """One HTTP response (any route): what the ledger cannot see, such as 401, 429 or 413."""
        key = (method, route, str(status))
        with self._lock:
            self._http[key] = self._http.get(key, 0) + 1

    def snapshot(self) -> tuple[dict, dict, dict]:
        with self._lock:
            return ({k: v.copy() for k, v in self._series.items()},
                    {k: v.copy() for k, v in self._upstream.items()}, dict(self._http))

    # -- exposition ---------------------------------------------------------------------

    def render(self, gauges: Iterable["Family"] = ()) -> str:
        """The Prometheus text exposition (format 0.0.4) of everything counted, plus ``gauges``
        (values read at scrape time by the caller, such as breaker states)."""
        series, upstream, http = self.snapshot()
        out: list[str] = []
        lbl = ("tenant", "model", "feature")

        def fam(name: str, kind: str, help_: str, samples: list[tuple[str, tuple[tuple[str, str], ...], float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for suffix, labels, value in samples:
                out.append(f"{name}{suffix}{_labels(labels)} {_num(value)}")

        def per_series(get) -> list:
            return [("", tuple(zip(lbl, k)), get(s)) for k, s in sorted(series.items())]

        fam("loadbear_requests_total", "counter", "Chat requests by outcome (one per ledger row).",
            [("", (*zip(lbl, k), ("status", st)), s.requests[i])
             for k, s in sorted(series.items()) for i, st in enumerate(STATUSES) if s.requests[i]])
        fam("loadbear_input_tokens_total", "counter", "Prompt tokens, all attempts included (as billed).",
            per_series(lambda s: s.input_tokens))
        fam("loadbear_cached_input_tokens_total", "counter", "Prompt tokens the provider served from its prompt cache.",
            per_series(lambda s: s.cached_input_tokens))
        fam("loadbear_output_tokens_total", "counter", "Completion tokens, all attempts included.",
            per_series(lambda s: s.output_tokens))
        fam("loadbear_cost_usd_total", "counter", "Estimated upstream cost in USD (the ledger's cost).",
            per_series(lambda s: s.cost / 1_000_000))
        fam("loadbear_saved_usd_total", "counter",
            "Estimated USD saved, by source: the response cache (the call a hit replaced) or routing (vs the strong tier).",
            [("", (*zip(lbl, k), ("source", src)), v / 1_000_000) for k, s in sorted(series.items())
             for src, v in (("cache", s.saved_cache), ("routing", s.saved_routing)) if v])
        fam("loadbear_cache_hits_total", "counter", "Answers served from the response cache, by kind.",
            [("", (*zip(lbl, k), ("kind", kind)), n) for k, s in sorted(series.items())
             for kind, n in sorted(s.cache_hits.items())])
        fam("loadbear_fallbacks_total", "counter",
            "Answers served by another model than the first choice (failover or open breaker).",
            per_series(lambda s: s.fallbacks))
        fam("loadbear_degraded_total", "counter", "Honest degraded answers: every model in the chain failed.",
            per_series(lambda s: s.degraded))
        fam("loadbear_errors_total", "counter", "Requests that ended in an error, by error type.",
            [("", (*zip(lbl, k), ("error_type", kind)), n) for k, s in sorted(series.items())
             for kind, n in sorted(s.errors.items())])
        _histogram(out, "loadbear_request_duration_seconds", "Whole-request latency, retries and fallbacks included.",
                   [(tuple(zip(lbl, k)), s.latency) for k, s in sorted(series.items())])
        _histogram(out, "loadbear_time_to_first_token_seconds", "Time to the first token of streamed answers.",
                   [(tuple(zip(lbl, k)), s.ttft) for k, s in sorted(series.items()) if sum(s.ttft.counts)])
        fam("loadbear_upstream_attempts_total", "counter",
            "Upstream calls by outcome (ok, or the error type); one per ledger attempt row.",
            [("", (("provider", k[0]), ("model", k[1]), ("outcome", o)), n) for k, u in sorted(upstream.items())
             for o, n in sorted(u.outcomes.items())])
        _histogram(out, "loadbear_upstream_duration_seconds", "Latency of each upstream call.",
                   [((("provider", k[0]), ("model", k[1])), u.latency) for k, u in sorted(upstream.items())])
        fam("loadbear_http_responses_total", "counter",
            "HTTP responses by route and status, including those refused before any model call.",
            [("", (("method", k[0]), ("route", k[1]), ("status", k[2])), n) for k, n in sorted(http.items())])
        for g in gauges:
            fam(g.name, g.kind, g.help, [("", labels, v) for labels, v in g.samples])
        out.append("")
        return "\n".join(out)


class Family:
    """A metric family computed at scrape time (gauges such as breaker state)."""

    __slots__ = ("name", "kind", "help", "samples")

    def __init__(self, name: str, kind: str, help_: str, samples: list[tuple[tuple[tuple[str, str], ...], float]]):
        self.name, self.kind, self.help, self.samples = name, kind, help_, samples


def _histogram(out: list[str], name: str, help_: str, items: list[tuple[tuple[tuple[str, str], ...], Histogram]]) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} histogram")
    for labels, h in items:
        total = 0
        for bound, n in zip((*h.bounds, float("inf")), h.counts):
            total += n
            out.append(f"{name}_bucket{_labels((*labels, ('le', _num(bound))))} {total}")
        out.append(f"{name}_sum{_labels(labels)} {_num(h.sum)}")
        out.append(f"{name}_count{_labels(labels)} {total}")


def _labels(labels: tuple[tuple[str, str], ...] | Any) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels) + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v == float("inf"):
        return "+Inf"
    return repr(float(v))
