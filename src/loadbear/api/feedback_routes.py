"""Feedback on AI interactions: ``POST /v1/feedback`` and ``GET /v1/feedback``.

A client (usually the product's thumbs or stars widget) reports how an answer was::

    POST /v1/feedback
    {"interaction_id": "<id of the chat completion>", "rating": -1, "scale": "thumbs",
     "comment": "Wrong refund window", "correction": "14 days from the first payment", "user": "u-42"}

* ``interaction_id`` is the ``id`` of the chat completion (also ``loadbear.interaction_id`` in the
  body and the ``x-loadbear-interaction-id`` header). It must be an interaction of the key's own
  tenant: another tenant's interaction gets exactly the same 404 ``interaction_not_found`` as an
  id that never existed, and nothing is written.
* ``rating`` is +1/-1 (``scale: "thumbs"``) or 1..5 (``scale: "stars"``). ``scale`` may be left
  out when the rating says it: -1 is thumbs, 2..5 are stars. ``rating: 1`` is both a thumbs-up
  and a one-star rating, the most negative verdict on a stars scale, so it needs ``scale``
  (400 ``missing_required_parameter``, param ``scale``): guessing would silently turn a stars
  widget's worst ratings into thumbs-ups.
* ``negative`` is derived and stored: thumbs -1, or at most 2 stars.
* ``comment`` (up to 2,000 characters) and ``correction`` (the right answer, up to 8,000) are
  optional; empty strings count as absent. Feedback text is stored whatever the tenant's
  ``store_content`` setting: the client sends it in order to have it stored.
* ``user`` (optional, up to 256 characters): the end user giving the feedback, the same external
  id as the chat ``user`` field.

Feedback is append-only: each POST adds a row (201 with the stored object). An interaction can
collect several; readers wanting one verdict per interaction (``loadbear eval harvest``) take the
latest one.

``GET /v1/feedback?interaction_id=...&limit=20`` (scope ``usage:read``) lists the tenant's
feedback, newest first; without ``interaction_id`` the tenant's most recent feedback. A filter on
an unknown (or another tenant's) interaction is an empty list.

The ledger writes interaction rows off the request path, so feedback sent right after the
answer can arrive before its row: a lookup that misses first lets this process's ledger write
what it holds (at most 5 s), looks again, then waits two ledger flush intervals (the row may be
in another replica's writer) and looks a last time before the 404. Unknown and foreign ids take
the same path, so the wait tells nothing either.

The functions below the routes (:func:`parse_feedback`, :func:`record_feedback`,
:func:`list_feedback`) are the library: the routes only authenticate and translate.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request

from loadbear.api.responses import JSON
from loadbear.gateway.errors import ApiError, invalid
from loadbear.gateway.validation import parse_json
from loadbear.storage.db import Conn, Database
from loadbear.storage.values import db_time, iso, utcnow, uuid7
from loadbear.tenancy.models import AuthContext
from loadbear.tenancy.service import user_uuid

COMMENT_MAX = 2000
CORRECTION_MAX = 8000
USER_MAX = 256
LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 100
# How long a feedback request waits for the ledger to write rows it still holds.
LEDGER_WAIT_S = 5.0

SCALES = ("thumbs", "stars")
FIELDS = {"interaction_id", "rating", "scale", "comment", "correction", "user"}


@dataclass(frozen=True)
class Feedback:
    """A validated feedback request (not yet stored)."""

    interaction_id: str
    rating: int
    scale: str
    comment: str | None = None
    correction: str | None = None
    user: str | None = None

    @property
    def negative(self) -> bool:
        return is_negative(self.rating, self.scale)


def is_negative(rating: int, scale: str) -> bool:
    return rating == -1 if scale == "thumbs" else rating <= 2


def interaction_not_found(interaction_id: str) -> ApiError:
    # One message for "never existed" and "another tenant's": nothing tells them apart.
    return ApiError(404, f"No interaction found with id '{interaction_id}'.", type="not_found_error",
                    code="interaction_not_found", param="interaction_id")


# -- validation ---------------------------------------------------------------------------


def parse_interaction_id(value: Any, param: str = "interaction_id") -> str:
    """The canonical text of an interaction id (a UUID), or a 400."""
    if value is None:
        raise invalid(f"'{param}' is required: the id of the chat completion the feedback is about",
                      param, "missing_required_parameter")
    if not isinstance(value, str):
        raise invalid(f"'{param}' must be a string", param, "invalid_type")
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise invalid(f"'{param}' must be an interaction id (a UUID, the 'id' of a chat completion), "
                      f"got {value[:80]!r}", param, "invalid_value") from None


def _text(data: dict[str, Any], name: str, limit: int) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a string", name, "invalid_type")
    if len(value) > limit:
        raise invalid(f"'{name}' is longer than {limit} characters ({len(value)})", name,
                      "string_above_max_length")
    return value if value.strip() else None


def parse_rating(rating: Any, scale: Any) -> tuple[int, str]:
    """``(rating, scale)`` from what the client sent; see the module docstring for the rules."""
    if scale is not None and scale not in SCALES:
        raise invalid("'scale' must be 'thumbs' (+1/-1) or 'stars' (1..5)", "scale", "invalid_value")
    if rating is None:
        raise invalid("'rating' is required: +1/-1 (thumbs) or 1..5 (stars)", "rating", "missing_required_parameter")
    if isinstance(rating, float) and rating.is_integer():
        rating = int(rating)
    if not isinstance(rating, int) or isinstance(rating, bool):
        raise invalid("'rating' must be an integer: +1/-1 (thumbs) or 1..5 (stars)", "rating", "invalid_type")
    if scale == "thumbs":
        if rating not in (-1, 1):
            raise invalid(f"a thumbs rating is +1 or -1, got {rating}", "rating", "invalid_value")
    elif scale == "stars":
        if not 1 <= rating <= 5:
            raise invalid(f"a stars rating is 1..5, got {rating}", "rating", "invalid_value")
    elif rating == -1:
        scale = "thumbs"
    elif 2 <= rating <= 5:
        scale = "stars"
    elif rating == 1:
        raise invalid("'rating': 1 is a thumbs-up or one star (the worst rating): send 'scale' as "
                      "'thumbs' or 'stars' to say which", "scale", "missing_required_parameter")
    else:
        raise invalid(f"'rating' must be +1/-1 (thumbs) or 1..5 (stars), got {rating}", "rating", "invalid_value")
    return rating, scale


def parse_feedback(data: Any) -> Feedback:
    """Validate a ``POST /v1/feedback`` body; raises :class:`ApiError` (400) naming the field."""
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_type")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(unknown)}; expected {', '.join(sorted(FIELDS))}",
                      unknown[0], "unknown_parameter")
    interaction_id = parse_interaction_id(data.get("interaction_id"))
    rating, scale = parse_rating(data.get("rating"), data.get("scale"))
    user = data.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > USER_MAX):
        raise invalid(f"'user' must be a string of at most {USER_MAX} characters", "user", "invalid_type")
    return Feedback(interaction_id=interaction_id, rating=rating, scale=scale,
                    comment=_text(data, "comment", COMMENT_MAX), correction=_text(data, "correction", CORRECTION_MAX),
                    user=user or None)


# -- storage ------------------------------------------------------------------------------


def _wait_for_ledger(gateway: Any, attempt: int) -> None:
    """Before looking again for an interaction that was not found.

    First this process's ledger writes what it holds (returns at once when it holds nothing).
    Then, once, a pause of two ledger flush intervals: another API replica may have served the
    answer, and its writer commits within a flush interval.
    """
    if attempt == 0:
        ledger = getattr(gateway, "_ledger", None)
        if ledger is not None:
            ledger.flush(LEDGER_WAIT_S)
    else:
        interval_ms = getattr(getattr(gateway, "settings", None), "ledger_flush_interval_ms", 50)
        time.sleep(min(2 * interval_ms / 1000, 1.0))


def _interaction_exists(c: Conn, tenant_id: str, interaction_id: str) -> bool:
    # The tenant filter is the boundary on SQLite; on PostgreSQL row-level security also holds.
    return c.scalar("SELECT 1 FROM ai_interactions WHERE id = ? AND tenant_id = ?",
                    (interaction_id, tenant_id)) is not None


def record_feedback(gateway: Any, tenant_id: str, fb: Feedback) -> dict[str, Any]:
    """Store one feedback row for an interaction of ``tenant_id``; returns the public object.

    Raises the 404 ``interaction_not_found`` (and writes nothing) when the interaction is not the
    tenant's, whether it belongs to another tenant or never existed.
    """
    db: Database = gateway.db
    for attempt in range(3):
        with db.tenant_tx(tenant_id) as c:
            if _interaction_exists(c, tenant_id, fb.interaction_id):
                return _insert(c, db.dialect, tenant_id, fb)
        # A miss: the row may still be on its way through a ledger writer.
        if attempt < 2:
            _wait_for_ledger(gateway, attempt)
    raise interaction_not_found(fb.interaction_id)


def _insert(c: Conn, dialect: str, tenant_id: str, fb: Feedback) -> dict[str, Any]:
    user_id = None
    if fb.user:
        user_id = user_uuid(str(tenant_id), fb.user)
        c.execute("INSERT INTO users (id, tenant_id, external_id) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                  (user_id, tenant_id, fb.user))
    fid = uuid7()
    now = db_time(dialect, utcnow())
    c.execute(
        "INSERT INTO feedback (id, tenant_id, interaction_id, user_id, rating, scale, negative, comment, correction,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (fid, tenant_id, fb.interaction_id, user_id, fb.rating, fb.scale, fb.negative, fb.comment, fb.correction,
         now),
    )
    return {
        "id": fid, "object": "feedback", "interaction_id": fb.interaction_id, "rating": fb.rating,
        "scale": fb.scale, "negative": fb.negative, "comment": fb.comment, "correction": fb.correction,
        "user": fb.user, "created_at": iso(now),
    }


def feedback_public(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]), "object": "feedback", "interaction_id": str(row["interaction_id"]),
        "rating": int(row["rating"]), "scale": row["scale"], "negative": bool(row["negative"]),
        "comment": row["comment"], "correction": row["correction"], "user": row.get("user_external_id"),
        "created_at": iso(row["created_at"]),
    }


def list_feedback(db: Database, tenant_id: str, interaction_id: str | None = None,
                  limit: int = LIST_LIMIT_DEFAULT) -> tuple[list[dict[str, Any]], bool]:
    """The tenant's feedback, newest first (optionally for one interaction): ``(items, has_more)``."""
    sql = ("SELECT f.id, f.interaction_id, f.rating, f.scale, f.negative, f.comment, f.correction, f.created_at,"
           " u.external_id AS user_external_id FROM feedback f"
           " LEFT JOIN users u ON u.id = f.user_id AND u.tenant_id = f.tenant_id WHERE f.tenant_id = ?")
    params: list[Any] = [tenant_id]
    if interaction_id is not None:
        sql += " AND f.interaction_id = ?"
        params.append(interaction_id)
    sql += " ORDER BY f.created_at DESC, f.id DESC LIMIT ?"
    params.append(limit + 1)
    with db.tenant_tx(tenant_id, write=False) as c:
        rows = c.fetchall(sql, params)
    return [feedback_public(r) for r in rows[:limit]], len(rows) > limit


# -- routes -------------------------------------------------------------------------------


def add_feedback_routes(app: FastAPI, gateway: Any, scope: Callable[[str], Callable[..., Any]]) -> None:
    write = scope("feedback:write")
    read = scope("usage:read")

    @app.post("/v1/feedback", status_code=201)
    async def create_feedback(request: Request, auth: AuthContext = Depends(write)):
        fb = parse_feedback(parse_json(await request.body()))
        stored = await asyncio.to_thread(record_feedback, gateway, auth.tenant_id, fb)
        return JSON(stored, status_code=201)

    @app.get("/v1/feedback")
    def get_feedback(request: Request, auth: AuthContext = Depends(read)):
        q = request.query_params
        interaction_id = q.get("interaction_id")
        if interaction_id is not None:
            interaction_id = parse_interaction_id(interaction_id)
        raw_limit = q.get("limit", str(LIST_LIMIT_DEFAULT))
        try:
            limit = int(raw_limit)
        except ValueError:
            raise invalid("'limit' must be an integer", "limit", "invalid_type") from None
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise invalid(f"'limit' must be between 1 and {LIST_LIMIT_MAX}", "limit", "invalid_value")
        items, has_more = list_feedback(gateway.db, auth.tenant_id, interaction_id, limit)
        return JSON({"object": "list", "data": items, "has_more": has_more})
