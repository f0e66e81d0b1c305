"""Anthropic Messages API (``POST {base_url}/v1/messages``), plain HTTP (the lean client in ``_h1``).

Mapping from our OpenAI-shaped requests:

* ``system`` / ``developer`` messages are joined (blank line) into the top-level ``system``;
  ``tool`` messages become user text; other keys (``name``, ``tool_calls``) are dropped.
* OpenAI content parts map to Anthropic blocks (``text``; ``image_url`` -> ``image`` with a
  base64 or url source).
* ``max_tokens`` is required by Anthropic: 1024 when the client gave none.
  ``temperature`` is clamped to Anthropic's 0..1 range; ``stop`` -> ``stop_sequences``;
  ``user`` -> ``metadata.user_id``.
* Usage: ``prompt_tokens = input_tokens + cache_read_input_tokens +
  cache_creation_input_tokens`` (Anthropic reports them apart; all are prompt tokens),
  ``cached_tokens = cache_read_input_tokens``.
* ``stop_reason``: end_turn/stop_sequence -> "stop", max_tokens -> "length",
  tool_use -> "tool_calls", refusal -> "content_filter".
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from ._http import (
    make_client,
    SSEStream,
    estimate_usage,
    inband_error,
    map_exception,
    map_http_error,
    valid_counts,
)
from .base import ChatRequest, Completion, ErrorKind, ModelConfig, ProviderError, StreamDelta, Usage
from .tokens import content_text, count_text

__all__ = ["AnthropicProvider"]

DEFAULT_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}

_SKIP_EVENTS = frozenset({b"ping", b"content_block_start", b"content_block_stop"})


def _map_part(part: Any) -> dict[str, Any] | None:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part.get("text") or ""}
    if kind == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            return None
        if url.startswith("data:"):
            header, _, data = url.partition(",")
            media_type = header[5:].split(";", 1)[0] or "image/png"
            return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
        return {"type": "image", "source": {"type": "url", "url": url}}
    if kind in ("image", "document"):  # already Anthropic-shaped
        return part
    text = part.get("text")
    return {"type": "text", "text": text} if isinstance(text, str) else None


class AnthropicProvider:
    """Chat over the Anthropic Messages API. Anthropic has no embeddings endpoint."""

    name = "anthropic"

    def __init__(
        self, *, limit: int = 1024, keepalive_timeout: float = 30.0, trust_env: bool | None = None
    ) -> None:
        self._http = make_client("anthropic", limit=limit, keepalive_timeout=keepalive_timeout, trust_env=trust_env)
        self._urls: dict[str, str] = {}

    # ------------------------------------------------------------------ mapping

    def _url(self, model: ModelConfig) -> str:
        base = model.base_url or DEFAULT_BASE_URL
        url = self._urls.get(base)
        if url is None:
            url = self._urls[base] = base.rstrip("/") + "/v1/messages"
        return url

    @staticmethod
    def _headers(model: ModelConfig) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "anthropic-version": ANTHROPIC_VERSION,
        }
        if model.api_key:
            headers["x-api-key"] = model.api_key
        if model.extra_headers:
            headers.update(model.extra_headers)
        return headers

    @staticmethod
    def _map_messages(request: ChatRequest, model: ModelConfig, stream: bool) -> dict[str, Any]:
        system: list[str] = []
        messages: list[dict[str, Any]] = []
        for m in request.messages:
            role = m.get("role")
            content = m.get("content")
            if role == "system" or role == "developer":
                text = content_text(content)
                if text:
                    system.append(text)
                continue
            if role != "assistant":
                if role == "tool":
                    content = "Tool result: " + content_text(content)
                role = "user"
            if isinstance(content, list):
                blocks = [b for b in map(_map_part, content) if b is not None]
                if not blocks:
                    continue
                messages.append({"role": role, "content": blocks})
            else:
                text = content if isinstance(content, str) else content_text(content)
                if not text:
                    continue
                messages.append({"role": role, "content": text})
        if messages and messages[-1]["role"] == "assistant" and isinstance(messages[-1]["content"], str):
            # A final assistant "prefill" must not end with whitespace.
            messages[-1]["content"] = messages[-1]["content"].rstrip()
        body: dict[str, Any] = {
            "model": model.upstream_model,
            "max_tokens": request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS,
            "messages": messages,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if stream:
            body["stream"] = True
        if request.temperature is not None:
            body["temperature"] = min(max(request.temperature, 0.0), 1.0)
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = request.stop
        if request.user is not None:
            body["metadata"] = {"user_id": request.user}
        return body

    @staticmethod
    def _map_error(status: int | None, body_or_exc: Any, headers: Any = None) -> ProviderError:
        if status is None or isinstance(body_or_exc, BaseException):
            return map_exception(body_or_exc, "anthropic")
        return map_http_error(status, body_or_exc, headers, "anthropic")

    @staticmethod
    def _map_usage(wire: Any) -> Usage | None:
        if not wire or not isinstance(wire, dict):
            return None
        cache_read = wire.get("cache_read_input_tokens") or 0
        cache_write = wire.get("cache_creation_input_tokens") or 0
        if not valid_counts(wire.get("input_tokens"), wire.get("output_tokens"), cache_read, cache_write):
            return None  # counted by us instead: a string here would break the cost later
        return Usage(
            prompt_tokens=(wire.get("input_tokens") or 0) + cache_read + cache_write,
            completion_tokens=wire.get("output_tokens") or 0,
            cached_tokens=cache_read,
        )

    # ------------------------------------------------------------------ chat

    async def complete(self, request: ChatRequest, model: ModelConfig) -> Completion:
        body = orjson.dumps(self._map_messages(request, model, False))
        status, headers, raw = await self._http.post(self._url(model), body, self._headers(model), model.timeouts)
        if status != 200:
            raise self._map_error(status, raw, headers)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProviderError(ErrorKind.MALFORMED, "anthropic: response body is not JSON", status=status) from None
        if not isinstance(data, dict):
            raise ProviderError(ErrorKind.MALFORMED, "anthropic: response body is not an object", status=status)
        if data.get("type") == "error" or data.get("error"):
            raise inband_error(data.get("error"), "anthropic", status)
        blocks = data.get("content")
        if not isinstance(blocks, list):
            raise ProviderError(ErrorKind.MALFORMED, "anthropic: response has no content", status=status)
        text = "".join(
            b.get("text") or "" for b in blocks if isinstance(b, dict) and b.get("type") == "text"
        )
        reason = data.get("stop_reason")
        if not text and reason is None:
            # Neither an answer nor a reason for having none: a failure, never an empty success.
            raise ProviderError(ErrorKind.MALFORMED, "anthropic: response has neither text nor a stop reason",
                                status=status)
        finish = STOP_REASONS.get(reason, reason or "stop")
        usage = self._map_usage(data.get("usage"))
        if usage is None:
            usage = estimate_usage(request.messages, text, model.tokenizer)
        return Completion(text, finish, usage, data.get("model") or model.upstream_model)

    async def stream(self, request: ChatRequest, model: ModelConfig) -> AsyncIterator[StreamDelta]:
        body = orjson.dumps(self._map_messages(request, model, True))
        status, headers, sse = await self._http.open_stream(
            self._url(model), body, self._headers(model), model.timeouts
        )
        if not isinstance(sse, SSEStream):
            raise self._json_instead_of_stream(status, sse, headers)
        parts: list[str] = []
        start_usage: Usage | None = None
        output_tokens: int | None = None
        finish: str | None = None
        stopped = False
        other_tokens = False  # thinking or tool input: an answer without text
        loads = orjson.loads
        try:
            while not stopped:
                events = await sse.next_events()
                if events is None:
                    break
                batch = ""  # the text of one network read, yielded as one delta
                err: ProviderError | None = None
                for event, data in events:
                    if event in _SKIP_EVENTS:
                        continue
                    try:
                        obj = loads(data)
                        etype = obj.get("type")
                        if etype == "content_block_delta":
                            delta = obj["delta"]
                            if delta.get("type") == "text_delta":
                                text = delta.get("text")
                                if text:
                                    if not parts:
                                        sse.mark_first()
                                    parts.append(text)
                                    batch += text
                            else:  # thinking / tool input: tokens are flowing
                                sse.mark_first()
                                other_tokens = True
                        elif etype == "message_start":
                            start_usage = self._map_usage((obj.get("message") or {}).get("usage"))
                        elif etype == "message_delta":
                            reason = (obj.get("delta") or {}).get("stop_reason")
                            if reason:
                                finish = STOP_REASONS.get(reason, reason)
                            wire = obj.get("usage")
                            if wire:
                                out = wire.get("output_tokens")
                                if out is not None and valid_counts(out):
                                    output_tokens = out
                                if wire.get("input_tokens") is not None:  # newer API: cumulative input too
                                    start_usage = self._map_usage({**wire, "output_tokens": 0})
                        elif etype == "message_stop":
                            stopped = True
                            break
                        elif etype == "error":
                            err = inband_error(obj.get("error"), "anthropic")
                            break
                    except orjson.JSONDecodeError:
                        err = ProviderError(ErrorKind.MALFORMED, "anthropic: unparseable stream event")
                        break
                    except (AttributeError, TypeError, IndexError, KeyError):
                        err = ProviderError(ErrorKind.MALFORMED, "anthropic: unexpected stream event shape")
                        break
                if batch:
                    yield StreamDelta(batch)
                if err is not None:
                    raise err
            if not stopped:
                raise ProviderError(ErrorKind.STREAM_CUT, "anthropic: stream ended without message_stop")
            if finish is None and not parts and not other_tokens:
                # message_stop with no text and no stop reason: nothing was answered.
                raise ProviderError(ErrorKind.MALFORMED, "anthropic: stream ended with neither text nor a stop reason")
            await sse.drain()
        except ProviderError as exc:
            if exc.usage is None and parts:
                exc.usage = self._estimate(request, model, "".join(parts), start_usage)
            raise
        finally:
            sse.close()
        if start_usage is not None and output_tokens is not None:
            usage = Usage(start_usage.prompt_tokens, output_tokens, start_usage.cached_tokens)
        else:
            usage = self._estimate(request, model, "".join(parts), start_usage)
        yield StreamDelta("", finish or "stop", usage)

    @staticmethod
    def _estimate(request: ChatRequest, model: ModelConfig, text: str, start: Usage | None) -> Usage:
        if start is None:
            return estimate_usage(request.messages, text, model.tokenizer)
        return Usage(start.prompt_tokens, count_text(text, model.tokenizer), start.cached_tokens, True)

    def _json_instead_of_stream(self, status: int, raw: Any, headers: Any) -> ProviderError:
        if status != 200:
            return self._map_error(status, raw, headers)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return ProviderError(ErrorKind.MALFORMED, "anthropic: unparseable body instead of a stream", status=status)
        if isinstance(data, dict) and (data.get("type") == "error" or data.get("error")):
            return inband_error(data.get("error"), "anthropic", status)
        return ProviderError(ErrorKind.MALFORMED, "anthropic: JSON body instead of an event stream", status=status)

    # ------------------------------------------------------------------ embeddings

    async def embed(self, texts: list[str], model: ModelConfig) -> list[list[float]]:
        raise ProviderError(ErrorKind.NOT_FOUND, "anthropic has no embeddings API; use another provider")

    async def aclose(self) -> None:
        await self._http.aclose()
