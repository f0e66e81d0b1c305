"""``local``: an offline, deterministic, extractive "model".

It is the embedded default (works with no API key and no network) and the last resort
when every upstream is down. It never invents text: it quotes the grounding context.

Where the context comes from
----------------------------
1. ``ChatRequest.context``: a list of dicts with ``text`` and optionally ``title`` and
   ``index`` (the 1-based source number used in citations; default: position + 1).
2. Otherwise, the system/developer messages, in either of these formats:

   * bracketed sources, one per ``[n]`` line (the ``[n]`` must start the line)::

         Answer from the sources below.
         [1] Refund policy
         Refunds are accepted within 30 days of purchase.
         [2] Shipping: Orders ship within 2 business days.

     A source runs until the next ``[n]`` line or a separator line (``---``, ``===``,
     ``***``, or a closing ``</sources>``/``</context>``/``</documents>`` tag). When the
     ``[n]`` line has text of its own and is followed by more lines, it is a title if it
     does not end like a sentence (``.``, ``!``, ``?``); ``[n] Title: ...`` is always a title.
   * tagged sources: ``<source id="1" title="...">text</source>`` or
     ``<document index="1">...</document>`` (``<document_content>`` inside is used as the
     text, ``<source>``/``<title>`` inside as the title).

How it answers
--------------
The question is the last user message. Words are lower-cased, punctuation stripped, stop
words dropped and lightly stemmed; every sentence of every source is scored by the
IDF-weighted share of the question's terms it contains. If the best sentence covers less
than :data:`MIN_COVERAGE` of the question, the answer is "I couldn't find that in the
provided documents." Otherwise the best 1-3 sentences (those scoring at least
:data:`KEEP_RATIO` of the best) are quoted in source order, each followed by its citation,
e.g. ``Refunds are accepted within 30 days of purchase [1].``

Without any context (``context`` None and no sources in the system prompt) it says what it
is; an empty ``context`` list gets the "couldn't find" answer. Streams word by word (leading spaces), with no
delay; ``complete`` and ``stream`` give the same text and the same usage (counted offline,
``estimated=True``). ``max_tokens`` truncates at a word boundary (finish_reason "length").

``embed`` returns deterministic 256-dimension feature-hashing vectors (stemmed unigrams
and bigrams, signed, L2-normalised): lexical, not semantic, but offline and stable.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any, AsyncIterator

from .base import ChatRequest, Completion, ModelConfig, StreamDelta, Usage
from .tokens import content_text, count_messages, count_text, truncate_to_tokens

__all__ = [
    "LocalProvider",
    "NOT_FOUND_ANSWER",
    "NO_CONTEXT_ANSWER",
    "parse_sources",
    "extract_answer",
    "hash_embedding",
    "EMBED_DIM",
]

NOT_FOUND_ANSWER = "I couldn't find that in the provided documents."
NO_CONTEXT_ANSWER = (
    "I'm loadbear's built-in offline model: an extractive model that can only quote the "
    "documents provided with a question, and no documents were provided. I can't answer "
    "general questions; connect an LLM provider for that."
)
MIN_COVERAGE = 0.4
KEEP_RATIO = 0.6
MAX_SENTENCES = 3
EMBED_DIM = 256

STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do
    does doesn't doing don't down during each few for from further had hadn't has hasn't
    have haven't having he her here hers herself him himself his how i if in into is isn't
    it it's its itself just let's me more most mustn't my myself no nor not of off on once
    only or other ought our ours ourselves out over own same shan't she should shouldn't so
    some such than that that's the their theirs them themselves then there there's these
    they this those through to too under until up very was wasn't we were weren't what
    what's when where which while who whom why will with won't would wouldn't you your
    yours yourself yourselves s t d ll m re ve y tell please know also get got us may might
    must shall can could would one per via etc
    """.split()
    # question filler: says what kind of answer is wanted, never found in the answer itself
    + """
    long much many often take takes took need needs want wants like kind sort way ways
    possible exactly actually really find give say said explain describe mean means
    happen happens anything something thing things
    """.split()
)

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
_TABLE_DELIMITER = re.compile(r"^\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?$")
_MARKER = re.compile(r"^\s*\[(\d+)\]\s*(.*)$")
_SEPARATOR = re.compile(r"^\s*(?:-{3,}|={3,}|\*{3,}|</(?:sources|context|documents)>)\s*$", re.I)
_TAGGED = re.compile(r"<(source|document)\b([^>]*)>(.*?)</\1>", re.S | re.I)
_ATTR = re.compile(r"(\w+)\s*=\s*\"([^\"]*)\"")
_INNER = re.compile(r"<(document_content|source|title)>(.*?)</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z_][^>]*>")
_TITLE_PREFIX = re.compile(r"^(?:title|source|document)\s*:\s*", re.I)
_CITE_TAIL = re.compile(r"([.!?]+[\"')\]]*)$")


# --------------------------------------------------------------------------- text


def _stem(word: str) -> str:
    n = len(word)
    if n <= 3 or word.isdigit():
        return word
    if word.endswith("ies") and n > 4:
        word = word[:-3] + "y"
    elif word.endswith(("sses", "xes", "ches", "shes", "zes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    n = len(word)
    if n > 5 and word.endswith("ing"):
        word = _undouble(word[:-3])
    elif n > 4 and word.endswith("ed"):
        word = _undouble(word[:-2])
    elif n > 4 and word.endswith("ly"):
        word = word[:-2]
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def _undouble(word: str) -> str:
    if len(word) > 2 and word[-1] == word[-2] and word[-1] not in "lsz" and word[-1].isalpha():
        return word[:-1]
    return word


def terms(text: str) -> list[str]:
    """Normalised content words of ``text`` (lower-cased, no stop words, stemmed)."""
    out = []
    for word in _WORD.findall(text.lower()):
        word = word.replace("\u2019", "'")
        if word in STOP_WORDS:
            continue
        if "'" in word:
            word = word.split("'", 1)[0]
            if word in STOP_WORDS or not word:
                continue
        if len(word) == 1 and not word.isdigit():
            continue
        out.append(_stem(word))
    return out


def _sentences(text: str) -> list[str]:
    out: list[str] = []
    # Lines of one paragraph are joined first: documents are often hard-wrapped (Markdown,
    # plain text), and splitting line by line would quote half sentences. Blank lines, headings,
    # bullets and table rows start a new unit.
    paragraph: list[str] = []

    def flush() -> None:
        for sentence in _SENTENCE_END.split(" ".join(paragraph)):
            sentence = sentence.strip()
            if len(sentence.split()) >= 3:
                out.append(sentence)
        paragraph.clear()

    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if not line or line.startswith("#"):
            flush()
            continue
        if line.startswith("|"):
            flush()
            if _TABLE_DELIMITER.match(line):
                continue
            # A table's header row (the next line is its |---| delimiter) names columns: no answer.
            if not (i + 1 < len(lines) and _TABLE_DELIMITER.match(lines[i + 1])):
                # A row is quoted as its cells ("After day 90: no refund"), not as pipes and padding.
                cells = [c.strip() for c in line.strip("|").split("|") if c.strip()]
                row = (": " if len(cells) == 2 else "; ").join(cells)
                paragraph.append(row if row.endswith((".", "!", "?")) else row + ".")
                flush()
            continue
        if _BULLET.match(line):
            flush()
            line = _BULLET.sub("", line)
        paragraph.append(line)
    flush()
    return out


# --------------------------------------------------------------------------- sources


def parse_sources(text: str) -> list[dict[str, Any]]:
    """Sources embedded in a prompt (see the module doc for the accepted formats)."""
    if not text:
        return []
    tagged = _parse_tagged(text)
    if tagged:
        return tagged
    return _parse_bracketed(text)


def _parse_tagged(text: str) -> list[dict[str, Any]]:
    sources = []
    for i, match in enumerate(_TAGGED.finditer(text)):
        attrs = {k.lower(): v for k, v in _ATTR.findall(match.group(2))}
        inner = match.group(3)
        title = attrs.get("title")
        body = inner
        for name, value in _INNER.findall(inner):
            name = name.lower()
            if name == "document_content":
                body = value
            elif title is None:
                title = value.strip()
        body = _TAG.sub(" ", body).strip()
        index = attrs.get("id") or attrs.get("index")
        source: dict[str, Any] = {"text": body, "index": int(index) if index and index.isdigit() else i + 1}
        if title:
            source["title"] = title
        sources.append(source)
    return sources


def _parse_bracketed(text: str) -> list[dict[str, Any]]:
    sources: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    lines: list[str] = []

    def finish() -> None:
        if current is None:
            return
        first = current.pop("_first")
        body = [line for line in lines]
        has_more = any(line.strip() for line in body)
        if first:
            if _TITLE_PREFIX.match(first):
                current["title"] = _TITLE_PREFIX.sub("", first).strip()
            elif has_more and not first.rstrip().endswith((".", "!", "?")):
                current["title"] = first.strip()
            else:
                body.insert(0, first)
        current["text"] = "\n".join(body).strip()
        sources.append(current)

    for line in text.splitlines():
        marker = _MARKER.match(line)
        if marker:
            finish()
            current = {"index": int(marker.group(1)), "_first": marker.group(2).strip()}
            lines = []
        elif current is not None:
            if _SEPARATOR.match(line):
                finish()
                current = None
                lines = []
            else:
                lines.append(line)
    finish()
    return [s for s in sources if s.get("text")]


def _context_of(request: ChatRequest) -> list[dict[str, Any]] | None:
    if request.context is not None:
        return request.context
    for message in request.messages:
        if message.get("role") in ("system", "developer"):
            found = parse_sources(content_text(message.get("content")))
            if found:
                return found
    return None


def _question_of(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


# --------------------------------------------------------------------------- answer


def _cite(sentence: str, index: int) -> str:
    match = _CITE_TAIL.search(sentence)
    if match:
        return f"{sentence[:match.start()]} [{index}]{match.group(1)}"
    return f"{sentence} [{index}]"


def extract_answer(question: str, context: list[dict[str, Any]] | None) -> str:
    """The extractive answer to ``question`` from ``context`` (deterministic).

    ``context=None``: no grounding at all (say what this model is); ``[]``: retrieval was
    done and found nothing (say it is not in the documents).
    """
    if context is None:
        return NO_CONTEXT_ANSWER
    # (order, source number, sentence, term set)
    candidates: list[tuple[int, int, str, frozenset[str]]] = []
    seen: set[str] = set()
    for pos, source in enumerate(context):
        text = source.get("text") or ""
        if not isinstance(text, str):
            text = str(text)
        index = source.get("index") or pos + 1
        for sentence in _sentences(text):
            key = sentence.lower()
            if key in seen:
                continue
            seen.add(key)
            candidates.append((len(candidates), index, sentence, frozenset(terms(sentence))))
    query = set(terms(question))
    if not candidates or not query:
        return NOT_FOUND_ANSWER
    n = max(len(candidates), 10)
    df: dict[str, int] = dict.fromkeys(query, 0)
    for _, _, _, sentence_terms in candidates:
        for term in query & sentence_terms:
            df[term] += 1
    weight = {t: math.log(1.0 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}
    total = sum(weight.values())
    scored = []
    for order, index, sentence, sentence_terms in candidates:
        matched = query & sentence_terms
        if matched:
            score = sum(weight[t] for t in matched)
            scored.append((score, order, index, sentence))
    if not scored:
        return NOT_FOUND_ANSWER
    # Best first; ties: the shorter sentence, then source order.
    scored.sort(key=lambda s: (-s[0], len(s[3]), s[1]))
    best = scored[0][0]
    if best / total < MIN_COVERAGE:
        return NOT_FOUND_ANSWER
    kept = [s for s in scored[:MAX_SENTENCES] if s[0] >= best * KEEP_RATIO and s[0] / total >= MIN_COVERAGE]
    kept.sort(key=lambda s: s[1])
    return " ".join(_cite(sentence, index) for _, _, index, sentence in kept)


def hash_embedding(text: str, dim: int = EMBED_DIM) -> list[float]:
    """Deterministic signed feature-hashing vector of stemmed unigrams + bigrams (L2 = 1)."""
    vec = [0.0] * dim
    words = terms(text)
    feats = [(w, 1.0) for w in words] + [(a + " " + b, 0.5) for a, b in zip(words, words[1:])]
    for feat, w in feats:
        h = zlib.crc32(feat.encode())
        vec[h % dim] += w if (h >> 31) & 1 else -w
    norm = math.sqrt(sum(v * v for v in vec))
    if norm:
        vec = [v / norm for v in vec]
    return vec


# --------------------------------------------------------------------------- provider


class LocalProvider:
    """Offline extractive answers from the grounding context (see the module doc)."""

    name = "local"

    def _answer(self, request: ChatRequest, model: ModelConfig) -> tuple[list[str], str, Usage]:
        context = _context_of(request)
        text = extract_answer(_question_of(request), context)
        text, truncated = truncate_to_tokens(text, request.max_tokens, model.tokenizer)
        prompt = count_messages(request.messages, model.tokenizer)
        if request.context:
            for source in request.context:
                prompt += count_text(str(source.get("title") or ""), model.tokenizer)
                prompt += count_text(str(source.get("text") or ""), model.tokenizer)
        usage = Usage(prompt, count_text(text, model.tokenizer), 0, True)
        if text:
            words = text.split(" ")
            pieces = [words[0]] + [" " + w for w in words[1:]]
        else:
            pieces = []
        return pieces, ("length" if truncated else "stop"), usage

    async def complete(self, request: ChatRequest, model: ModelConfig) -> Completion:
        pieces, finish, usage = self._answer(request, model)
        return Completion("".join(pieces), finish, usage, model.upstream_model or "local")

    async def stream(self, request: ChatRequest, model: ModelConfig) -> AsyncIterator[StreamDelta]:
        pieces, finish, usage = self._answer(request, model)
        for piece in pieces:
            yield StreamDelta(piece)
        yield StreamDelta("", finish, usage)

    async def embed(self, texts: list[str], model: ModelConfig) -> list[list[float]]:
        return [hash_embedding(t) for t in texts]

    async def aclose(self) -> None:
        return None
