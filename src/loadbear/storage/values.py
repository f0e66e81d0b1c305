"""Conversions between Python values and what each backend stores."""

from __future__ import annotations

import os
import time
import uuid
from datetime import date, datetime, timezone
from typing import Any

import orjson


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def db_time(dialect: str, dt: datetime) -> Any:
    """SQLite keeps UTC ISO text (sortable, the first 10 chars are the day); PostgreSQL a timestamptz."""
    if dialect == "sqlite":
        return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return dt


def db_day(dialect: str, d: date) -> Any:
    return d.isoformat() if dialect == "sqlite" else d


def iso(value: Any) -> str | None:
    """A stored time as ISO 8601 UTC text, whichever backend it came from."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    text = str(value)
    if len(text) > 10 and "T" in text and not text.endswith("Z") and "+" not in text[10:]:
        return text + "Z"
    return text


def day_str(value: Any) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)[:10]


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return value  # psycopg already decoded jsonb
    return orjson.loads(value)


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 v7): new ledger rows land at the right edge of the index."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))
