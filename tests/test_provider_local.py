"""The offline extractive ``local`` provider."""

from __future__ import annotations

from loadbear.providers import ChatRequest, LocalProvider, ModelConfig, count_text
from loadbear.providers.local import (
    NO_CONTEXT_ANSWER,
    NOT_FOUND_ANSWER,
    extract_answer,
    hash_embedding,
    parse_sources,
)

MODEL = ModelConfig(name="local", provider="local", upstream_model="loadbear-local")

CONTEXT = [
    {
        "title": "Refund policy",
        "text": "Acme offers refunds within 30 days of purchase. Refunds are paid to the original card. "
        "Gift cards cannot be refunded.",
        "index": 1,
    },
    {"title": "Shipping", "text": "Orders ship within 2 business days. Express shipping costs $15.", "index": 2},
    {"text": "Acme was founded in 1999 in Oslo. The company has 40 employees.", "index": 3},
]


def ask(question: str, context=CONTEXT, **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": question}], context=context, **kw)


async def collect(provider, request, model=MODEL):
    pieces, last = [], None
    async for delta in provider.stream(request, model):
        pieces.append(delta.text)
        last = delta
    return pieces, last


async def test_answers_from_context_with_citations() -> None:
    out = await LocalProvider().complete(ask("When do orders ship?"), MODEL)
    assert out.text == "Orders ship within 2 business days [2]."
    assert out.finish_reason == "stop"
    out = await LocalProvider().complete(ask("When was Acme founded?"), MODEL)
    assert out.text == "Acme was founded in 1999 in Oslo [3]."


async def test_keeps_best_sentences_in_source_order() -> None:
    assert extract_answer("Can I get refunds for gift cards?", CONTEXT) == "Gift cards cannot be refunded [1]."
    # equally good sentences: at most three, in source order
    assert extract_answer("refunds", CONTEXT) == (
        "Acme offers refunds within 30 days of purchase [1]. Refunds are paid to the original card [1]. "
        "Gift cards cannot be refunded [1]."
    )
    assert extract_answer("How long does shipping take?", CONTEXT) == (
        "Orders ship within 2 business days [2]. Express shipping costs $15 [2]."
    )


WRAPPED = [{"index": 1, "text": (
    "## Chargebacks\n\n"
    "If you dispute a charge with your bank instead of asking us for a refund, the\n"
    "workspace is suspended until the dispute is resolved. Please talk to us first: it is\n"
    "faster for everyone.\n\n"
    "- Refunds go back to the original card and arrive\n  within 10 business days.\n"
    "- Gift cards are never refunded.\n\n"
    "| When you ask | What you get back |\n"
    "|--------------|-------------------|\n"
    "| Within 30 days | a full refund |\n"
    "| After day 90 | no refund, sorry |\n"
)}]


def test_hard_wrapped_paragraphs_bullets_and_tables_are_quoted_whole() -> None:
    # A sentence wrapped over two lines is quoted whole, not cut at the line end.
    assert extract_answer("What happens if I dispute a charge with my bank?", WRAPPED) == (
        "If you dispute a charge with your bank instead of asking us for a refund, the workspace is "
        "suspended until the dispute is resolved [1]."
    )
    # A bullet's continuation line belongs to it; the next bullet does not.
    assert extract_answer("When do refunds arrive on the card?", WRAPPED) == (
        "Refunds go back to the original card and arrive within 10 business days [1]."
    )
    # Table rows as their cells; the header row (column names) is never an answer.
    assert extract_answer("What about after day 90?", WRAPPED) == "After day 90: no refund, sorry [1]."
    assert "|" not in extract_answer("What do you get back when you ask?", WRAPPED)


async def test_says_honestly_when_not_in_context() -> None:
    provider = LocalProvider()
    for q in ("What is the capital of France?", "Who is the CEO of Acme?", "What is it?"):
        out = await provider.complete(ask(q), MODEL)
        assert out.text == NOT_FOUND_ANSWER, q


async def test_without_context_says_what_it_is() -> None:
    out = await LocalProvider().complete(ask("Write me a poem", context=None), MODEL)
    assert out.text == NO_CONTEXT_ANSWER
    assert "offline" in out.text and "documents" in out.text
    # retrieval ran and found nothing: that is a "not in the documents"
    out = await LocalProvider().complete(ask("What is the refund window?", context=[]), MODEL)
    assert out.text == NOT_FOUND_ANSWER


async def test_sources_from_system_message_brackets() -> None:
    system = (
        "You are a support bot. Answer only from the sources and cite them like [1].\n"
        "[1] Refund policy\n"
        "Refunds are accepted within 30 days of purchase.\n"
        "Returns must be unused.\n"
        "[2] Orders ship within 2 business days.\n"
        "---\n"
        "Be concise."
    )
    sources = parse_sources(system)
    assert sources == [
        {"index": 1, "title": "Refund policy", "text": "Refunds are accepted within 30 days of purchase.\nReturns must be unused."},
        {"index": 2, "text": "Orders ship within 2 business days."},
    ]
    request = ChatRequest(messages=[{"role": "system", "content": system}, {"role": "user", "content": "When do orders ship?"}])
    out = await LocalProvider().complete(request, MODEL)
    assert out.text == "Orders ship within 2 business days [2]."


async def test_sources_from_system_message_tags() -> None:
    system = '<sources>\n<source id="4" title="FAQ">Support is open on weekdays from 9 to 5.</source>\n</sources>'
    request = ChatRequest(messages=[{"role": "system", "content": system}, {"role": "user", "content": "When is support open?"}])
    out = await LocalProvider().complete(request, MODEL)
    assert out.text == "Support is open on weekdays from 9 to 5 [4]."


async def test_stream_equals_complete_word_by_word() -> None:
    provider = LocalProvider()
    request = ask("refunds")
    out = await provider.complete(request, MODEL)
    pieces, last = await collect(provider, request)
    assert "".join(pieces) == out.text
    words = out.text.split(" ")
    assert pieces[: len(words)] == [words[0]] + [" " + w for w in words[1:]]
    assert last.text == "" and last.finish_reason == "stop"
    assert last.usage == out.usage
    assert out.usage.estimated is True
    assert out.usage.completion_tokens == count_text(out.text)
    assert out.usage.prompt_tokens > count_text("refunds")  # the context counts as prompt


async def test_max_tokens_truncates_with_length() -> None:
    provider = LocalProvider()
    request = ask("refunds", max_tokens=5)
    out = await provider.complete(request, MODEL)
    assert out.finish_reason == "length"
    assert 0 < out.usage.completion_tokens <= 5
    pieces, last = await collect(provider, request)
    assert "".join(pieces) == out.text and last.finish_reason == "length" and last.usage == out.usage


async def test_deterministic() -> None:
    a = await LocalProvider().complete(ask("What does express shipping cost?"), MODEL)
    b = await LocalProvider().complete(ask("What does express shipping cost?"), MODEL)
    assert a == b
    assert a.text == "Express shipping costs $15 [2]."


async def test_embed_is_deterministic_and_lexical() -> None:
    provider = LocalProvider()
    va, vb, vc = await provider.embed(["refund policy", "refunds policies", "weather in Oslo"], MODEL)
    assert len(va) == 256
    assert va == hash_embedding("refund policy")
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))  # noqa: E731
    assert abs(dot(va, va) - 1.0) < 1e-9
    assert dot(va, vb) > 0.99 > dot(va, vc)
