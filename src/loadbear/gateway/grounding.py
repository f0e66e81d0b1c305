"""Grounded answers: retrieve from the tenant's knowledge base and build a prompt with numbered sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loadbear.gateway.errors import invalid
from loadbear.knowledge.types import StoredChunk

PROMPT_VERSION = "grounded-v1"
SYSTEM_TEMPLATE = (
    "Answer the user's question using only the numbered sources below. Cite the sources you use "
    "like [1] or [2]. If the sources do not contain the answer, say that the documents do not "
    "cover it instead of guessing.\n\nSources:\n{sources}"
)


@dataclass
class KnowledgeRequest:
    top_k: int = 5
    filters: dict[str, Any] | None = None


@dataclass
class Grounding:
    chunks: list[StoredChunk] = field(default_factory=list)

    def context(self) -> list[dict[str, Any]]:
        """What the local extractive model reads: the chunks with their source numbers."""
        return [{"index": i, "text": c.text, "title": c.document_title} for i, c in enumerate(self.chunks, 1)]

    def system_message(self) -> dict[str, str]:
        sources = "\n\n".join(
            f"[{i}] {c.document_title or 'Untitled'}"
            + (f" — {' > '.join(c.heading_path)}" if c.heading_path else "")
            + f"\n{c.text}"
            for i, c in enumerate(self.chunks, 1)
        ) or "(no sources were found)"
        return {"role": "system", "content": SYSTEM_TEMPLATE.format(sources=sources)}

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The grounding comes first; the tenant's own system prompt (if any) follows it.
        return [self.system_message(), *messages]

    def citations(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "chunk_id": c.id, "document_id": c.document_id, "title": c.document_title,
             "source_url": c.source_url, "external_id": c.external_id, "version": c.document_version,
             "span": {"start": c.start, "end": c.end}, "score": round(float(c.score), 6)}
            for i, c in enumerate(self.chunks, 1)
        ]

    def chunk_ids(self) -> list[str]:
        return [c.id for c in self.chunks]


def parse_knowledge(value: Any, default: dict[str, Any] | None) -> KnowledgeRequest | None:
    """``"knowledge": {"top_k": 5, "filters": {...}}`` in the body, else the tenant's per-feature default."""
    if value is None:
        value = default
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise invalid("'knowledge' must be an object like {\"top_k\": 5}", "knowledge", "invalid_type")
    unknown = set(value) - {"top_k", "filters"}
    if unknown:
        raise invalid(f"unknown field(s) in 'knowledge': {', '.join(sorted(unknown))}", "knowledge", "unknown_parameter")
    top_k = value.get("top_k", 5)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 20:
        raise invalid("'knowledge.top_k' must be an integer between 1 and 20", "knowledge.top_k", "invalid_value")
    filters = value.get("filters")
    if filters is not None and not isinstance(filters, dict):
        raise invalid("'knowledge.filters' must be an object", "knowledge.filters", "invalid_type")
    return KnowledgeRequest(top_k=top_k, filters=filters)
