"""Knowledge-base routes: documents, ingestion jobs, and retrieval queries."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import orjson
from fastapi import Depends, FastAPI, Request

from loadbear.api.responses import JSON, error_response
from loadbear.gateway.errors import ApiError, invalid
from loadbear.gateway.validation import parse_json
from loadbear.knowledge.types import KnowledgeError
from loadbear.tenancy.models import AuthContext

_STATUS_TYPES = {404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error"}


def knowledge_error(exc: KnowledgeError) -> ApiError:
    return ApiError(exc.status, exc.message, type=_STATUS_TYPES.get(exc.status, "invalid_request_error"),
                    code=exc.code, param=exc.param)


def add_knowledge_routes(app: FastAPI, gateway: Any, scope: Callable[[str], Callable[..., Any]]) -> None:
    @app.exception_handler(KnowledgeError)
    async def _knowledge_error(request: Request, exc: KnowledgeError):
        return error_response(knowledge_error(exc))

    write = scope("knowledge:write")
    read = scope("knowledge:read")

    @app.post("/v1/documents")
    async def create_document(request: Request, auth: AuthContext = Depends(write)):
        kb = gateway.knowledge
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            return await _upload(request, auth, kb)
        data = parse_json(await request.body())
        if not isinstance(data, dict):
            raise invalid("The request body must be a JSON object.", code="invalid_type")
        unknown = set(data) - {"title", "text", "source_url", "external_id", "metadata", "content_type"}
        if unknown:
            raise invalid(f"unknown field(s): {', '.join(sorted(unknown))}", sorted(unknown)[0], "unknown_parameter")
        doc = await asyncio.to_thread(
            kb.ingest_text, auth.tenant_id, text=data.get("text"), title=data.get("title"),
            external_id=data.get("external_id"), source_url=data.get("source_url"), metadata=data.get("metadata"),
            content_type=data.get("content_type", "text/plain"),
        )
        return JSON(doc.public(), status_code=201)

    async def _upload(request: Request, auth: AuthContext, kb: Any):
        form = await request.form(max_files=1, max_fields=10, max_part_size=kb.settings.max_upload_bytes + 1)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise invalid("a multipart upload needs a 'file' part", "file", "missing_required_parameter")
        data = await upload.read()
        metadata = form.get("metadata")
        if isinstance(metadata, str) and metadata:
            try:
                metadata = orjson.loads(metadata)
            except orjson.JSONDecodeError:
                raise invalid("'metadata' must be a JSON object", "metadata", "invalid_json") from None
        fields = {k: form.get(k) or None for k in ("title", "external_id", "source_url")}
        if len(data) > kb.settings.inline_max_bytes:
            job = await asyncio.to_thread(
                kb.submit_job, auth.tenant_id, filename=upload.filename or "upload", data=data,
                content_type=upload.content_type, metadata=metadata or None, **fields)
            return JSON(job, status_code=202, headers={"location": f"/v1/jobs/{job['id']}"})
        doc = await asyncio.to_thread(
            kb.ingest_file, auth.tenant_id, filename=upload.filename or "upload", data=data,
            content_type=upload.content_type, metadata=metadata or None, **fields)
        return JSON(doc.public(), status_code=201)

    @app.get("/v1/documents")
    def list_documents(request: Request, auth: AuthContext = Depends(read)):
        q = request.query_params
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            raise invalid("'limit' must be an integer", "limit", "invalid_type") from None
        try:
            docs, cursor = gateway.knowledge.list(auth.tenant_id, limit=limit, cursor=q.get("after"))
        except KnowledgeError as exc:
            if exc.param == "cursor":  # the store's name for it; clients send it as 'after'
                raise invalid("'after' must be a next_cursor this API returned", "after", "invalid_value") from None
            raise
        return JSON({"object": "list", "data": [d.public() for d in docs], "has_more": cursor is not None,
                     "next_cursor": cursor})

    @app.get("/v1/documents/{doc_id}")
    def get_document(doc_id: str, auth: AuthContext = Depends(read)):
        return JSON(gateway.knowledge.get(auth.tenant_id, doc_id).public())

    @app.delete("/v1/documents/{doc_id}")
    def delete_document(doc_id: str, auth: AuthContext = Depends(write)):
        gateway.knowledge.delete(auth.tenant_id, doc_id)
        return JSON({"id": doc_id, "object": "document", "deleted": True})

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, auth: AuthContext = Depends(read)):
        return JSON(gateway.knowledge.get_job(auth.tenant_id, job_id))

    @app.post("/v1/knowledge/query")
    async def query(request: Request, auth: AuthContext = Depends(read)):
        data = parse_json(await request.body())
        if not isinstance(data, dict):
            raise invalid("The request body must be a JSON object.", code="invalid_type")
        chunks = await asyncio.to_thread(
            gateway.knowledge.query, auth.tenant_id, data.get("query"), data.get("top_k", 5),
            data.get("filters"), data.get("mode", "hybrid"))
        from loadbear.knowledge.service import chunk_public

        return JSON({"object": "list", "data": [chunk_public(c) for c in chunks]})
