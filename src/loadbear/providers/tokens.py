"""Offline token counting with ``quicktok`` (bundled BPE vocabularies, no downloads).

``tiktoken`` is deliberately not used: it fetches its vocabularies over the network the
first time an encoding is requested, which a self-hosted gateway cannot rely on.

Counts are exact for the encoding's text tokens; :func:`count_messages` follows OpenAI's
published recipe for chat prompts (3 tokens of framing per message, 1 more when a message
has a ``name``, 3 for the reply priming), so it matches what OpenAI bills for plain-text
chats and is a close estimate for other vendors.
"""

from __future__ import annotations

from typing import Any, Iterable

import orjson
import quicktok

__all__ = [
    "DEFAULT_ENCODING",
    "get_encoder",
    "count_text",
    "count_messages",
    "content_text",
    "truncate_to_tokens",
    "warm_up",
]

DEFAULT_ENCODING = "o200k_base"

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# OpenAI bills a low-detail image at 85 tokens; we cannot see image sizes here.
IMAGE_TOKENS = 85

_ENCODERS: dict[str, Any] = {}


def get_encoder(encoding: str = DEFAULT_ENCODING) -> Any:
    """The cached ``quicktok`` tokenizer for ``encoding``.

    Unknown encoding names fall back to ``o200k_base`` (counts become estimates, which is
    what callers use them for anyway) instead of failing a request.
    """
    enc = _ENCODERS.get(encoding)
    if enc is None:
        try:
            enc = quicktok.get_encoding(encoding)
        except (RuntimeError, ValueError, KeyError, OSError):
            enc = quicktok.get_encoding(DEFAULT_ENCODING)
        _ENCODERS[encoding] = enc
    return enc


def warm_up(*encodings: str) -> None:
    """Load encoders ahead of the first request (loading o200k_base takes ~1 s)."""
    for encoding in encodings or (DEFAULT_ENCODING,):
        get_encoder(encoding)


def count_text(text: str, encoding: str = DEFAULT_ENCODING) -> int:
    """Number of tokens of ``text`` (special-token strings are counted as plain text)."""
    if not text:
        return 0
    enc = _ENCODERS.get(encoding)
    if enc is None:
        enc = get_encoder(encoding)
    return enc.count(text)


def content_text(content: Any) -> str:
    """Flatten an OpenAI message ``content`` (str, or a list of parts) into plain text."""
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
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "\n".join(parts)
    return str(content)


def _count_value(value: Any, enc: Any) -> int:
    if isinstance(value, str):
        return enc.count(value) if value else 0
    if value is None or isinstance(value, (bool, int, float)):
        return 0
    if isinstance(value, list):
        n = 0
        for part in value:
            if isinstance(part, dict):
                kind = part.get("type")
                if kind == "text" or "text" in part:
                    text = part.get("text")
                    if isinstance(text, str) and text:
                        n += enc.count(text)
                elif kind in ("image_url", "image", "input_image"):
                    n += IMAGE_TOKENS
                else:
                    n += enc.count(orjson.dumps(part).decode())
            elif isinstance(part, str):
                n += enc.count(part)
        return n
    if isinstance(value, dict):
        # tool_calls / function_call payloads: count their JSON.
        return enc.count(orjson.dumps(value).decode())
    return enc.count(str(value))


def count_messages(messages: Iterable[dict[str, Any]], encoding: str = DEFAULT_ENCODING) -> int:
    """Prompt tokens of a chat, per OpenAI's recipe.

    Every string value of every message is counted (role, content, name...), plus 3 tokens
    of framing per message, 1 per ``name`` and 3 for the assistant reply priming.
    """
    enc = _ENCODERS.get(encoding)
    if enc is None:
        enc = get_encoder(encoding)
    n = REPLY_PRIMING
    for message in messages:
        n += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str):
                if value:
                    n += enc.count(value)
            else:
                n += _count_value(value, enc)
            if key == "name":
                n += TOKENS_PER_NAME
    return n


def truncate_to_tokens(
    text: str, max_tokens: int | None, encoding: str = DEFAULT_ENCODING
) -> tuple[str, bool]:
    """Cut ``text`` at a word boundary so that it has at most ``max_tokens`` tokens.

    Returns ``(text, truncated)``. Used by the offline providers to honour ``max_tokens``.
    """
    if max_tokens is None:
        return text, False
    if max_tokens <= 0:
        return "", bool(text)
    enc = get_encoder(encoding)
    if enc.count(text) <= max_tokens:
        return text, False
    words = text.split(" ")
    out: list[str] = []
    used = 0
    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        n = enc.count(piece) if piece else 0
        if used + n > max_tokens:
            break
        out.append(word)
        used += n
    result = " ".join(out)
    # Per-word counts are additive for these vocabularies in practice; make sure anyway.
    while out and enc.count(result) > max_tokens:
        out.pop()
        result = " ".join(out)
    return result, True
