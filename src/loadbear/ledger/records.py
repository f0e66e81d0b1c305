"""What the ledger stores: one interaction per request, one attempt per provider call."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

STATUSES = ("ok", "error", "degraded", "cancelled")


@dataclass(slots=True)
class AttemptRecord:
    attempt_no: int
    provider: str
    model: str
    upstream_model: str | None
    status: str  # "ok", "error", "cancelled", "skipped" (breaker open)
    started_at: datetime
    latency_ms: int
    ttft_ms: int | None = None
    error_type: str | None = None
    error: str | None = None
    http_status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_input_tokens: int = 0
    tokens_estimated: bool = False
    cost_micro_usd: int = 0
    id: str | None = None


@dataclass(slots=True)
class InteractionRecord:
    id: str
    tenant_id: str
    feature: str
    requested_model: str
    model: str  # served model (or the requested one when nothing served it)
    status: str
    created_at: datetime
    latency_ms: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_input_tokens: int = 0
    tokens_estimated: bool = False
    cost_micro_usd: int = 0
    saved_micro_usd: int = 0
    user_external_id: str | None = None
    request_id: str | None = None
    provider: str | None = None
    route: str | None = None
    route_reason: str | None = None
    streamed: bool = False
    ttft_ms: int | None = None
    finish_reason: str | None = None
    cached: bool = False
    cache_kind: str | None = None
    cache_similarity: float | None = None
    cache_entry_id: str | None = None
    error: str | None = None
    error_type: str | None = None
    http_status: int | None = None
    retrieved_chunk_ids: list[str] | None = None
    prompt_text: str | None = None
    response_text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    attempts: list[AttemptRecord] = field(default_factory=list)
    # For metrics and traces only (not stored): the tenant's slug as a readable label, and
    # wall-clock (start_ns, end_ns) of request phases such as "retrieval" and "cache", so that
    # spans can be built after the fact at no cost to the request itself.
    tenant_slug: str | None = None
    phases: dict[str, tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
