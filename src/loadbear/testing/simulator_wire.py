"""Wire formats of the upstream simulator: token counting, reply text, and the OpenAI /
Anthropic response bodies and SSE frames.

Pure functions and small value objects only, so the server module stays about timing and
faults. Hot paths are cached: the simulator is the baseline of a gateway benchmark.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import re
import sys
import threading
import zlib
from array import array
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import orjson

# --- tokens ----------------------------------------------------------------------------------

_TOKENIZER_NAME = "o200k_base"
_tokenizer: Any = None
_tokenizer_lock = threading.Lock()

PER_MESSAGE_TOKENS = 3  # OpenAI's chat framing: <|start|>role ... <|end|>
REPLY_PRIMING_TOKENS = 3  # every reply is primed with <|start|>assistant<|message|>


def tokenizer() -> Any:
    """The shared quicktok encoding; loading it takes about a second, so do it once per process."""
    global _tokenizer
    if _tokenizer is None:
        with _tokenizer_lock:
            if _tokenizer is None:
                import quicktok

                _tokenizer = quicktok.get_encoding(_TOKENIZER_NAME)
    return _tokenizer


_CACHED_TEXT_MAX_CHARS = 4096  # larger texts are counted afresh rather than pinned in memory


def count_tokens(text: str) -> int:
    if not text:
        return 0
    if len(text) > _CACHED_TEXT_MAX_CHARS:
        return tokenizer().count(text)
    return _count_tokens_cached(text)


@lru_cache(maxsize=8192)
def _count_tokens_cached(text: str) -> int:
    # Benchmarks resend the same prompts, so the cache turns tokenizing into a dict lookup.
    return tokenizer().count(text)


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    ids = tokenizer().encode(text)
    return tokenizer().decode(ids[:max_tokens]) if len(ids) > max_tokens else text


def content_text(content: Any) -> str:
    """The text of an OpenAI or Anthropic message ``content`` (string or list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif "content" in part:  # Anthropic tool_result blocks nest their content
                    parts.append(content_text(part["content"]))
        return "\n".join(parts)
    return str(content)


def prompt_texts(body: dict[str, Any]) -> list[str]:
    """Texts of the system prompt (Anthropic top-level ``system``) and every message."""
    texts: list[str] = []
    system = body.get("system")
    if system:
        texts.append(content_text(system))
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            texts.append(content_text(message.get("content")))
    return texts


def count_prompt_tokens(body: dict[str, Any], texts: list[str]) -> int:
    """Approximate the provider's prompt count: content tokens plus per-message framing."""
    messages = body.get("messages") or ()
    total = REPLY_PRIMING_TOKENS + PER_MESSAGE_TOKENS * (len(messages) + (1 if body.get("system") else 0))
    for message in messages:
        if isinstance(message, dict):
            total += count_tokens(str(message.get("role", "")))
            if message.get("name"):
                total += count_tokens(str(message["name"])) + 1
    return total + sum(count_tokens(t) for t in texts)


# --- reply text ------------------------------------------------------------------------------

_WORDS = (
    "the quick brown fox jumps over a lazy dog while gateways route tokens through careful "
    "ledgers and every tenant gets a fair share of budget latency and cache so the answer "
    "stays grounded in context with clear steps simple facts useful notes and honest limits "
    "about retries fallbacks streams models prompts costs queues and metrics"
).split()

_PIECE_RE = re.compile(r"\s*\S+")

ReplySource = str | Callable[[dict[str, Any]], str]


@lru_cache(maxsize=4096)
def default_reply(model: str, prompt_digest: int, seed: int, words: int) -> str:
    """``Simulated answer from {model}: ...``, exactly ``words`` words, fixed by prompt and seed."""
    head = ["Simulated", "answer", "from", f"{model}:"]
    if words <= len(head):
        return " ".join(head[:words])
    rng = random.Random(prompt_digest * 1_000_003 + seed)
    tail = [rng.choice(_WORDS) for _ in range(words - len(head))]
    tail[-1] += "."
    return " ".join(head + tail)


def prompt_digest(texts: list[str]) -> int:
    # zlib.crc32 rather than hash(): str hashes are salted per process, replies must not be.
    return zlib.crc32("\x1e".join(texts).encode("utf-8", "surrogatepass"))


def split_pieces(text: str) -> tuple[str, ...]:
    """Stream pieces: one word each, with its leading whitespace; joined they give ``text``."""
    return _split_cached(text) if len(text) <= _CACHED_TEXT_MAX_CHARS else _split(text)


@lru_cache(maxsize=4096)
def _split_cached(text: str) -> tuple[str, ...]:
    return _split(text)


def _split(text: str) -> tuple[str, ...]:
    pieces = _PIECE_RE.findall(text)
    consumed = sum(map(len, pieces))
    if consumed < len(text):  # trailing whitespace rides on the last piece
        if pieces:
            pieces[-1] += text[consumed:]
        else:
            pieces = [text]
    return tuple(pieces)


@dataclass(slots=True)
class Reply:
    """What one completion will say, already cut by ``stop`` / ``max_tokens``."""

    text: str
    pieces: tuple[str, ...]
    prompt_tokens: int
    completion_tokens: int
    stopped_by: str  # "end", "stop_sequence" or "max_tokens"
    stop_sequence: str | None = None

    @property
    def openai_finish_reason(self) -> str:
        return "length" if self.stopped_by == "max_tokens" else "stop"

    @property
    def anthropic_stop_reason(self) -> str:
        return {"end": "end_turn", "stop_sequence": "stop_sequence", "max_tokens": "max_tokens"}[self.stopped_by]


def stop_list(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop_sequences", body.get("stop"))
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list):
        return [s for s in stop if isinstance(s, str) and s]
    return []


def max_tokens_of(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def build_reply(text: str, body: dict[str, Any], prompt_tokens: int) -> Reply:
    """Cut ``text`` like a model would: at the earliest stop sequence, then at ``max_tokens``."""
    stopped_by, matched = "end", None
    cut_at = len(text)
    for seq in stop_list(body):
        index = text.find(seq)
        if 0 <= index < cut_at:
            cut_at, matched = index, seq
    if matched is not None:
        text, stopped_by = text[:cut_at], "stop_sequence"
    limit = max_tokens_of(body)
    completion_tokens = count_tokens(text)
    if limit is not None and completion_tokens > limit:
        text = truncate_to_tokens(text, limit)
        completion_tokens = count_tokens(text)
        stopped_by, matched = "max_tokens", None
    return Reply(text, split_pieces(text), prompt_tokens, completion_tokens, stopped_by, matched)


# --- OpenAI ----------------------------------------------------------------------------------

SYSTEM_FINGERPRINT = "fp_loadbear_sim"


def openai_usage(reply: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def openai_completion(reply: Reply, *, rid: str, model: str, created: int) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": reply.openai_finish_reason,
                }
            ],
            "usage": openai_usage(reply),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
    )


class OpenAIStream:
    """Builds the ``data: {chat.completion.chunk}`` frames of one streamed completion."""

    __slots__ = ("_prefix", "_usage_field", "_include_usage", "reply")

    def __init__(self, reply: Reply, *, rid: str, model: str, created: int, include_usage: bool) -> None:
        self.reply = reply
        self._include_usage = include_usage
        # The fixed head of every chunk, serialized once; only choices/usage vary per frame.
        head = orjson.dumps(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )
        self._prefix = b"data: " + head[:-1] + b',"choices":'
        # Like OpenAI: with include_usage, every chunk carries "usage": null until the last.
        self._usage_field = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._prefix + orjson.dumps([choice]) + self._usage_field

    def head(self) -> bytes:
        return self._chunk({"role": "assistant", "content": "", "refusal": None}, None)

    def delta(self, piece: str) -> bytes:
        return self._chunk({"content": piece}, None)

    def tail(self) -> bytes:
        frames = self._chunk({}, self.reply.openai_finish_reason)
        if self._include_usage:
            frames += self._prefix + b"[]," + b'"usage":' + orjson.dumps(openai_usage(self.reply)) + b"}\n\n"
        return frames + b"data: [DONE]\n\n"

    @staticmethod
    def error_frame(body: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(body) + b"\n\n"

    @staticmethod
    def malformed_frame() -> bytes:
        return b"data: {this is not json\n\n"


# --- Anthropic -------------------------------------------------------------------------------


def anthropic_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }


def anthropic_message(reply: Reply, *, rid: str, model: str) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": reply.text}],
            "stop_reason": reply.anthropic_stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": anthropic_usage(reply.prompt_tokens, reply.completion_tokens),
        }
    )


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class AnthropicStream:
    """Builds the named SSE events of one streamed Messages API response."""

    __slots__ = ("reply", "_rid", "_model")

    def __init__(self, reply: Reply, *, rid: str, model: str) -> None:
        self.reply, self._rid, self._model = reply, rid, model

    def head(self) -> bytes:
        message = {
            "id": self._rid,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # Anthropic reports the prompt up front and only a token or so of output.
            "usage": anthropic_usage(self.reply.prompt_tokens, 1),
        }
        return (
            sse_event("message_start", {"type": "message_start", "message": message})
            + sse_event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            + sse_event("ping", {"type": "ping"})
        )

    def delta(self, piece: str) -> bytes:
        return sse_event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
        )

    def tail(self) -> bytes:
        reply = self.reply
        return (
            sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reply.anthropic_stop_reason, "stop_sequence": reply.stop_sequence},
                    "usage": {"output_tokens": reply.completion_tokens},
                },
            )
            + sse_event("message_stop", {"type": "message_stop"})
        )

    @staticmethod
    def error_frame(body: dict[str, Any]) -> bytes:
        return sse_event("error", body)

    @staticmethod
    def malformed_frame() -> bytes:
        # Named, because Anthropic clients skip data lines that carry no event name.
        return b"event: content_block_delta\ndata: {this is not json\n\n"


# --- embeddings ------------------------------------------------------------------------------

DEFAULT_EMBEDDING_DIMENSIONS = 384
_WORD_RE = re.compile(r"\w+")


@lru_cache(maxsize=16384)
def _word_vector(word: str, dimensions: int) -> tuple[float, ...]:
    # shake_256 yields as many bytes as asked; the first d components do not depend on the
    # requested size, so smaller ``dimensions`` are prefixes (Matryoshka-like), as with OpenAI.
    raw = hashlib.shake_256(word.encode("utf-8", "surrogatepass")).digest(dimensions)
    return tuple((b - 127.5) for b in raw)


def embed_text(text: str, dimensions: int) -> list[float]:
    """A unit vector: the sum of per-word hash vectors, so texts sharing words are similar."""
    words = _WORD_RE.findall(text.lower()) or [text]
    acc = [0.0] * dimensions
    for word in words:
        acc = list(map(float.__add__, acc, _word_vector(word, dimensions)))
    norm = math.sqrt(sum(v * v for v in acc)) or 1.0
    return [v / norm for v in acc]


def embedding_inputs(raw: Any) -> list[str] | None:
    """``input`` as texts: a string, strings, or token-id arrays (rendered as their ids)."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(x, int) for x in raw):
            return [" ".join(map(str, raw))]
        if all(isinstance(x, str) for x in raw):
            return list(raw)
        if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw):
            return [" ".join(map(str, x)) for x in raw]
    return None


def embedding_token_count(raw: Any, texts: list[str]) -> int:
    if isinstance(raw, list) and raw and isinstance(raw[0], int):
        return len(raw)
    if isinstance(raw, list) and raw and isinstance(raw[0], list):
        return sum(len(x) for x in raw)
    return sum(count_tokens(t) for t in texts)


def embeddings_body(texts: list[str], tokens: int, *, model: str, dimensions: int, encoding: str) -> bytes:
    data = []
    for index, text in enumerate(texts):
        vector = embed_text(text, dimensions)
        value: Any = vector
        if encoding == "base64":  # what the openai SDK asks for by default
            value = _float32_base64(vector)
        data.append({"object": "embedding", "index": index, "embedding": value})
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _float32_base64(vector: list[float]) -> str:
    packed = array("f", vector)
    if sys.byteorder != "little":  # the wire format is little-endian float32
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


# --- models ----------------------------------------------------------------------------------

KNOWN_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1-mini",
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
    "text-embedding-3-small",
    "text-embedding-3-large",
)


def models_body(extra: list[str]) -> bytes:
    """A model list both SDKs can parse: OpenAI's ``object``/``owned_by`` plus Anthropic's
    ``type``/``display_name``/``created_at``/``has_more``."""
    ids = list(dict.fromkeys([*KNOWN_MODELS, *extra]))
    data = [
        {
            "id": model_id,
            "object": "model",
            "created": 1_700_000_000,
            "owned_by": "loadbear-simulator",
            "type": "model",
            "display_name": model_id,
            "created_at": "2023-11-14T22:13:20Z",
        }
        for model_id in ids
    ]
    return orjson.dumps(
        {"object": "list", "data": data, "has_more": False, "first_id": ids[0], "last_id": ids[-1]}
    )
