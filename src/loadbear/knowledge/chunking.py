"""Structure-aware chunking of a parsed document, sized in tokens, with overlap.

:func:`chunk_document` packs consecutive blocks of a
:class:`~loadbear.knowledge.types.ParsedDocument` into chunks of at most ``max_tokens``
tokens (counted with :mod:`loadbear.providers.tokens`):

* blocks are never split when they fit in a chunk: a paragraph, a list or a code block
  that is too big for the space left starts the next chunk instead;
* a block bigger than a whole chunk is split: prose at sentence boundaries, lists at item
  boundaries, code and tables at line boundaries (then lines, then whitespace, then
  anywhere, for the rare text that has none of these);
* a heading starts a new chunk when its section (with its subsections) does not fit in
  the space left, unless the current chunk holds only a small, complete section (such a
  section is kept with what follows rather than left as a tiny chunk); a chunk never ends
  with a heading whose content went to the next chunk;
* when a chunk ends in the middle of a section, the next one starts with about
  ``overlap * max_tokens`` tokens repeated from the end of the previous one, starting at a
  sentence (or line) boundary. There is no overlap across a section boundary.

Every chunk is a true span: ``chunk.text == doc.text[chunk.start:chunk.end]``. A chunk's
``heading_path`` is the path of the block it starts in. A chunk that starts at a Markdown
``#`` heading includes the ``#`` markers.

Tokens are counted once per block, once per chunk and a few times per overlap, so a 1 MB
Markdown file chunks in a fraction of a second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loadbear.knowledge.types import ChunkDraft, KnowledgeError, ParsedDocument
from loadbear.providers.tokens import DEFAULT_ENCODING, get_encoder

__all__ = ["chunk_document", "DEFAULT_MAX_TOKENS", "DEFAULT_OVERLAP", "MIN_MAX_TOKENS"]

DEFAULT_MAX_TOKENS = 350
DEFAULT_OVERLAP = 0.15
MIN_MAX_TOKENS = 16
MAX_OVERLAP = 0.5
#: a complete section smaller than this share of a chunk is kept with what follows it
SMALL_SECTION = 0.25

_SENTENCE_BREAK = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]*_`]*\s+|\n[ \t]*\n\s*")
_LINE_BREAK = re.compile(r"\n(?:[ \t]*\n)*")
_ITEM_START = re.compile(r"[ \t]*(?:[-*+\u2022]|\d{1,9}[.)])(?:[ \t]|$)")
_ATX_PREFIX = re.compile(r"[ \t]{0,3}#{1,6}[ \t]+")
_SPACE = re.compile(r"\s")

_LINE_KINDS = frozenset({"code", "list", "table"})


@dataclass(slots=True)
class _Unit:
    start: int
    end: int
    tokens: int
    kind: str
    path: list[str]
    level: int = 0  # heading level; 0 for everything else

    @property
    def heading(self) -> bool:
        return self.level > 0


def chunk_document(
    doc: ParsedDocument,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap: float = DEFAULT_OVERLAP,
    encoding: str = DEFAULT_ENCODING,
) -> list[ChunkDraft]:
    """Split ``doc`` into chunks of at most ``max_tokens`` tokens (see the module docstring)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < MIN_MAX_TOKENS:
        raise KnowledgeError(
            f"max_tokens must be an integer of at least {MIN_MAX_TOKENS}, got {max_tokens!r}",
            code="invalid_parameter", status=400, param="max_tokens",
        )
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap <= MAX_OVERLAP:
        raise KnowledgeError(
            f"overlap must be a fraction between 0 and {MAX_OVERLAP}, got {overlap!r}",
            code="invalid_parameter", status=400, param="overlap",
        )
    return _Chunker(doc, max_tokens, float(overlap), encoding).run()


class _Chunker:
    def __init__(self, doc: ParsedDocument, max_tokens: int, overlap: float, encoding: str) -> None:
        self.text = doc.text
        self.doc = doc
        self.max = max_tokens
        self.overlap_target = int(round(overlap * max_tokens))
        self.count = get_encoder(encoding).count
        self.units: list[_Unit] = []
        self.chunks: list[ChunkDraft] = []

    # units ---------------------------------------------------------------------------
    def _make_units(self) -> None:
        text, count = self.text, self.count
        pos = 0
        for block in sorted(self.doc.blocks, key=lambda b: b.start):
            start, end = max(block.start, pos), min(block.end, len(text))
            start, end = _trim(text, start, end, block.kind == "code")
            if start >= end:
                continue
            pos = end
            level = block.level if block.kind == "heading" else 0
            if block.kind == "heading" and level <= 0:
                level = 1
            path = list(block.heading_path)
            tokens = count(text[start:end])
            if tokens <= self.max:
                self.units.append(_Unit(start, end, tokens, block.kind, path, level))
                continue
            first = True
            for s, e, t in self._split(start, end, block.kind):
                self.units.append(_Unit(s, e, t, block.kind, path, level if first else 0))
                first = False

    def _split(self, start: int, end: int, kind: str) -> list[tuple[int, int, int]]:
        """Pieces of an oversize block, each of at most ``max`` tokens, as (start, end, tokens)."""
        if kind == "list":
            levels = ("items", "lines", "cut")
        elif kind in _LINE_KINDS:
            levels = ("lines", "cut")
        else:
            levels = ("sentences", "lines", "cut")
        return self._split_at(start, end, levels, keep_indent=kind in _LINE_KINDS)

    def _split_at(
        self, start: int, end: int, levels: tuple[str, ...], keep_indent: bool
    ) -> list[tuple[int, int, int]]:
        level, rest = levels[0], levels[1:]
        if level == "cut":
            return self._cut(start, end)
        spans = _segments(self.text, start, end, level, keep_indent)
        if len(spans) <= 1:
            return self._split_at(start, end, rest, keep_indent)
        out: list[tuple[int, int, int]] = []
        for s, e in spans:
            t = self.count(self.text[s:e])
            if t <= self.max:
                out.append((s, e, t))
            else:
                out.extend(self._split_at(s, e, rest, keep_indent))
        return out

    def _cut(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Last resort: pieces of about ``max`` tokens, cut at whitespace when there is some."""
        text, count, limit = self.text, self.count, self.max
        total = count(text[start:end])
        chars_per_token = max((end - start) / max(total, 1), 0.25)
        out: list[tuple[int, int, int]] = []
        pos = start
        while pos < end:
            if end - pos <= 2 * limit * chars_per_token:
                t = count(text[pos:end])
                if t <= limit:
                    out.append((pos, end, t))
                    break
            size = max(int(limit * 0.9 * chars_per_token), 1)
            while True:
                cut = min(pos + size, end)
                # prefer the last whitespace in the second half of the piece
                window = text[pos + size // 2 : cut]
                ws = max(window.rfind(" "), window.rfind("\n"), window.rfind("\t"))
                if ws > 0:
                    cut = pos + size // 2 + ws
                s, e = _trim(text, pos, cut)
                t = count(text[s:e]) if s < e else 0
                if t <= limit or size == 1:
                    break
                size = max(int(size * 0.8), 1)
            if s < e:
                out.append((s, e, t))
            pos = cut
            while pos < end and text[pos].isspace():
                pos += 1
        return out

    # packing -------------------------------------------------------------------------
    def _subtree_tokens(self) -> list[int]:
        """For each heading unit: tokens of its section with subsections (capped just above max)."""
        units, cap = self.units, self.max + 1
        out = [0] * len(units)
        for i, u in enumerate(units):
            if not u.heading:
                continue
            total = u.tokens
            for j in range(i + 1, len(units)):
                v = units[j]
                if v.heading and v.level <= u.level:
                    break
                total += v.tokens + 1
                if total > cap:
                    break
            out[i] = total
        return out

    def run(self) -> list[ChunkDraft]:
        self._make_units()
        units = self.units
        if not units:
            return []
        subtree = self._subtree_tokens()
        small = self.max * SMALL_SECTION
        cur: list[int] = []  # unit indices of the chunk being built
        cur_tokens = 0
        cur_whole = True  # the chunk started at a section's start (not mid-section)
        ov: tuple[int, int, int] | None = None  # overlap of the chunk: (start, tokens, unit index)
        i = 0
        while i < len(units):
            u = units[i]
            if cur:
                fits = cur_tokens + 1 + u.tokens <= self.max
                brk = not fits
                if u.heading and fits and cur_tokens + 1 + subtree[i] > self.max:
                    brk = not cur_whole or cur_tokens >= small
                if brk:
                    i = self._emit(cur, ov)
                    nxt = units[i]
                    ov = None
                    if not nxt.heading:
                        ov = self._overlap(self.chunks[-1], cur, budget=self.max - 1 - nxt.tokens)
                    cur, cur_tokens = [], 0
                    cur_whole = ov is None and (nxt.heading or i == 0)
                    continue
                cur.append(i)
                cur_tokens += 1 + u.tokens
            else:
                cur = [i]
                cur_tokens = u.tokens + (ov[1] + 1 if ov else 0)
            i += 1
        if cur:
            self._emit(cur, ov, final=True)
        return self.chunks

    def _emit(self, cur: list[int], ov: tuple[int, int, int] | None, final: bool = False) -> int:
        """Emit the chunk of units ``cur`` (plus overlap); return the index of the next unit to pack."""
        units, text = self.units, self.text
        own = list(cur)
        if not final:
            # a heading whose content did not fit goes with its content
            while len(own) > 1 and units[own[-1]].heading and any(not units[k].heading for k in own[:-1]):
                own.pop()
        while True:
            first = units[own[0]]
            start = ov[0] if ov else first.start
            start = _snap_heading(text, start)
            end = units[own[-1]].end
            tokens = self.count(text[start:end])
            if tokens <= self.max:
                break
            if len(own) > 1:
                own.pop()
            elif ov is not None:
                ov = None
            else:  # only a Markdown heading prefix can push a single unit over
                start = first.start
                tokens = self.count(text[start:end])
                break
        path_unit = units[ov[2]] if ov else units[own[0]]
        self.chunks.append(
            ChunkDraft(
                text=text[start:end], start=start, end=end, heading_path=list(path_unit.path),
                token_count=tokens, ordinal=len(self.chunks),
            )
        )
        return own[-1] + 1

    def _overlap(self, prev: ChunkDraft, cur: list[int], budget: int) -> tuple[int, int, int] | None:
        """Where the next chunk starts: a sentence/line boundary near the end of ``prev`` whose
        tail has about ``overlap_target`` tokens (at most ``budget``)."""
        target = self.overlap_target
        limit = min(2 * target, budget)
        if target <= 0 or limit <= 0:
            return None
        units, text, end = self.units, self.text, prev.end
        own = [k for k in cur if units[k].end <= end]
        if not own:
            return None
        floor = units[own[0]].start
        best: tuple[int, int, int] | None = None
        for k in reversed(own):
            u = units[k]
            if u.kind in _LINE_KINDS:
                bounds = _boundaries(text, u.start, u.end, _LINE_BREAK)
            else:
                bounds = _boundaries(text, u.start, u.end, _SENTENCE_BREAK)
            done = False
            for pos in reversed(bounds):
                if pos <= floor:
                    done = True
                    break
                t = self.count(text[pos:end])
                if t > limit:
                    done = True
                    break
                if best is None or abs(t - target) < abs(best[1] - target) or (
                    abs(t - target) == abs(best[1] - target) and t < best[1]
                ):
                    best = (pos, t, k)
            if done or u.heading:
                break
        return best


def _trim(text: str, start: int, end: int, keep_indent: bool = False) -> tuple[int, int]:
    """Strip whitespace (only line breaks at the start when ``keep_indent``)."""
    while start < end and (text[start] == "\n" if keep_indent else text[start].isspace()):
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _snap_heading(text: str, pos: int) -> int:
    """Move a chunk start at a Markdown ATX heading's words back to the line's start."""
    lo = max(0, pos - 32)  # a heading prefix is short; never scan far back
    newline = text.rfind("\n", lo, pos)
    if newline < 0 and lo > 0:
        return pos
    line_start = newline + 1
    if line_start < pos and _ATX_PREFIX.fullmatch(text, line_start, pos):
        return line_start
    return pos


def _boundaries(text: str, start: int, end: int, pattern: re.Pattern[str]) -> list[int]:
    """Starts of the pieces of ``text[start:end]`` after each match of ``pattern``."""
    out = [start]
    for m in pattern.finditer(text, start, end):
        if start < m.end() < end:
            out.append(m.end())
    return out


def _segments(text: str, start: int, end: int, level: str, keep_indent: bool = False) -> list[tuple[int, int]]:
    if level == "sentences":
        bounds = _boundaries(text, start, end, _SENTENCE_BREAK)
    elif level == "lines":
        bounds = _boundaries(text, start, end, _LINE_BREAK)
    else:  # list items: lines that start with a marker at the first item's indentation or less
        bounds = [start]
        first_line = text.rfind("\n", 0, start) + 1
        base = start - first_line
        for m in _LINE_BREAK.finditer(text, start, end):
            pos = m.end()
            if pos >= end:
                continue
            line_end = text.find("\n", pos, end)
            line_end = end if line_end < 0 else line_end
            if _ITEM_START.match(text, pos, line_end):
                indent = len(text[pos:line_end]) - len(text[pos:line_end].lstrip(" \t"))
                if indent <= base:
                    bounds.append(pos + indent)
    spans = []
    for a, b in zip(bounds, bounds[1:] + [end]):
        s, e = _trim(text, a, b, keep_indent)
        if s < e:
            spans.append((s, e))
    return spans
