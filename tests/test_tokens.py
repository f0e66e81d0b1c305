"""Offline token counting (quicktok; never tiktoken)."""

from __future__ import annotations

import subprocess
import sys

from loadbear.providers import count_messages, count_text
from loadbear.providers.tokens import content_text, get_encoder, truncate_to_tokens

# OpenAI cookbook "How to count tokens with tiktoken": 129 prompt tokens for
# gpt-3.5-turbo/gpt-4 (cl100k_base), 124 for gpt-4o (o200k_base).
COOKBOOK = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


def test_count_text_basics() -> None:
    assert count_text("") == 0
    assert count_text("hello world") == 2
    assert count_text("hello world", "cl100k_base") == 2
    # special-token strings are plain text, never an error
    assert count_text("<|endoftext|>") > 1


def test_count_messages_matches_openai_reference() -> None:
    assert count_messages(COOKBOOK, "cl100k_base") == 129
    assert count_messages(COOKBOOK) == 124


def test_count_messages_framing_and_name() -> None:
    base = count_messages([])
    assert base == 3  # reply priming only
    one = count_messages([{"role": "user", "content": "hi"}])
    assert one == 3 + 3 + count_text("user") + count_text("hi")
    named = count_messages([{"role": "user", "content": "hi", "name": "bob"}])
    assert named == one + count_text("bob") + 1


def test_count_messages_content_parts() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}]
    plain = [{"role": "user", "content": ""}]
    assert count_messages(parts) == count_messages(plain) + count_text("hello") + count_text("world")
    with_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    assert count_messages(with_image) == count_messages(plain) + 85
    assert content_text([{"type": "text", "text": "a"}, {"type": "image_url"}, "b"]) == "a\nb"


def test_encoders_are_cached_and_unknown_falls_back() -> None:
    assert get_encoder("o200k_base") is get_encoder("o200k_base")
    assert count_text("hello world", "no-such-encoding") == count_text("hello world")


def test_truncate_to_tokens() -> None:
    text = "one two three four five six seven"
    assert truncate_to_tokens(text, None) == (text, False)
    assert truncate_to_tokens(text, 100) == (text, False)
    cut, truncated = truncate_to_tokens(text, 3)
    assert truncated and cut == "one two three"
    assert count_text(cut) <= 3
    assert truncate_to_tokens(text, 0) == ("", True)


def test_tiktoken_is_never_imported() -> None:
    code = "import sys, loadbear.providers; loadbear.providers.count_text('x'); print('tiktoken' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
