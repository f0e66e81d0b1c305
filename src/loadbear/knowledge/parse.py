"""Turning uploaded documents into a normalised text and its structural blocks.

:func:`parse_text` takes text sent as JSON (plain text, Markdown or HTML);
:func:`parse_file` takes an upload (.txt, .md/.markdown, .html/.htm, .pdf, .docx).
Both return a :class:`~loadbear.knowledge.types.ParsedDocument` whose ``blocks`` are
headings, paragraphs, lists, code blocks and tables, each with a true span into
``ParsedDocument.text`` (``text[block.start:block.end] == block.text``) and the path of
the headings that enclose it (a heading's own path ends with itself).

What ``text`` is, per type:

* plain text and Markdown: the source itself, with line endings normalised to ``\\n``,
  a leading byte-order mark and NUL characters removed. Markdown markup stays in the text
  (a fenced code block keeps its fences); a heading block's span covers only the heading's
  words, not its ``#`` markers or setext underline.
* HTML, PDF, DOCX: a text rendered from the structure, blocks separated by a blank line:
  list items as ``- item`` / ``1. item`` lines (nested ones indented by two spaces per
  level), table rows as cells joined by `` | ``, code blocks verbatim, everything else
  with its whitespace collapsed.

Errors are :class:`~loadbear.knowledge.types.KnowledgeError` with these codes and statuses:

==================== ====== ======================================================
code                 status when
==================== ====== ======================================================
file_too_large       413    the upload is larger than ``max_bytes`` (or a DOCX
                            inflates to more than :data:`MAX_DOCX_XML_BYTES`)
unsupported_type     415    the extension (or, without one, the content type) is
                            not one of :data:`SUPPORTED_EXTENSIONS`; for
                            :func:`parse_text`, a content type other than
                            text/plain, text/markdown, text/html
empty_file           422    the file has no bytes, or only whitespace / no blocks
empty_document       422    :func:`parse_text` got empty or whitespace-only text
invalid_text         400    :func:`parse_text` got something other than a string
bad_encoding         422    a text file is not valid UTF-8 (and has no UTF-16/32
                            byte-order mark or declared charset), or holds NULs,
                            or declares an unknown charset; the message names the
                            byte offset
corrupt_file         422    a PDF or DOCX that cannot be read
encrypted_file       422    a password-protected PDF
no_extractable_text  422    a PDF with pages but no text layer (scanned/images)
==================== ====== ======================================================

422 (rather than 400) is used for files that arrived intact but whose content cannot be
processed; the request itself was well formed.
"""

from __future__ import annotations

import codecs
import io
import re
import zipfile
from html.parser import HTMLParser
from typing import Iterable
from xml.etree import ElementTree as ET

from loadbear.knowledge.types import Block, KnowledgeError, ParsedDocument

__all__ = [
    "parse_text",
    "parse_file",
    "decode_text",
    "SUPPORTED_EXTENSIONS",
    "CONTENT_TYPES",
    "MAX_DOCX_XML_BYTES",
]

TEXT_PLAIN = "text/plain"
TEXT_MARKDOWN = "text/markdown"
TEXT_HTML = "text/html"
APPLICATION_PDF = "application/pdf"
APPLICATION_DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"

#: extension -> the content type the document is parsed as
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".txt": TEXT_PLAIN,
    ".md": TEXT_MARKDOWN,
    ".markdown": TEXT_MARKDOWN,
    ".html": TEXT_HTML,
    ".htm": TEXT_HTML,
    ".pdf": APPLICATION_PDF,
    ".docx": APPLICATION_DOCX,
}

#: content types accepted as a hint when a file name has no (or an unknown) extension
CONTENT_TYPES: dict[str, str] = {
    "text/plain": TEXT_PLAIN,
    "text/markdown": TEXT_MARKDOWN,
    "text/x-markdown": TEXT_MARKDOWN,
    "text/html": TEXT_HTML,
    "application/xhtml+xml": TEXT_HTML,
    "application/pdf": APPLICATION_PDF,
    APPLICATION_DOCX: APPLICATION_DOCX,
}

#: the most a DOCX's ``word/document.xml`` may inflate to (guards against zip bombs)
MAX_DOCX_XML_BYTES = 64 * 1024 * 1024

_SUPPORTED_LIST = ", ".join(SUPPORTED_EXTENSIONS)


def _error(message: str, code: str, status: int = 422, param: str | None = "file") -> KnowledgeError:
    return KnowledgeError(message, code=code, status=status, param=param)


# ---------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------


def _media_type(content_type: str | None) -> tuple[str, str | None]:
    """``"text/html; charset=latin-1"`` -> ``("text/html", "latin-1")``."""
    if not content_type:
        return "", None
    parts = content_type.split(";")
    media = parts[0].strip().lower()
    charset = None
    for part in parts[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip("\"'") or None
    return media, charset


def parse_text(text: str, content_type: str = TEXT_PLAIN) -> ParsedDocument:
    """Parse text sent as JSON. ``content_type``: ``text/plain``, ``text/markdown`` or ``text/html``."""
    media, _ = _media_type(content_type)
    kind = CONTENT_TYPES.get(media or TEXT_PLAIN)
    if kind not in (TEXT_PLAIN, TEXT_MARKDOWN, TEXT_HTML):
        raise _error(
            f"unsupported content type {content_type!r} for text; use text/plain, text/markdown or text/html",
            "unsupported_type", 415, "content_type",
        )
    if not isinstance(text, str):
        raise _error("text must be a string", "invalid_text", 400, "text")
    text = _normalise(text.replace("\x00", ""))
    if not text.strip():
        raise _error("the document text is empty", "empty_document", 422, "text")
    doc = _parse_decoded(text, kind)
    if not doc.blocks:
        raise _error("the document has no text content", "empty_document", 422, "text")
    return doc


def parse_file(
    filename: str,
    data: bytes,
    content_type: str | None = None,
    max_bytes: int | None = None,
) -> ParsedDocument:
    """Parse an uploaded file; its type comes from the extension, else from ``content_type``."""
    if not isinstance(data, bytes):
        data = bytes(data)
    size = len(data)
    if max_bytes is not None and size > max_bytes:
        raise _error(
            f"the file is {size} bytes; the limit is {max_bytes} bytes", "file_too_large", 413
        )
    kind = _file_kind(filename, content_type)
    if size == 0:
        raise _error(f"the file {filename!r} is empty", "empty_file")
    _, charset = _media_type(content_type)
    if kind == APPLICATION_PDF:
        doc = _parse_pdf(data)
    elif kind == APPLICATION_DOCX:
        doc = _parse_docx(data)
    else:
        if kind == TEXT_HTML and charset is None:
            charset = _html_meta_charset(data)
        text = _normalise(decode_text(data, charset))
        if not text.strip():
            raise _error(f"the file {filename!r} contains only whitespace", "empty_file")
        doc = _parse_decoded(text, kind)
    if not doc.blocks:
        raise _error(f"the file {filename!r} has no text content", "empty_file")
    return doc


def _file_kind(filename: str, content_type: str | None) -> str:
    name = (filename or "").strip().lower()
    dot = name.rfind(".")
    ext = name[dot:] if dot > max(name.rfind("/"), name.rfind("\\")) else ""
    if ext in SUPPORTED_EXTENSIONS:
        return SUPPORTED_EXTENSIONS[ext]
    media, _ = _media_type(content_type)
    if not ext and media in CONTENT_TYPES:
        return CONTENT_TYPES[media]
    what = f"extension {ext!r}" if ext else f"file {filename!r} (no extension" + (
        f", content type {media!r})" if media else ")"
    )
    raise _error(f"unsupported {what}; supported: {_SUPPORTED_LIST}", "unsupported_type", 415)


def _parse_decoded(text: str, kind: str) -> ParsedDocument:
    if kind == TEXT_MARKDOWN:
        return _parse_markdown(text)
    if kind == TEXT_HTML:
        return _parse_html(text)
    return _parse_plain(text)


# ---------------------------------------------------------------------------------------
# text decoding
# ---------------------------------------------------------------------------------------

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def decode_text(data: bytes, charset: str | None = None) -> str:
    """Decode a text upload. Nothing is guessed: a byte-order mark (UTF-8/16/32) wins; then
    the bytes must be UTF-8, except that a declared ``charset`` (the upload's content-type
    parameter, or an HTML ``<meta charset>``) is used for bytes that are not valid UTF-8
    (a UTF-16/32 declaration is used as is). Undecodable bytes raise ``bad_encoding``
    naming the byte offset."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return _decode(data, encoding, len(bom), f"{encoding.upper()} (byte-order mark)")
    if charset:
        try:
            encoding = codecs.lookup(charset).name
        except LookupError:
            raise _error(f"unknown charset {charset!r}", "bad_encoding") from None
        if encoding.startswith(("utf-16", "utf-32")):
            return _decode(data, encoding, 0, f"the declared charset {charset!r}")
        if encoding not in ("utf-8", "utf-8-sig"):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return _decode(data, encoding, 0, f"the declared charset {charset!r}")
    return _decode(data, "utf-8", 0, "UTF-8")


def _decode(data: bytes, encoding: str, skip: int, label: str) -> str:
    try:
        text = data[skip:].decode(encoding)
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        bad = " ".join(f"0x{b:02X}" for b in data[offset : offset + min(4, max(1, exc.end - exc.start))])
        hint = " (or UTF-16 with a byte-order mark)" if encoding == "utf-8" else ""
        raise _error(
            f"the file is not valid {label}: cannot decode {bad} at byte offset "
            f"{offset} (line {line}, column {column}); save it as UTF-8{hint}",
            "bad_encoding",
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        if encoding == "utf-8" and not skip:
            where = f"byte offset {data.find(bytes(1))}"
        else:
            where = f"character {nul}"
        raise _error(
            f"the file contains a NUL character at {where}: it looks like binary data "
            "or UTF-16 without a byte-order mark",
            "bad_encoding",
        )
    return text


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


def _html_meta_charset(data: bytes) -> str | None:
    m = _META_CHARSET.search(data[:4096])
    return m.group(1).decode("ascii") if m else None


def _normalise(text: str) -> str:
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


# ---------------------------------------------------------------------------------------
# blocks built from source text (plain text, Markdown)
# ---------------------------------------------------------------------------------------


class _Paths:
    """Tracks the enclosing headings."""

    def __init__(self) -> None:
        self.stack: list[tuple[int, str]] = []

    def heading(self, level: int, title: str) -> list[str]:
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        self.stack.append((level, title))
        return self.current()

    def current(self) -> list[str]:
        return [t for _, t in self.stack]


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


class _SourceBlocks:
    """Blocks whose spans are taken from the source text itself."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.blocks: list[Block] = []
        self.paths = _Paths()
        self.title: str | None = None

    def add(self, kind: str, start: int, end: int) -> None:
        if kind == "code":  # keep the first line's indentation
            while start < end and self.text[start] == "\n":
                start += 1
            while end > start and self.text[end - 1].isspace():
                end -= 1
        else:
            start, end = _trimmed(self.text, start, end)
        if start < end:
            self.blocks.append(Block(kind, self.text[start:end], start, end, 0, self.paths.current()))

    def heading(self, level: int, start: int, end: int) -> None:
        start, end = _trimmed(self.text, start, end)
        if start >= end:
            return
        raw = self.text[start:end]
        title = _clean_heading(raw)
        if not title:
            return
        if level == 1 and self.title is None:
            self.title = title
        self.blocks.append(Block("heading", raw, start, end, level, self.paths.heading(level, title)))


_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_WS = re.compile(r"\s+")


def _clean_heading(raw: str) -> str:
    return _WS.sub(" ", _MD_LINK.sub(r"\1", raw)).strip()


def _line_table(text: str) -> tuple[list[str], list[int]]:
    lines = text.split("\n")
    starts = []
    pos = 0
    for line in lines:
        starts.append(pos)
        pos += len(line) + 1
    return lines, starts


_LIST_ITEM = re.compile(r"^[ \t]{0,3}(?:[-*+]|\d{1,9}[.)])(?:[ \t]+|$)")


def _is_blank(line: str) -> bool:
    return not line or line.isspace()


def _parse_plain(text: str) -> ParsedDocument:
    """Paragraphs separated by blank lines; a paragraph made of list items is a list."""
    out = _SourceBlocks(text)
    lines, starts = _line_table(text)
    i, n = 0, len(lines)
    while i < n:
        if _is_blank(lines[i]):
            i += 1
            continue
        j = i
        while j < n and not _is_blank(lines[j]):
            j += 1
        end = starts[j - 1] + len(lines[j - 1])
        # the list that ends this run of lines (if any): "Changes:\n- a\n- b" is a paragraph and a list
        k = j
        while k > i and (_LIST_ITEM.match(lines[k - 1]) or (lines[k - 1][:1] in (" ", "\t") and k - 1 > i)):
            k -= 1
        while k < j and not _LIST_ITEM.match(lines[k]):
            k += 1
        if k < j:
            if k > i:
                out.add("paragraph", starts[i], starts[k - 1] + len(lines[k - 1]))
            out.add("list", starts[k], end)
        else:
            out.add("paragraph", starts[i], end)
        i = j
    return ParsedDocument(text=text, blocks=out.blocks, title=None, content_type=TEXT_PLAIN)


# Markdown ------------------------------------------------------------------------------

_FENCE = re.compile(r"^([ \t]{0,3})(`{3,}|~{3,})(.*)$")
_ATX = re.compile(r"^[ \t]{0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^[ \t]{0,3}(=+|-+)[ \t]*$")
_HR = re.compile(r"^[ \t]{0,3}(?:(?:\*[ \t]*){3,}|(?:-[ \t]*){3,}|(?:_[ \t]*){3,})$")
_BULLET_INTERRUPT = re.compile(r"^[ \t]{0,3}(?:[-*+]|1[.)])[ \t]+\S")
_TABLE_DELIM = re.compile(r"^[ \t]{0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")
_FRONT_MATTER_END = re.compile(r"^(?:---|\.\.\.)[ \t]*$")


def _indent(line: str) -> int:
    width = 0
    for ch in line:
        if ch == " ":
            width += 1
        elif ch == "\t":
            width += 4 - width % 4
        else:
            break
    return width


def _table_start(lines: list[str], i: int) -> bool:
    return (
        "|" in lines[i]
        and i + 1 < len(lines)
        and "-" in lines[i + 1]
        and _TABLE_DELIM.match(lines[i + 1]) is not None
        and ("|" in lines[i + 1] or lines[i].strip().startswith("|"))
    )


def _fence_close(lines: list[str], i: int, fence: str) -> int:
    """Index of the closing fence line for an opening fence at ``i`` (or the last line)."""
    char, size = fence[0], len(fence)
    for j in range(i + 1, len(lines)):
        stripped = lines[j].strip()
        if (
            _indent(lines[j]) < 4
            and len(stripped) >= size
            and stripped.startswith(char * size)
            and stripped.rstrip(char) == ""
        ):
            return j
    return len(lines) - 1


def _parse_markdown(text: str) -> ParsedDocument:
    out = _SourceBlocks(text)
    lines, starts = _line_table(text)
    n = len(lines)

    def span_end(j: int) -> int:
        return starts[j] + len(lines[j])

    i = 0
    # YAML front matter is not content.
    if n and lines[0].rstrip() == "---":
        for j in range(1, n):
            if _FRONT_MATTER_END.match(lines[j]):
                i = j + 1
                break

    while i < n:
        line = lines[i]
        if _is_blank(line):
            i += 1
            continue
        indent = _indent(line)

        m = _FENCE.match(line)
        if m and not (m.group(2)[0] == "`" and "`" in m.group(3)):
            j = _fence_close(lines, i, m.group(2))
            out.add("code", starts[i], span_end(j))
            i = j + 1
            continue

        m = _ATX.match(line)
        if m:
            if m.group(2):
                out.heading(len(m.group(1)), starts[i] + m.start(2), starts[i] + m.end(2))
            i += 1
            continue

        if _HR.match(line):
            i += 1
            continue

        if _LIST_ITEM.match(line):
            j = i + 1
            last = i
            while j < n:
                cur = lines[j]
                if _is_blank(cur):
                    k = j + 1
                    while k < n and _is_blank(lines[k]):
                        k += 1
                    if k < n and (_LIST_ITEM.match(lines[k]) or _indent(lines[k]) >= 2) and not _HR.match(lines[k]):
                        j = k
                        continue
                    break
                if _indent(cur) < 2 and (_ATX.match(cur) or _HR.match(cur) or _FENCE.match(cur)):
                    break
                if _indent(cur) >= 2:
                    fm = _FENCE.match(cur.lstrip(" \t")) if cur.lstrip(" \t")[:1] in "`~" else None
                    if fm:
                        # a fenced block inside an item: take it whole, blank lines and all
                        j = _fence_close(lines, j, fm.group(2))
                last = j
                j += 1
            out.add("list", starts[i], span_end(last))
            i = last + 1
            continue

        if indent >= 4:
            j = i + 1
            last = i
            while j < n:
                if _is_blank(lines[j]):
                    j += 1
                    continue
                if _indent(lines[j]) < 4:
                    break
                last = j
                j += 1
            out.add("code", starts[i], span_end(last))
            i = last + 1
            continue

        if _table_start(lines, i):
            j = i + 2
            while j < n and not _is_blank(lines[j]) and "|" in lines[j]:
                j += 1
            out.add("table", starts[i], span_end(j - 1))
            i = j
            continue

        # a paragraph, possibly a setext heading
        j = i + 1
        setext = 0
        while j < n:
            cur = lines[j]
            if _is_blank(cur):
                break
            sm = _SETEXT.match(cur)
            if sm:
                setext = 1 if sm.group(1)[0] == "=" else 2
                break
            if (
                _ATX.match(cur)
                or (_FENCE.match(cur) and _indent(cur) < 4)
                or _HR.match(cur)
                or _BULLET_INTERRUPT.match(cur)
                or _table_start(lines, j)
            ):
                break
            j += 1
        if setext:
            out.heading(setext, starts[i], span_end(j - 1))
            i = j + 1
        else:
            out.add("paragraph", starts[i], span_end(j - 1))
            i = j
    return ParsedDocument(text=text, blocks=out.blocks, title=out.title, content_type=TEXT_MARKDOWN)


# ---------------------------------------------------------------------------------------
# blocks rendered into a new text (HTML, PDF, DOCX)
# ---------------------------------------------------------------------------------------


class _Rendered:
    """Appends blocks to a text, separated by a blank line, with true spans."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pos = 0
        self.blocks: list[Block] = []
        self.paths = _Paths()
        self.first_h1: str | None = None

    def add(self, kind: str, text: str, level: int = 0) -> None:
        text = text.strip("\n").rstrip() if kind == "code" else text.strip()
        if not text.strip():
            return
        if kind == "heading":
            text = _WS.sub(" ", text)
            level = min(max(level, 1), 6)
            path = self.paths.heading(level, text)
            if level == 1 and self.first_h1 is None:
                self.first_h1 = text
        else:
            level = 0
            path = self.paths.current()
        if self.parts:
            self.parts.append("\n\n")
            self.pos += 2
        start = self.pos
        self.parts.append(text)
        self.pos += len(text)
        self.blocks.append(Block(kind, text, start, self.pos, level, path))

    def document(self, title: str | None, content_type: str) -> ParsedDocument:
        return ParsedDocument(
            text="".join(self.parts), blocks=self.blocks, title=title or self.first_h1,
            content_type=content_type,
        )


def _inline(pieces: Iterable[str]) -> str:
    """Collapse whitespace; ``\\n`` pieces (from <br>) become line breaks."""
    lines = []
    for segment in "".join(pieces).split("\x00"):
        segment = _WS.sub(" ", segment).strip()
        if segment:
            lines.append(segment)
    return "\n".join(lines)


_BR = "\x00"  # marks a <br> inside collected inline text (NULs never reach the parser)

_HTML_SKIP = frozenset(
    {"script", "style", "nav", "noscript", "template", "svg", "iframe", "object", "canvas", "select", "button", "math"}
)
_HTML_BLOCK = frozenset(
    {
        "p", "div", "section", "article", "main", "header", "footer", "aside", "blockquote", "figure",
        "figcaption", "address", "details", "summary", "dl", "dt", "dd", "form", "fieldset", "legend",
        "hr", "center", "body", "html", "head", "hgroup", "menu", "noframes", "caption",
    }
)
_HTML_HEADINGS = {f"h{i}": i for i in range(1, 7)}


class _HTMLBlocks(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out = _Rendered()
        self.title_parts: list[str] = []
        self.in_title = False
        self.skip: list[str] = []
        self.inline: list[str] = []
        self.heading_level = 0
        self.heading_parts: list[str] = []
        self.pre_depth = 0
        self.pre_parts: list[str] = []
        self.lists: list[list] = []  # [tag, next number]
        self.items: list[tuple[int, str, list[str]]] = []
        self.table_depth = 0
        self.rows: list[list[list[str]]] = []

    # routing -------------------------------------------------------------------------
    def _sink(self) -> list[str] | None:
        if self.table_depth:
            if not self.rows:
                self.rows.append([])
            if not self.rows[-1]:
                self.rows[-1].append([])
            return self.rows[-1][-1]
        if self.lists:
            if not self.items:  # text before the first <li>
                self.items.append((max(len(self.lists) - 1, 0), "-", []))
            return self.items[-1][2]
        if self.heading_level:
            return self.heading_parts
        if self.pre_depth:
            return self.pre_parts
        return self.inline

    def _in_container(self) -> bool:
        return bool(self.table_depth or self.lists)

    def _flush_inline(self) -> None:
        if self.inline:
            self.out.add("paragraph", _inline(self.inline))
            self.inline = []

    def _new_item(self) -> None:
        depth = max(len(self.lists) - 1, 0)
        marker = "-"
        if self.lists and self.lists[-1][0] == "ol":
            marker = f"{self.lists[-1][1]}."
            self.lists[-1][1] += 1
        self.items.append((depth, marker, []))

    def _flush_list(self) -> None:
        lines = []
        for depth, marker, parts in self.items:
            text = _inline(parts).replace("\n", " ")
            if text:
                lines.append("  " * depth + marker + " " + text)
        self.items = []
        self.out.add("list", "\n".join(lines))

    def _flush_table(self) -> None:
        lines = []
        for row in self.rows:
            cells = [_inline(cell).replace("\n", " ") for cell in row]
            if any(cells):
                lines.append(" | ".join(cells))
        self.rows = []
        self.out.add("table", "\n".join(lines))

    def _flush_heading(self) -> None:
        if self.heading_level:
            self.out.add("heading", _inline(self.heading_parts), self.heading_level)
        self.heading_level = 0
        self.heading_parts = []

    def _flush_pre(self) -> None:
        text = "".join(self.pre_parts).replace(_BR, "\n")
        self.pre_parts = []
        self.pre_depth = 0
        if text.startswith("\n"):
            text = text[1:]
        self.out.add("code", text)

    # events --------------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list) -> None:
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.append(tag)
            return
        if tag in _HTML_SKIP:
            self.skip.append(tag)
            return
        if tag == "title":
            self.in_title = True
            return
        if tag == "br":
            sink = self._sink()
            if sink is not None:
                sink.append("\n" if (self.pre_depth and not self._in_container() and not self.heading_level) else _BR)
            return
        if tag in ("td", "th") and self.table_depth:
            if not self.rows:
                self.rows.append([])
            self.rows[-1].append([])
            return
        if tag == "tr" and self.table_depth:
            self.rows.append([])
            return
        if tag == "table":
            if self.lists and not self.table_depth:  # a table inside a list item: its text joins the item
                self._sink().append(" ")
                return
            if not self._in_container():
                self._flush_heading()
                self._flush_inline()
                self.rows = []
            elif self.table_depth:
                self._sink().append(" ")
            self.table_depth += 1
            return
        if self.table_depth:
            sink = self._sink()
            if tag in _HTML_BLOCK or tag in _HTML_HEADINGS or tag in ("li", "pre", "ul", "ol"):
                sink.append(" ")
            return
        if tag in ("ul", "ol"):
            if not self.lists:
                self._flush_heading()
                self._flush_inline()
                self.items = []
            start = 1
            if tag == "ol":
                for key, value in attrs:
                    if key == "start" and value and value.strip().lstrip("-").isdigit():
                        start = int(value)
            self.lists.append([tag, start])
            return
        if tag == "li":
            if self.lists:
                self._new_item()
            elif not self.pre_depth and not self.heading_level:  # a stray <li>: a paragraph
                self._flush_inline()
            return
        if self.lists:
            if tag in _HTML_BLOCK or tag in _HTML_HEADINGS or tag == "pre":
                self._sink().append(" ")
            return
        if tag in _HTML_HEADINGS:
            self._flush_inline()
            self._flush_heading()
            self.heading_level = _HTML_HEADINGS[tag]
            return
        if tag == "pre":
            if not self.pre_depth:
                self._flush_inline()
            self.pre_depth += 1
            return
        if tag in _HTML_BLOCK and not self.pre_depth and not self.heading_level:
            self._flush_inline()

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag in _HTML_SKIP:
            return
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"):
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            if tag in self.skip:
                while self.skip and self.skip.pop() != tag:
                    pass
            return
        if tag == "title":
            self.in_title = False
            return
        if tag == "table" and self.table_depth:
            self.table_depth -= 1
            if not self.table_depth and not self.lists:
                self._flush_table()
            return
        if self.table_depth:
            return
        if tag in ("ul", "ol"):
            if self.lists:
                # close up to the matching list
                while self.lists:
                    popped = self.lists.pop()
                    if popped[0] == tag:
                        break
                if not self.lists:
                    self._flush_list()
            return
        if self.lists:
            return
        if tag in _HTML_HEADINGS and self.heading_level:
            self._flush_heading()
            return
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
            if not self.pre_depth:
                self._flush_pre()
            return
        if tag in _HTML_BLOCK and not self.pre_depth and not self.heading_level:
            self._flush_inline()

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.in_title:
            self.title_parts.append(data)
            return
        if self.lists and not self.items and not self.table_depth and not data.strip():
            return
        sink = self._sink()
        if sink is not None:
            sink.append(data.replace(_BR, ""))

    def finish(self) -> ParsedDocument:
        self.close()
        self.skip = []
        if self.table_depth:
            self.table_depth = 0
            self._flush_table()
        if self.lists:
            self.lists = []
            self._flush_list()
        self._flush_heading()
        if self.pre_depth:
            self._flush_pre()
        self._flush_inline()
        title = _WS.sub(" ", "".join(self.title_parts)).strip() or None
        return self.out.document(title, TEXT_HTML)


def _parse_html(text: str) -> ParsedDocument:
    parser = _HTMLBlocks()
    parser.feed(text.replace("\x00", ""))
    return parser.finish()


# ---------------------------------------------------------------------------------------
# PDF
# ---------------------------------------------------------------------------------------

class _PdfLine:
    __slots__ = ("text", "y", "size", "chars")

    def __init__(self) -> None:
        self.text = ""
        self.y: float | None = None
        self.size = 0.0
        self.chars = 0


def _pdf_page_lines(page) -> list[_PdfLine]:
    """The page's text as pypdf extracts it, one entry per line, with each line's baseline
    height and font size (from the text visitor), so paragraphs and headings can be told apart."""
    lines = [_PdfLine()]

    def visit(text: str, cm, tm, font_dict, font_size) -> None:
        if not text:
            return
        pieces = text.split("\n")
        for i, piece in enumerate(pieces):
            if i:
                lines.append(_PdfLine())
            if not piece:
                continue
            line = lines[-1]
            line.text += piece
            if piece.strip():
                try:
                    y = float(tm[4]) * float(cm[1]) + float(tm[5]) * float(cm[3]) + float(cm[5])
                    scale = abs(float(tm[3]) or 1.0) * abs(float(cm[3]) or 1.0)
                    size = float(font_size or 0) * scale
                except (TypeError, ValueError, IndexError):
                    y, size = None, 0.0
                if line.y is None:
                    line.y = y
                n = len(piece.strip())
                line.chars += n
                line.size = max(line.size, size)

    page.extract_text(visitor_text=visit)
    for line in lines:
        line.text = _WS.sub(" ", line.text.replace("\x00", "")).strip()
    return [line for line in lines if line.text]


def _pdf_paragraphs(lines: list[_PdfLine]) -> list[list[_PdfLine]]:
    """Group a page's lines into paragraphs: a new one starts where the font size changes, the
    text moves up (a new column) or the gap to the previous line is clearly wider than the
    page's usual line pitch."""
    pitches = sorted(
        round(a.y - b.y, 1)
        for a, b in zip(lines, lines[1:])
        if a.y is not None and b.y is not None and a.y > b.y and _same_size(a.size, b.size)
    )
    pitch = pitches[len(pitches) // 2] if pitches else None
    paragraphs: list[list[_PdfLine]] = []
    prev: _PdfLine | None = None
    for line in lines:
        new = prev is None
        if prev is not None:
            if not _same_size(prev.size, line.size):
                new = True
            elif prev.y is not None and line.y is not None:
                gap = prev.y - line.y
                limit = 1.4 * pitch if pitch else 1.8 * max(line.size, 1.0)
                new = gap < -0.5 * max(line.size, 1.0) or gap > limit
        if new:
            paragraphs.append([line])
        else:
            paragraphs[-1].append(line)
        prev = line
    return paragraphs


def _same_size(a: float, b: float) -> bool:
    return abs(a - b) <= 0.1 * max(a, b, 1.0)


def _parse_pdf(data: bytes) -> ParsedDocument:
    try:
        from pypdf import PdfReader
        from pypdf.errors import DependencyError, FileNotDecryptedError
    except ImportError:  # pragma: no cover - pypdf is a dependency
        raise _error("PDF support needs the 'pypdf' package", "unsupported_type", 415) from None

    if b"%PDF-" not in data[:1024]:
        raise _error("the file is not a PDF (no %PDF- header)", "corrupt_file")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                unlocked = reader.decrypt("")
            except (DependencyError, NotImplementedError) as exc:
                raise _error(f"the PDF is encrypted and cannot be opened ({exc})", "encrypted_file") from None
            if not unlocked:
                raise _error("the PDF is password-protected; upload an unencrypted copy", "encrypted_file")
        pages = [_pdf_paragraphs(_pdf_page_lines(page)) for page in reader.pages]
        title = None
        try:
            meta = reader.metadata
            if meta is not None and meta.title:
                title = _WS.sub(" ", str(meta.title)).strip() or None
        except Exception:  # noqa: BLE001 - a broken info dictionary only loses the title
            title = None
    except KnowledgeError:
        raise
    except FileNotDecryptedError:
        raise _error("the PDF is password-protected; upload an unencrypted copy", "encrypted_file") from None
    except Exception as exc:  # noqa: BLE001 - pypdf raises many exception types on bad input
        raise _error(f"the PDF cannot be read: {_describe(exc)}", "corrupt_file") from None

    # Headings: short paragraphs set clearly larger than the body text; the largest size is level 1.
    weights: dict[float, int] = {}
    for paragraphs in pages:
        for para in paragraphs:
            for line in para:
                key = round(line.size * 2) / 2
                weights[key] = weights.get(key, 0) + line.chars
    body = max(weights, key=weights.get) if weights else 0.0
    heading_sizes = sorted({k for k in weights if body and k >= 1.15 * body}, reverse=True)
    levels = {size: min(i + 1, 6) for i, size in enumerate(heading_sizes)}

    out = _Rendered()
    for paragraphs in pages:
        for para in paragraphs:
            text = "\n".join(line.text for line in para)
            size = round(max(line.size for line in para) * 2) / 2
            if size in levels and len(para) <= 3 and len(text) <= 200:
                out.add("heading", text, levels[size])
            else:
                out.add("paragraph", text)
    if not out.blocks:
        if not pages:
            raise _error("the PDF has no pages", "empty_file")
        raise _error(
            f"the PDF has {len(pages)} page(s) but no extractable text (scanned or image-only?); "
            "OCR is not supported",
            "no_extractable_text",
        )
    return out.document(title, APPLICATION_PDF)


def _describe(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------
# DOCX
# ---------------------------------------------------------------------------------------

_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_DC_TITLE = "{http://purl.org/dc/elements/1.1/}title"
_HEADING_NAME = re.compile(r"^heading\s*([1-9])$")
_CODE_STYLE = re.compile(r"code|source|preformatted|verbatim", re.I)


def _read_member(zf: zipfile.ZipFile, name: str, required: bool) -> bytes | None:
    try:
        info = zf.getinfo(name)
    except KeyError:
        if required:
            raise _error(f"the DOCX has no {name} (not a Word document?)", "corrupt_file") from None
        return None
    if info.file_size > MAX_DOCX_XML_BYTES:
        raise _error(
            f"the DOCX's {name} inflates to {info.file_size} bytes; the limit is {MAX_DOCX_XML_BYTES}",
            "file_too_large", 413,
        )
    with zf.open(info) as fh:
        data = fh.read(MAX_DOCX_XML_BYTES + 1)
    if len(data) > MAX_DOCX_XML_BYTES:
        raise _error(f"the DOCX's {name} inflates to more than {MAX_DOCX_XML_BYTES} bytes", "file_too_large", 413)
    return data


def _xml(data: bytes, name: str) -> ET.Element:
    if b"<!DOCTYPE" in data[:4096] or b"<!ENTITY" in data:
        raise _error(f"the DOCX's {name} declares a DTD, which Word documents never do", "corrupt_file")
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise _error(f"the DOCX's {name} is not well-formed XML: {exc}", "corrupt_file") from None


class _DocxStyles:
    def __init__(self, root: ET.Element | None) -> None:
        self.kinds: dict[str, tuple[str, int]] = {}  # styleId -> ("heading"|"title"|"code"|"list"|"", level)
        self.numbers: dict[str, tuple[str, int | None]] = {}  # styleId -> (numId, ilvl) of a numbered style
        if root is None:
            return
        raw: dict[str, tuple[str, str | None, int | None, bool]] = {}
        for style in root.iter(f"{_W}style"):
            sid = style.get(f"{_W}styleId")
            if not sid:
                continue
            name_el = style.find(f"{_W}name")
            name = (name_el.get(f"{_W}val") if name_el is not None else sid) or sid
            based = style.find(f"{_W}basedOn")
            outline = style.find(f"{_W}pPr/{_W}outlineLvl")
            level = None
            if outline is not None and (outline.get(f"{_W}val") or "").isdigit():
                level = int(outline.get(f"{_W}val")) + 1
            num_pr = style.find(f"{_W}pPr/{_W}numPr")
            numbered = num_pr is not None
            if num_pr is not None:
                num_id = num_pr.find(f"{_W}numId")
                ilvl = num_pr.find(f"{_W}ilvl")
                if num_id is not None and num_id.get(f"{_W}val"):
                    lvl_val = ilvl.get(f"{_W}val") if ilvl is not None else None
                    self.numbers[sid] = (num_id.get(f"{_W}val"), int(lvl_val) if lvl_val and lvl_val.isdigit() else None)
            raw[sid] = (name, based.get(f"{_W}val") if based is not None else None, level, numbered)
        for sid in raw:
            self.kinds[sid] = self._resolve(sid, raw, 0)

    def _resolve(self, sid: str, raw: dict, depth: int) -> tuple[str, int]:
        name, based, level, numbered = raw[sid]
        kind = _style_kind(sid, name)
        if kind[0]:
            return kind
        if level is not None and 1 <= level <= 9:
            return ("heading", min(level, 6))
        if numbered:
            return ("list", 0)
        if based and based in raw and depth < 10:
            return self._resolve(based, raw, depth + 1)
        return ("", 0)

    def kind(self, sid: str | None) -> tuple[str, int]:
        if not sid:
            return ("", 0)
        return self.kinds.get(sid) or _style_kind(sid, sid)


def _style_kind(sid: str, name: str) -> tuple[str, int]:
    low = name.strip().lower()
    m = _HEADING_NAME.match(low) or re.match(r"^heading([1-9])$", sid.lower())
    if m:
        return ("heading", min(int(m.group(1)), 6))
    if low == "title" or sid.lower() == "title":
        return ("title", 1)
    if _CODE_STYLE.search(low) or _CODE_STYLE.search(sid):
        return ("code", 0)
    return ("", 0)


class _DocxNumbering:
    """numId -> list level -> (is it a bullet, its left indent in twips)."""

    def __init__(self, root: ET.Element | None) -> None:
        self.levels: dict[str, dict[int, tuple[bool, int | None]]] = {}
        self.style_levels: dict[str, int] = {}  # styleId -> the list level it is linked to
        if root is None:
            return
        abstract: dict[str, dict[int, tuple[bool, int | None]]] = {}
        for absn in root.iter(f"{_W}abstractNum"):
            levels = {}
            for lvl in absn.iter(f"{_W}lvl"):
                fmt = lvl.find(f"{_W}numFmt")
                ilvl_raw = lvl.get(f"{_W}ilvl") or "0"
                ilvl = int(ilvl_raw) if ilvl_raw.isdigit() else 0
                bullet = fmt is not None and fmt.get(f"{_W}val") == "bullet"
                levels[ilvl] = (bullet, _docx_indent(lvl.find(f"{_W}pPr")))
                pstyle = lvl.find(f"{_W}pStyle")
                if pstyle is not None and pstyle.get(f"{_W}val"):
                    self.style_levels[pstyle.get(f"{_W}val")] = ilvl
            abstract[absn.get(f"{_W}abstractNumId") or ""] = levels
        for num in root.iter(f"{_W}num"):
            ref = num.find(f"{_W}abstractNumId")
            if ref is not None:
                self.levels[num.get(f"{_W}numId") or ""] = abstract.get(ref.get(f"{_W}val") or "", {})

    def is_bullet(self, num_id: str, level: int) -> bool:
        return self.levels.get(num_id, {}).get(level, (True, None))[0]

    def indent(self, num_id: str, level: int) -> int | None:
        return self.levels.get(num_id, {}).get(level, (True, None))[1]


def _docx_indent(ppr: ET.Element | None) -> int | None:
    """The left indent (twips) a ``w:pPr`` sets, if any."""
    if ppr is None:
        return None
    ind = ppr.find(f"{_W}ind")
    if ind is None:
        return None
    value = ind.get(f"{_W}left") or ind.get(f"{_W}start")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _docx_runs_text(el: ET.Element) -> str:
    parts = []
    for node in el.iter():
        tag = node.tag
        if tag == f"{_W}t":
            parts.append(node.text or "")
        elif tag == f"{_W}tab":
            parts.append("\t")
        elif tag in (f"{_W}br", f"{_W}cr"):
            parts.append("\n")
        elif tag == f"{_W}noBreakHyphen":
            parts.append("-")
    return "".join(parts)


def _parse_docx(data: bytes) -> ParsedDocument:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise _error(f"the DOCX cannot be read: not a valid zip archive ({exc})", "corrupt_file") from None
    try:
        with zf:
            document = _xml(_read_member(zf, "word/document.xml", True), "word/document.xml")
            styles_data = _read_member(zf, "word/styles.xml", False)
            numbering_data = _read_member(zf, "word/numbering.xml", False)
            core_data = _read_member(zf, "docProps/core.xml", False)
    except KnowledgeError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError, NotImplementedError) as exc:
        raise _error(f"the DOCX cannot be read: {_describe(exc)}", "corrupt_file") from None

    def optional(raw: bytes | None, name: str) -> ET.Element | None:
        if raw is None:
            return None
        try:
            return _xml(raw, name)
        except KnowledgeError:
            return None

    styles = _DocxStyles(optional(styles_data, "word/styles.xml"))
    numbering = _DocxNumbering(optional(numbering_data, "word/numbering.xml"))
    core = optional(core_data, "docProps/core.xml")
    core_title = None
    if core is not None:
        el = core.find(_DC_TITLE)
        if el is not None and el.text and el.text.strip():
            core_title = _WS.sub(" ", el.text).strip()

    body = document.find(f"{_W}body")
    if body is None:
        raise _error("the DOCX's word/document.xml has no body", "corrupt_file")

    out = _Rendered()
    style_title: list[str] = []
    pending: list[str] = []  # lines of the list or code block being collected
    pending_kind = ""
    counters: dict[tuple[str, int], int] = {}
    indents: list[int] = []  # the indents of the enclosing items of the list being collected

    def flush() -> None:
        nonlocal pending, pending_kind
        if pending:
            out.add(pending_kind, "\n".join(pending))
        pending, pending_kind = [], ""
        indents.clear()

    def paragraph(p: ET.Element) -> None:
        nonlocal pending_kind
        ppr = p.find(f"{_W}pPr")
        sid = None
        num = None
        outline = None
        if ppr is not None:
            ps = ppr.find(f"{_W}pStyle")
            sid = ps.get(f"{_W}val") if ps is not None else None
            num = ppr.find(f"{_W}numPr")
            ol = ppr.find(f"{_W}outlineLvl")
            if ol is not None and (ol.get(f"{_W}val") or "").isdigit():
                outline = int(ol.get(f"{_W}val")) + 1
        kind, level = styles.kind(sid)
        if not kind and outline is not None and 1 <= outline <= 9:
            kind, level = "heading", min(outline, 6)
        raw = _docx_runs_text(p)
        if kind == "code":
            if pending_kind != "code":
                flush()
                pending_kind = "code"
            pending.append(raw.rstrip())
            return
        text = "\n".join(s for s in (_WS.sub(" ", seg).strip() for seg in raw.split("\n")) if s)
        if kind in ("heading", "title"):
            flush()
            if text:
                if kind == "title":
                    style_title.append(text.replace("\n", " "))
                out.add("heading", text, level)
            return
        if num is not None or kind == "list":
            if not text:
                return
            ilvl_el = num.find(f"{_W}ilvl") if num is not None else None
            id_el = num.find(f"{_W}numId") if num is not None else None
            style_num, style_lvl = styles.numbers.get(sid or "", ("", None))
            num_id = (id_el.get(f"{_W}val") if id_el is not None else None) or style_num
            if ilvl_el is not None and (ilvl_el.get(f"{_W}val") or "").isdigit():
                ilvl = int(ilvl_el.get(f"{_W}val"))
            elif style_lvl is not None:
                ilvl = style_lvl
            else:
                ilvl = numbering.style_levels.get(sid or "", 0)
            if num_id == "0":  # numbering explicitly removed
                flush()
                out.add("paragraph", text)
                return
            if pending_kind != "list":
                flush()
                pending_kind = "list"
            for key in [k for k in counters if k[0] == num_id and k[1] > ilvl]:
                del counters[key]
            if numbering.is_bullet(num_id, ilvl):
                marker = "-"
            else:
                counters[(num_id, ilvl)] = counters.get((num_id, ilvl), 0) + 1
                marker = f"{counters[(num_id, ilvl)]}."
            # nesting: from the indentation (single-level styles such as "List Bullet 2" nest
            # only by indent), else from the list level
            indent = _docx_indent(ppr)
            if indent is None:
                indent = numbering.indent(num_id, ilvl)
            if indent is None:
                indent = 720 * (ilvl + 1)
            while indents and indents[-1] > indent:
                indents.pop()
            if not indents or indents[-1] < indent:
                indents.append(indent)
            depth = len(indents) - 1
            pending.append("  " * min(depth, 8) + marker + " " + text.replace("\n", " "))
            return
        flush()
        if text:
            out.add("paragraph", text)

    def table(tbl: ET.Element) -> None:
        flush()
        rows = []
        for tr in tbl.findall(f"{_W}tr"):
            cells = []
            for tc in tr.findall(f"{_W}tc"):
                cells.append(_WS.sub(" ", " ".join(_docx_runs_text(p) for p in tc.iter(f"{_W}p"))).strip())
            if any(cells):
                rows.append(" | ".join(cells))
        out.add("table", "\n".join(rows))

    def walk(container: ET.Element) -> None:
        for child in container:
            tag = child.tag
            if tag == f"{_W}p":
                paragraph(child)
            elif tag == f"{_W}tbl":
                table(child)
            elif tag in (f"{_W}sdt", f"{_W}customXml", f"{_W}smartTag"):
                content = child.find(f"{_W}sdtContent") if tag == f"{_W}sdt" else child
                if content is not None:
                    walk(content)

    walk(body)
    flush()
    title = core_title or (style_title[0] if style_title else None)
    return out.document(title, APPLICATION_DOCX)
