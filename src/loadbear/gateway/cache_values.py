"""The response cache's values: settings, scopes, hits, the store and hit-note items of the
writer, and the SQL column lists the lookups read (split from gateway/cache.py, which re-exports
the public names)."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

import numpy as np

from loadbear.storage.values import iso, loads

__all__ = [
    "CacheHit",
    "CachePolicy",
    "CacheScope",
    "CacheSettings",
    "doc_versions_from_citations",
    "should_store",
    "stream_pieces",
]


# -- settings -------------------------------------------------------------------------------


@dataclass
class CachePolicy:
    """What one tenant asked for. ``for_tenant`` reads optional ``TenantSettings`` fields
    (``cache_enabled``, ``cache_semantic``, ``cache_threshold``, ``cache_degraded_threshold``,
    ``cache_ttl_s``) and falls back to these defaults."""

    enabled: bool = True
    semantic: bool = True
    threshold: float = 0.95
    degraded_threshold: float = 0.85
    ttl_s: int = 86_400

    @classmethod
    def for_tenant(cls, tenant_settings: Any) -> "CachePolicy":
        d = cls()
        return cls(
            enabled=bool(getattr(tenant_settings, "cache_enabled", d.enabled)),
            semantic=bool(getattr(tenant_settings, "cache_semantic", d.semantic)),
            threshold=float(getattr(tenant_settings, "cache_threshold", d.threshold)),
            degraded_threshold=float(getattr(tenant_settings, "cache_degraded_threshold", d.degraded_threshold)),
            ttl_s=int(getattr(tenant_settings, "cache_ttl_s", d.ttl_s)),
        )


@dataclass
class CacheSettings:
    """Process-wide knobs (the defaults are what the benchmark measured)."""

    # Candidates whose static (bag-of-word-pieces) cosine with the question is below this are
    # dropped before the question is embedded with the real model (-1 turns the gate off).
    static_gate: float = 0.80
    # At most this many neighbourhood candidates are compared per lookup (most shared keys first),
    # read from at most probe_rows rows of the precise keys and subst_rows of the substitution keys.
    max_candidates: int = 16
    probe_rows: int = 1024
    subst_rows: int = 256
    # Questions longer than this are cached exactly only (MiniLM reads 256 word pieces anyway).
    semantic_max_chars: int = 2000
    # Answers longer than this are not stored.
    max_answer_chars: int = 100_000
    # The degraded lookup also compares this many of the scope's most recent entries.
    degraded_scan: int = 2000
    # Background writer: queue bound (stores beyond it are dropped and counted) and batch size.
    queue_max: int = 10_000
    batch_size: int = 32
    # The writer thread also deletes expired entries this often (0: never; call purge_expired).
    purge_interval_s: float = 600.0
    # Hit notes (the hits counter, last_hit_at) are statistics: the writer holds them up to this
    # long or this many entries and writes one UPDATE per entry, instead of a transaction per hit
    # that competes with the lookups for the CPU and the GIL.
    hit_note_delay_s: float = 1.0
    hit_note_max: int = 512
    default_threshold: float = 0.95
    default_degraded_threshold: float = 0.85
    default_ttl_s: int = 86_400


# -- values ---------------------------------------------------------------------------------


@dataclass
class CacheScope:
    """Where a request's answer may come from and go to. Made by :meth:`ResponseCache.key_for`."""

    tenant_id: str
    feature: str
    tier: str
    scope_hash: str
    query_text: str
    exact_hash: str
    entry_keys: tuple[int, ...]  # what a stored answer is filed under
    probe_keys: tuple[int, ...]  # what a lookup reads (see cache_text.QuestionKeys)
    subst_keys: tuple[int, ...]
    grounded: bool
    doc_versions: dict[str, int] | None
    cacheable: bool = True
    reason: str | None = None  # why not cacheable
    # Filled by a lookup that had to embed the question; reused by ``store`` (no second embedding).
    query_vector: np.ndarray | None = field(default=None, repr=False)
    embedding_model: str | None = None


@dataclass(frozen=True)
class CacheHit:
    entry_id: str
    kind: str  # "exact" | "semantic"
    similarity: float
    text: str
    model: str
    cost_micro_usd: int  # what the original answer cost: the savings ledger credits it
    prompt_tokens: int
    completion_tokens: int
    citations: list[dict[str, Any]] | None
    query_text: str  # the question the entry was stored for
    created_at: str | None = None
    degraded: bool = False


def should_store(status: str | None, *, finish_reason: str | None = "stop", text: str | None = "",
                 cached: bool = False, degraded: bool = False, continued: bool = False,
                 bypass: bool = False, error: Any = None) -> bool:
    """Whether a finished answer may enter the cache: only complete, normal, model-made answers.

    Never: errors, degraded answers, cancelled or cut streams, answers served from the cache,
    answers spliced by a continuation after a mid-stream failure, truncated answers
    (``finish_reason`` other than ``stop``), empty answers, or requests that said ``"cache": false``.
    """
    if status != "ok" or cached or degraded or continued or bypass or error is not None:
        return False
    if finish_reason not in ("stop", None):
        return False
    return bool(text and text.strip())


def doc_versions_from_citations(citations: Iterable[Mapping[str, Any]] | None) -> dict[str, int]:
    """``{document_id: version}`` of a grounded answer's citations (``Grounding.citations()``)."""
    out: dict[str, int] = {}
    for c in citations or ():
        doc, version = c.get("document_id"), c.get("version")
        if doc is not None and version is not None:
            out[str(doc)] = int(version)
    return out


def stream_pieces(text: str, words: int = 4) -> list[str]:
    """A cached answer cut into stream deltas of a few words (joined, they are the text again)."""
    if not text:
        return []
    parts = text.split(" ")
    return [" ".join(parts[i:i + words]) + (" " if i + words < len(parts) else "")
            for i in range(0, len(parts), words)]


# -- internals ------------------------------------------------------------------------------

_HIT_COLUMNS = ("id, answer_text, model, cost_micro_usd, prompt_tokens, completion_tokens, citations, query_text,"
                " created_at, grounded")
# Candidates carry what a hit needs: a semantic hit on an ungrounded entry is served without a second read.
_CAND_PLAIN = _HIT_COLUMNS + ", scope_hash, embedding_model, embedding"
_CAND_COLUMNS = ", ".join(f"e.{c.strip()}" for c in _CAND_PLAIN.split(","))
# A grounded entry's documents (version built from, current version; current NULL: deleted), read
# in the lookup's statement so that a grounded hit needs no second transaction.
_DOCS_FROM = (" FROM cache_entry_documents ced LEFT JOIN documents d ON d.id = ced.document_id"
              " AND d.tenant_id = ced.tenant_id WHERE ced.entry_id = e.id AND ced.tenant_id = e.tenant_id")
_DOCS_PG = ("CASE WHEN e.grounded THEN (SELECT json_agg(json_build_array(ced.document_id, ced.version, d.version))"
            + _DOCS_FROM + ") END AS docs")
_DOCS_SQLITE = ("CASE WHEN e.grounded THEN (SELECT json_group_array(json_array(ced.document_id, ced.version,"
                " d.version))" + _DOCS_FROM + ") END AS docs")


@dataclass
class _Store:
    scope: CacheScope
    query: str
    answer: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: int
    citations: list[dict[str, Any]] | None
    versions: dict[str, int] | None
    created: datetime
    expires: datetime
    vector: np.ndarray | None = None
    vector_model: str | None = None


@dataclass
class _Hit:
    tenant_id: str
    entry_id: str
    at: datetime
    n: int = 1  # hits noted (the writer merges the notes of one entry)


def _hit(row: Mapping[str, Any], kind: str, sim: float, degraded: bool = False) -> CacheHit:
    return CacheHit(
        entry_id=str(row["id"]), kind=kind, similarity=round(float(sim), 6), text=row["answer_text"],
        model=row["model"], cost_micro_usd=int(row["cost_micro_usd"]), prompt_tokens=int(row["prompt_tokens"]),
        completion_tokens=int(row["completion_tokens"]), citations=loads(row["citations"]),
        query_text=row["query_text"], created_at=iso(row["created_at"]), degraded=degraded,
    )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _content(m: Mapping[str, Any]) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # text parts
        return "".join(p.get("text", "") for p in c if isinstance(p, Mapping))
    return "" if c is None else str(c)


def _msg_text(m: Mapping[str, Any]) -> list[Any]:
    return [m.get("role"), _content(m), m.get("name")]


def _uuid(value: Any) -> str | None:
    try:
        return str(uuid.UUID(str(value)))
    except (ValueError, TypeError, AttributeError):
        return None


def _usage(u: Any) -> tuple[int, int]:
    if u is None:
        return 0, 0
    if isinstance(u, (tuple, list)):
        return int(u[0]), int(u[1]) if len(u) > 1 else 0
    if isinstance(u, Mapping):
        return int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    if isinstance(u, int):
        return 0, int(u)
    return int(getattr(u, "prompt_tokens", 0)), int(getattr(u, "completion_tokens", 0))
