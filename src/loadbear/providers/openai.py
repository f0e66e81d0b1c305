"""OpenAI and every OpenAI-compatible host (Azure OpenAI, Ollama, vLLM, llama.cpp, ...).

Plain HTTP over loadbear's lean HTTP/1.1 client (no SDK: it is slow and retries on its own):

* ``POST {base_url}/chat/completions`` (``base_url`` like ``https://api.openai.com/v1``;
  a query string on ``base_url`` such as Azure's ``?api-version=...`` is kept and appended
  after the path),
* ``POST {base_url}/embeddings``.

Auth: ``Authorization: Bearer {api_key}``, unless ``extra_headers`` has an ``api-key``
entry (Azure OpenAI): then that header is sent instead of ``Authorization``, and an empty
value is filled with ``ModelConfig.api_key``.

Streams always ask for ``stream_options: {"include_usage": true}``; a server that sends no
usage gets it counted offline (``Usage.estimated = True``). ``max_tokens`` goes out as
``max_completion_tokens`` to api.openai.com (required by the o-series) and as
``max_tokens`` to every other host (what compatible servers understand).
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

__all__ = ["OpenAIProvider"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_INCLUDE_USAGE = {"include_usage": True}
_DONE = b"[DONE]"


class _Endpoint:
    __slots__ = ("chat", "embeddings", "max_tokens_key")

    def __init__(self, base_url: str) -> None:
        base, sep, query = base_url.partition("?")
        base = base.rstrip("/")
        suffix = sep + query
        self.chat = f"{base}/chat/completions{suffix}"
        self.embeddings = f"{base}/embeddings{suffix}"
        self.max_tokens_key = "max_completion_tokens" if "api.openai.com" in base else "max_tokens"


class OpenAIProvider:
    """Chat completions and embeddings over the OpenAI wire format."""

    name = "openai"

    def __init__(
        self, *, limit: int = 1024, keepalive_timeout: float = 30.0, trust_env: bool | None = None
    ) -> None:
        self._http = make_client("openai", limit=limit, keepalive_timeout=keepalive_timeout, trust_env=trust_env)
        self._endpoints: dict[str, _Endpoint] = {}

    # ------------------------------------------------------------------ mapping

    def _endpoint(self, model: ModelConfig) -> _Endpoint:
        base = model.base_url or DEFAULT_BASE_URL
        ep = self._endpoints.get(base)
        if ep is None:
            ep = self._endpoints[base] = _Endpoint(base)
        return ep

    @staticmethod
    def _headers(model: ModelConfig) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        extra = model.extra_headers
        azure = False
        if extra:
            for key, value in extra.items():
                if key.lower() == "api-key":
                    azure = True
                    headers[key] = value or (model.api_key or "")
                else:
                    headers[key] = value
        if model.api_key and not azure:
            headers["Authorization"] = "Bearer " + model.api_key
        return headers

    @staticmethod
    def _map_messages(request: ChatRequest, model: ModelConfig, stream: bool, max_tokens_key: str = "max_tokens") -> dict[str, Any]:
        """The wire body. Messages are already OpenAI-shaped: passed through untouched."""
        body: dict[str, Any] = {"model": model.upstream_model, "messages": request.messages}
        if stream:
            body["stream"] = True
            body["stream_options"] = _INCLUDE_USAGE
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.max_tokens is not None:
            body[max_tokens_key] = request.max_tokens
        if request.stop:
            body["stop"] = request.stop
        if request.user is not None:
            body["user"] = request.user
        return body

    @staticmethod
    def _map_error(status: int | None, body_or_exc: Any, headers: Any = None) -> ProviderError:
        if status is None or isinstance(body_or_exc, BaseException):
            return map_exception(body_or_exc, "openai")
        return map_http_error(status, body_or_exc, headers, "openai")

    @staticmethod
    def _map_usage(wire: Any) -> Usage | None:
        if not wire or not isinstance(wire, dict):
            return None
        details = wire.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if not valid_counts(wire.get("prompt_tokens"), wire.get("completion_tokens"), cached):
            return None  # counted by us instead: a string here would break the cost later
        return Usage(
            prompt_tokens=wire.get("prompt_tokens") or 0,
            completion_tokens=wire.get("completion_tokens") or 0,
            cached_tokens=cached or 0,
        )

    # ------------------------------------------------------------------ chat

    async def complete(self, request: ChatRequest, model: ModelConfig) -> Completion:
        ep = self._endpoint(model)
        body = orjson.dumps(self._map_messages(request, model, False, ep.max_tokens_key))
        status, headers, raw = await self._http.post(ep.chat, body, self._headers(model), model.timeouts)
        if status != 200:
            raise self._map_error(status, raw, headers)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProviderError(ErrorKind.MALFORMED, "openai: response body is not JSON", status=status) from None
        if not isinstance(data, dict):
            raise ProviderError(ErrorKind.MALFORMED, "openai: response body is not an object", status=status)
        if data.get("error"):
            raise inband_error(data["error"], "openai", status)
        try:
            choice = data["choices"][0]
            message = choice.get("message") or {}
            text = message.get("content") or ""
            finish = choice.get("finish_reason") or "stop"
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ProviderError(ErrorKind.MALFORMED, "openai: response has no choices", status=status) from None
        if not isinstance(text, str):
            text = str(text)
        if not text and choice.get("finish_reason") is None:
            # Neither an answer nor a reason for having none (a broken proxy's placeholder): a
            # failure to retry, never an empty success.
            raise ProviderError(ErrorKind.MALFORMED, "openai: response has neither content nor a finish reason",
                                status=status)
        usage = self._map_usage(data.get("usage"))
        if usage is None:
            usage = estimate_usage(request.messages, text, model.tokenizer)
        return Completion(text, finish, usage, data.get("model") or model.upstream_model)

    async def stream(self, request: ChatRequest, model: ModelConfig) -> AsyncIterator[StreamDelta]:
        ep = self._endpoint(model)
        body = orjson.dumps(self._map_messages(request, model, True, ep.max_tokens_key))
        status, headers, sse = await self._http.open_stream(ep.chat, body, self._headers(model), model.timeouts)
        if not isinstance(sse, SSEStream):
            raise self._json_instead_of_stream(status, sse, headers)
        parts: list[str] = []
        finish: str | None = None
        usage: Usage | None = None
        done = False
        reasoned = False
        loads = orjson.loads
        try:
            while not done:
                events = await sse.next_events()
                if events is None:
                    break
                # Content of one network read is coalesced into one delta: fewer yields and
                # fewer downstream writes when the upstream outpaces us.
                batch = ""
                err: ProviderError | None = None
                for _event, data in events:
                    if data == _DONE:
                        done = True
                        break
                    try:
                        obj = loads(data)
                        choices = obj.get("choices")
                        if choices:
                            choice = choices[0]
                            delta = choice.get("delta")
                            if delta:
                                text = delta.get("content")
                                if text:
                                    if not parts:
                                        sse.mark_first()
                                    parts.append(text)
                                    batch += text
                                elif delta.get("reasoning_content") or delta.get("reasoning"):
                                    sse.mark_first()  # a reasoning token is a token
                                    reasoned = True
                            reason = choice.get("finish_reason")
                            if reason:
                                finish = reason
                        elif obj.get("error"):
                            err = inband_error(obj["error"], "openai")
                            break
                        wire_usage = obj.get("usage")
                        if wire_usage:
                            usage = self._map_usage(wire_usage)
                    except orjson.JSONDecodeError:
                        err = ProviderError(ErrorKind.MALFORMED, "openai: unparseable stream chunk")
                        break
                    except (AttributeError, TypeError, IndexError, KeyError):
                        err = ProviderError(ErrorKind.MALFORMED, "openai: unexpected stream chunk shape")
                        break
                if batch:
                    yield StreamDelta(batch)
                if err is not None:
                    raise err
            if finish is None and not done:
                raise ProviderError(ErrorKind.STREAM_CUT, "openai: stream ended without a finish reason")
            if finish is None and not parts and not reasoned:
                # [DONE] with no content and no finish reason: nothing was answered. A failure,
                # never an empty success ([DONE] after content without a finish reason is fine).
                raise ProviderError(ErrorKind.MALFORMED, "openai: stream ended with neither content nor a finish reason")
            await sse.drain()
        except ProviderError as exc:
            if exc.usage is None and parts:
                exc.usage = estimate_usage(request.messages, "".join(parts), model.tokenizer)
            raise
        finally:
            sse.close()
        if usage is None:
            usage = estimate_usage(request.messages, "".join(parts), model.tokenizer)
        yield StreamDelta("", finish or "stop", usage)

    def _json_instead_of_stream(self, status: int, raw: Any, headers: Any) -> ProviderError:
        if status != 200:
            return self._map_error(status, raw, headers)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return ProviderError(ErrorKind.MALFORMED, "openai: unparseable body instead of a stream", status=status)
        if isinstance(data, dict) and data.get("error"):
            return inband_error(data["error"], "openai", status)
        return ProviderError(ErrorKind.MALFORMED, "openai: JSON body instead of an event stream", status=status)

    # ------------------------------------------------------------------ embeddings

    async def embed(self, texts: list[str], model: ModelConfig) -> list[list[float]]:
        if not texts:
            return []
        ep = self._endpoint(model)
        body = orjson.dumps({"model": model.upstream_model, "input": texts})
        status, headers, raw = await self._http.post(ep.embeddings, body, self._headers(model), model.timeouts)
        if status != 200:
            raise self._map_error(status, raw, headers)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProviderError(ErrorKind.MALFORMED, "openai: embeddings body is not JSON", status=status) from None
        if isinstance(data, dict) and data.get("error"):
            raise inband_error(data["error"], "openai", status)
        try:
            items = data["data"]
            if any(item.get("index", i) != i for i, item in enumerate(items)):
                items = sorted(items, key=lambda item: item["index"])
            vectors = [item["embedding"] for item in items]
        except (KeyError, TypeError, AttributeError):
            raise ProviderError(ErrorKind.MALFORMED, "openai: embeddings body has no data", status=status) from None
        if len(vectors) != len(texts):
            raise ProviderError(
                ErrorKind.MALFORMED, f"openai: {len(vectors)} embeddings for {len(texts)} inputs", status=status
            )
        return vectors

    async def aclose(self) -> None:
        await self._http.aclose()
