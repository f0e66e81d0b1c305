"""Validation of ``/v1/chat/completions`` bodies, with errors that name the offending field.

Hand-written rather than a pydantic model: it is on the hot path, and every message here is
one a product engineer will read in their logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from loadbear.gateway.errors import ApiError, invalid

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_MESSAGES = 2048
FEATURE_MAX = 100


@dataclass(slots=True)
class ChatBody:
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    user: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    feature: str | None = None
    cache: bool = True
    knowledge: dict[str, Any] | None = None


def parse_json(raw: bytes) -> Any:
    if not raw:
        raise invalid("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


# Ledger metadata keys loadbear itself writes. Eval traffic (``eval_*``) is kept out of the usage
# rollups, budgets' spend and the dashboard, and ``skipped``/``route``/``continuations`` feed the
# reliability numbers: a client that could set them could hide its spend or forge those numbers.
RESERVED_METADATA_KEYS = frozenset({"eval_run", "eval_case", "eval_role", "skipped", "route", "continuations"})


def parse_chat_body(raw: bytes, *, trusted: bool = False) -> ChatBody:
    """Parse and validate an OpenAI-shaped chat request.

    ``trusted`` is for loadbear's own callers (the evaluation runner and judge), which mark their
    traffic with reserved metadata keys; requests from the API are never trusted.
    """
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_type")

    model = data.get("model")
    if model is None:
        raise invalid("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model.strip():
        raise invalid("'model' must be a non-empty string", "model", "invalid_type")

    messages = data.get("messages")
    if messages is None:
        raise invalid("'messages' is a required property", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array", "messages", "invalid_type")
    if len(messages) > MAX_MESSAGES:
        raise invalid(f"'messages' has more than {MAX_MESSAGES} items", "messages", "array_above_max_length")
    clean = [_message(m, i) for i, m in enumerate(messages)]

    body = ChatBody(model=model, messages=clean)
    stream = data.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean", "stream", "invalid_type")
    body.stream = bool(stream)
    so = data.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
        if not body.stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
        iu = so.get("include_usage", False)
        if not isinstance(iu, bool):
            raise invalid("'stream_options.include_usage' must be a boolean", "stream_options.include_usage", "invalid_type")
        body.include_usage = iu

    body.temperature = _number(data, "temperature", 0.0, 2.0)
    body.top_p = _number(data, "top_p", 0.0, 1.0)
    mt = data.get("max_completion_tokens", data.get("max_tokens"))
    if mt is not None:
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            param = "max_completion_tokens" if "max_completion_tokens" in data else "max_tokens"
            raise invalid(f"'{param}' must be an integer ≥ 1", param, "invalid_type")
        body.max_tokens = mt
    n = data.get("n")
    if n is not None and n != 1:
        raise invalid("only n=1 is supported", "n", "unsupported_value")

    stop = data.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise invalid("'stop' must be a string or an array of up to 4 non-empty strings", "stop", "invalid_type")
        body.stop = stop or None

    user = data.get("user")
    if user is not None:
        if not isinstance(user, str) or len(user) > 256:
            raise invalid("'user' must be a string of at most 256 characters", "user", "invalid_type")
        body.user = user or None

    metadata = data.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise invalid("'metadata' must be an object", "metadata", "invalid_type")
        if len(metadata) > 16 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise invalid("'metadata' holds at most 16 string keys with string values", "metadata", "invalid_type")
        if not trusted:
            reserved = sorted(RESERVED_METADATA_KEYS.intersection(metadata))
            if reserved:
                raise invalid(f"'metadata.{reserved[0]}' is reserved for loadbear's own use", f"metadata.{reserved[0]}",
                              "reserved_metadata_key")
        body.metadata = metadata
        feature = metadata.get("feature")
        if feature is not None:
            body.feature = check_feature(feature, "metadata.feature")

    cache = data.get("cache", True)
    if not isinstance(cache, bool):
        raise invalid("'cache' must be a boolean", "cache", "invalid_type")
    body.cache = cache
    knowledge = data.get("knowledge")
    if knowledge is not None and not isinstance(knowledge, dict):
        raise invalid("'knowledge' must be an object", "knowledge", "invalid_type")
    body.knowledge = knowledge
    return body


def parse_cache_header(value: str) -> bool:
    """``X-Loadbear-Cache: off`` bypasses the response cache like ``"cache": false``; ``on`` is the default."""
    v = value.strip().lower()
    if v not in ("on", "off"):
        raise invalid("the X-Loadbear-Cache header must be 'on' or 'off'", "X-Loadbear-Cache", "invalid_value")
    return v == "on"


def check_feature(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value or len(value) > FEATURE_MAX:
        raise invalid(f"'{param}' must be a non-empty string of at most {FEATURE_MAX} characters", param, "invalid_type")
    return value


def _number(data: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = data.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise invalid(f"'{name}' must be a number", name, "invalid_type")
    if not lo <= v <= hi:
        raise invalid(f"'{name}' must be between {lo:g} and {hi:g}, got {v}", name, "invalid_value")
    return float(v)


def _message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise invalid(f"'{where}' must be an object", where, "invalid_type")
    role = m.get("role")
    if role not in ROLES:
        raise invalid(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}", f"{where}.role", "invalid_value")
    content = m.get("content")
    if isinstance(content, list):
        # Content parts: keep the text ones; images and audio are not supported yet.
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(
                    f"'{where}.content[{j}]' must be a text part ({{\"type\": \"text\", \"text\": ...}}); "
                    "other content types are not supported",
                    f"{where}.content[{j}]",
                    "unsupported_value",
                )
            texts.append(part["text"])
        content = "".join(texts)
    elif content is None:
        if role != "assistant":
            raise invalid(f"'{where}.content' is required", f"{where}.content", "missing_required_parameter")
        content = ""
    elif not isinstance(content, str):
        raise invalid(f"'{where}.content' must be a string or an array of text parts", f"{where}.content", "invalid_type")
    out: dict[str, Any] = {"role": role, "content": content}
    name = m.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise invalid(f"'{where}.name' must be a string", f"{where}.name", "invalid_type")
        out["name"] = name
    return out


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body exceeds the limit of {limit} bytes.", code="request_too_large")
