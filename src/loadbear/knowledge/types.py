"""The knowledge base's values, shared by parsing, chunking, embedding, storage and retrieval."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np


class KnowledgeError(ValueError):
    """A document or query that cannot be processed; ``status`` and ``code`` go to the client."""

    def __init__(self, message: str, *, code: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.param = param


@dataclass(slots=True)
class Block:
    """A structural unit of a parsed document, with its span in ``ParsedDocument.text``."""

    kind: str  # "heading", "paragraph", "list", "code", "table"
    text: str
    start: int
    end: int
    level: int = 0  # heading level (1-6) for headings
    heading_path: list[str] = field(default_factory=list)  # enclosing headings, outermost first


@dataclass(slots=True)
class ParsedDocument:
    text: str  # the normalised full text; spans index into it
    blocks: list[Block]
    title: str | None = None  # a title found in the document (first H1, <title>, PDF metadata)
    content_type: str = "text/plain"


@dataclass(slots=True)
class ChunkDraft:
    """A chunk before storage: its text, span in the document text, and where it sits."""

    text: str
    start: int
    end: int
    heading_path: list[str]
    token_count: int
    ordinal: int = 0


@dataclass(slots=True)
class Document:
    id: str
    tenant_id: str
    title: str
    external_id: str | None
    source_url: str | None
    metadata: dict[str, Any]
    version: int
    content_type: str
    char_count: int
    chunk_count: int
    created_at: str | None = None
    updated_at: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "document", "title": self.title, "external_id": self.external_id,
            "source_url": self.source_url, "metadata": self.metadata, "version": self.version,
            "content_type": self.content_type, "char_count": self.char_count, "chunk_count": self.chunk_count,
            "created_at": self.created_at, "updated_at": self.updated_at,
        }


@dataclass(slots=True)
class StoredChunk:
    id: str
    document_id: str
    ordinal: int
    text: str
    start: int
    end: int
    heading_path: list[str]
    token_count: int
    embedding_model: str
    embedding_dim: int
    # filled in by retrieval
    score: float = 0.0
    document_title: str | None = None
    source_url: str | None = None
    document_version: int | None = None
    external_id: str | None = None


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of a fixed dimension."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...
