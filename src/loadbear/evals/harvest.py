"""Harvest: turn what went wrong in production into draft evaluation cases, ready to label.

``loadbear eval harvest --tenant SLUG --since 7d -o cases.yaml`` calls :func:`harvest_cases`.
One draft case per interaction (deduplicated), newest first, for every interaction of the
tenant that

* got **negative feedback** (tag ``negative-feedback``): the interaction's *latest* feedback is
  negative (thumbs -1, or at most 2 stars) and was given within the window. Feedback is
  append-only and the latest row wins: a user who turned a thumbs-down into a thumbs-up has
  withdrawn the complaint. The correction is the latest one given for the interaction;
* ended **degraded** (tag ``degraded``): every model failed and the tenant's fallback message
  (or a similar cached answer) was served, within the window;
* ended in an **error** (tag ``error``): e.g. the upstream refused the request, or a stream
  failed mid-answer, within the window.

Several reasons give one case with all their tags. Cases have the dataset format of
``examples/helpdesk/eval.yaml`` (``id``, ``query``, ``expected``, ``expected_sources``,
``feature``, ``tags``) plus ``needs_label`` and a ``source`` block saying where the case came
from. The query is the last user message of the stored prompt and the stored answer is in
``source.answer``, but only where the tenant's ``store_content`` setting was on when the
interaction ran; otherwise the case has ``query: null`` and a note, and needs a human to write
the question. ``expected`` is the feedback's correction when there is one, else ``[]``;
``needs_label`` is true unless both the query and the expected answer are known.

All reads run in the tenant's transaction (row-level security on PostgreSQL) and filter on the
tenant: no other tenant's rows can reach a case.
"""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable

from loadbear.storage.values import db_time, iso, loads, utcnow

HARVEST_TAG = "harvested"
REASON_TAGS = {"negative": "negative-feedback", "degraded": "degraded", "error": "error"}
NOT_STORED_NOTE = ("content not stored: the tenant's store_content setting was off for this interaction; "
                   "write the query (and expected answer) by hand")
_MAX_DURATION = timedelta(days=3660)
_IN_CHUNK = 500  # ids per IN (...) list

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# The ledger stores a prompt as "role: content" lines joined by newlines (gateway/chat.py).
_ROLE_LINE = re.compile(r"^(system|developer|user|assistant|tool): ", re.MULTILINE)

_INTERACTION_COLS = ("id, created_at, feature, model, requested_model, status, error_type, error, http_status,"
                     " retrieved_chunk_ids, prompt_text, response_text")
_FEEDBACK_COLS = "id, interaction_id, rating, scale, negative, comment, correction, created_at"


class SinceError(ValueError):
    """A ``--since`` value that is neither a duration nor an ISO date."""


def parse_since(value: str, now: datetime | None = None) -> timedelta | datetime:
    """``"7d"``, ``"24h"``, ``"30m"``, ``"90s"``, ``"2w"`` → a :class:`timedelta`;
    ``"2026-01-31"`` or ``"2026-01-31T12:00:00Z"`` → an aware UTC :class:`datetime`
    (a date means its midnight UTC; a time without offset is UTC).

    Raises :class:`SinceError` (a ``ValueError``) with the reason: not a duration or a date, a
    zero or absurdly long duration, a date in the future.
    """
    if not isinstance(value, str) or not value.strip():
        raise SinceError("since must be a duration like 7d, 24h or 30m, or an ISO date like 2026-01-31; got nothing")
    text = value.strip()
    m = _DURATION.match(text)
    if m:
        amount, unit = int(m.group(1)), m.group(2).lower()
        if amount == 0:
            raise SinceError(f"since {text!r} is an empty window: use a duration above zero, like 7d")
        try:
            delta = timedelta(**{_UNITS[unit]: amount})
        except OverflowError:
            delta = _MAX_DURATION + timedelta(days=1)
        if delta > _MAX_DURATION:
            raise SinceError(f"since {text!r} is too long ago: at most {_MAX_DURATION.days} days")
        return delta
    try:
        if len(text) == 10:
            parsed = datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=timezone.utc)
        else:
            parsed = datetime.fromisoformat(text)
    except ValueError:
        raise SinceError(
            f"since {text!r} is neither a duration (a number and a unit: s, m, h, d or w, like 7d, 24h, 30m)"
            " nor an ISO date or time (like 2026-01-31 or 2026-01-31T12:00:00Z)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    parsed = parsed.astimezone(timezone.utc)
    if parsed > (now or utcnow()):
        raise SinceError(f"since {text!r} is in the future")
    return parsed


def since_time(since: datetime | timedelta | str, now: datetime | None = None) -> datetime:
    """The start of the window as an aware UTC datetime (naive datetimes are UTC)."""
    now = now or utcnow()
    if isinstance(since, str):
        since = parse_since(since, now)
    if isinstance(since, timedelta):
        if since <= timedelta(0):
            raise SinceError("since must be a positive duration")
        return now - since
    if isinstance(since, datetime):
        return since.replace(tzinfo=timezone.utc) if since.tzinfo is None else since.astimezone(timezone.utc)
    raise TypeError(f"since must be a datetime, a timedelta or a string like '7d', not {type(since).__name__}")


def last_user_message(prompt_text: str | None) -> str | None:
    """The last user message of a prompt as the ledger stores it (``role: content`` lines)."""
    if prompt_text is None:
        return None
    marks = list(_ROLE_LINE.finditer(prompt_text))
    if not marks:
        return prompt_text.strip() or None
    for i in range(len(marks) - 1, -1, -1):
        if marks[i].group(1) != "user":
            continue
        end = marks[i + 1].start() if i + 1 < len(marks) else len(prompt_text)
        return prompt_text[marks[i].end():end].strip() or None
    return None


def harvest_cases(
    gateway: Any,
    tenant_id: str,
    since: datetime | timedelta | str,
    *,
    until: datetime | None = None,
    feature: str | None = None,
    limit: int | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Draft eval cases from the tenant's negative feedback, degraded answers and errors.

    ``gateway`` is a :class:`loadbear.Gateway` (or anything with ``.db``); ``tenant_id`` the
    tenant's id, or its slug when the gateway can resolve one; ``since`` the window's start: a
    datetime, a timedelta back from now, or a string for :func:`parse_since`. ``until`` (an
    exclusive end), ``feature`` and ``limit`` narrow the harvest. Returns plain dicts (YAML/JSON
    ready), newest interaction first.
    """
    db = gateway.db
    tenant_id = _tenant_id(gateway, tenant_id)
    start = since_time(since, now)
    ledger = getattr(gateway, "_ledger", None)
    if ledger is not None:
        ledger.flush(10)  # rows still queued in this process belong in the harvest
    lo = db_time(db.dialect, start)
    hi = None if until is None else db_time(db.dialect, since_time(until, now))

    with db.tenant_tx(tenant_id, write=False) as c:
        # 1. Feedback given in the window: every earlier row of those interactions too, to find
        #    the latest (as of ``until`` when given).
        before = " AND created_at < ?" if hi is not None else ""
        sql = (f"SELECT {_FEEDBACK_COLS} FROM feedback WHERE tenant_id = ?{before} AND interaction_id IN"
               f" (SELECT interaction_id FROM feedback WHERE tenant_id = ? AND created_at >= ?{before})"
               " ORDER BY interaction_id, created_at, id")
        upper = [hi] if hi is not None else []
        rows = c.fetchall(sql, [tenant_id, *upper, tenant_id, lo, *upper])
        feedback = _by_interaction(rows)
        negative = {iid for iid, fb in feedback.items()
                    if fb["latest"]["negative"] and _in_window(fb["latest"]["created_at"], lo, hi)}

        # 2. Degraded and failed interactions in the window.
        sql = (f"SELECT {_INTERACTION_COLS} FROM ai_interactions WHERE tenant_id = ? AND created_at >= ?"
               + (" AND created_at < ?" if hi is not None else "")
               + " AND status IN ('degraded', 'error')")
        params: list[Any] = [tenant_id, lo] + ([hi] if hi is not None else [])
        if feature is not None:
            sql += " AND feature = ?"
            params.append(feature)
        interactions = {str(r["id"]): r for r in c.fetchall(sql, params)}

        # 3. The interactions behind negative feedback (any age), and feedback on the failures.
        missing = [iid for iid in negative if iid not in interactions]
        for chunk in _chunks(missing):
            sql = (f"SELECT {_INTERACTION_COLS} FROM ai_interactions WHERE tenant_id = ?"
                   f" AND id IN ({', '.join('?' for _ in chunk)})")
            params = [tenant_id, *chunk]
            if feature is not None:
                sql += " AND feature = ?"
                params.append(feature)
            interactions.update((str(r["id"]), r) for r in c.fetchall(sql, params))
        unrated = [iid for iid in interactions if iid not in feedback]
        for chunk in _chunks(unrated):
            sql = (f"SELECT {_FEEDBACK_COLS} FROM feedback WHERE tenant_id = ?{before}"
                   f" AND interaction_id IN ({', '.join('?' for _ in chunk)}) ORDER BY interaction_id, created_at, id")
            feedback.update(_by_interaction(c.fetchall(sql, [tenant_id, *upper, *chunk])))

    ordered = sorted(interactions.values(), key=lambda r: (r["created_at"], str(r["id"])), reverse=True)
    cases = []
    for row in ordered:
        iid = str(row["id"])
        reasons = []
        if iid in negative:
            reasons.append("negative")
        if row["status"] in ("degraded", "error") and _in_window(row["created_at"], lo, hi):
            reasons.append(row["status"])
        if reasons:
            cases.append(_case(row, reasons, feedback.get(iid)))
    return cases[:limit] if limit is not None else cases


def _tenant_id(gateway: Any, tenant: str) -> str:
    try:
        return str(uuid.UUID(str(tenant)))
    except ValueError:
        pass
    tenants = getattr(gateway, "tenants", None)
    if tenants is None:
        raise ValueError(f"tenant {tenant!r} is not a tenant id, and there is no tenant service to look up a slug")
    return tenants.get_tenant(tenant).id  # TenancyError (404) when there is no such slug


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(ids), _IN_CHUNK):
        yield ids[i:i + _IN_CHUNK]


def _in_window(value: Any, lo: Any, hi: Any) -> bool:
    # Same backend, same type: UTC text on SQLite, aware datetimes on PostgreSQL.
    return value >= lo and (hi is None or value < hi)


def _by_interaction(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per interaction (rows ordered oldest first): the latest row, the latest correction, the count."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        r["negative"] = bool(r["negative"])
        entry = out.setdefault(str(r["interaction_id"]), {"latest": r, "correction": None, "count": 0})
        entry["latest"] = r
        entry["count"] += 1
        if r["correction"]:
            entry["correction"] = r["correction"]
    return out


def _case(row: dict[str, Any], reasons: list[str], fb: dict[str, Any] | None) -> dict[str, Any]:
    iid = str(row["id"])
    stored = row["prompt_text"] is not None
    query = last_user_message(row["prompt_text"]) if stored else None
    correction = fb["correction"] if fb else None
    expected = [correction] if correction else []
    source: dict[str, Any] = {
        "interaction_id": iid,
        "created_at": iso(row["created_at"]),
        "model": row["model"],
        "requested_model": row["requested_model"],
        "status": row["status"],
    }
    if row["status"] != "ok":
        source["error_type"] = row["error_type"]
        source["error"] = row["error"]
        source["http_status"] = row["http_status"]
    if fb:
        latest = fb["latest"]
        source.update({
            "rating": int(latest["rating"]), "scale": latest["scale"], "negative": latest["negative"],
            "comment": latest["comment"], "feedback_at": iso(latest["created_at"]), "feedback_count": fb["count"],
        })
    else:
        source["rating"] = None
    source["content_stored"] = stored
    if stored:
        source["answer"] = row["response_text"]
    else:
        source["answer"] = None
        source["note"] = NOT_STORED_NOTE
    chunks = loads(row["retrieved_chunk_ids"])
    if chunks:
        source["retrieved_chunk_ids"] = [str(x) for x in chunks]
    return {
        "id": f"{HARVEST_TAG}-{iid}",
        "query": query,
        "expected": expected,
        "expected_sources": [],
        "feature": row["feature"],
        "tags": [HARVEST_TAG, *(REASON_TAGS[r] for r in reasons)],
        "needs_label": query is None or not expected,
        "source": source,
    }
