"""Document parsing: every file type, every bad input (with its exact error), true spans."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from loadbear.knowledge.parse import (
    APPLICATION_DOCX,
    SUPPORTED_EXTENSIONS,
    decode_text,
    parse_file,
    parse_text,
)
from loadbear.knowledge.types import KnowledgeError, ParsedDocument

DOCS = Path(__file__).parent / "data" / "docs"
SUPPORTED = ".txt, .md, .markdown, .html, .htm, .pdf, .docx"

GOOD_FILES = [
    "guide.md",
    "handbook.html",
    "notes.txt",
    "report.pdf",
    "owner_locked.pdf",
    "policy.docx",
    "utf16.txt",
    "bom.md",
]


def load(name: str, **kwargs) -> ParsedDocument:
    return parse_file(name, (DOCS / name).read_bytes(), **kwargs)


def assert_spans(doc: ParsedDocument) -> None:
    """Every block is a true, non-empty span; blocks are ordered and do not overlap."""
    assert doc.blocks
    prev_end = 0
    for block in doc.blocks:
        assert 0 <= block.start < block.end <= len(doc.text)
        assert doc.text[block.start : block.end] == block.text
        assert block.start >= prev_end
        prev_end = block.end
        assert block.text.strip()
        assert block.text == block.text.rstrip()
        if block.kind != "code":
            assert block.text == block.text.strip()
        assert block.kind in {"heading", "paragraph", "list", "code", "table"}
        if block.kind == "heading":
            assert 1 <= block.level <= 6
            assert block.heading_path and block.heading_path[-1]
        else:
            assert block.level == 0


def headings(doc: ParsedDocument) -> list[tuple[int, str, list[str]]]:
    return [(b.level, b.text, b.heading_path) for b in doc.blocks if b.kind == "heading"]


def kinds(doc: ParsedDocument) -> list[str]:
    return [b.kind for b in doc.blocks]


def raises(code: str, status: int, fn, *args, **kwargs) -> KnowledgeError:
    with pytest.raises(KnowledgeError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert (err.code, err.status) == (code, status), err.message
    return err


# --- every fixture ------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOOD_FILES)
def test_every_fixture_has_true_spans_and_heading_paths(name: str) -> None:
    doc = load(name)
    assert_spans(doc)
    # a block's path is the path of the last heading before it (or empty before any)
    current: list[str] = []
    for block in doc.blocks:
        if block.kind == "heading":
            current = block.heading_path
        else:
            assert block.heading_path == current


def test_supported_extensions() -> None:
    assert ", ".join(SUPPORTED_EXTENSIONS) == SUPPORTED


# --- Markdown ---------------------------------------------------------------------------


def test_markdown_fixture() -> None:
    doc = load("guide.md")
    assert doc.content_type == "text/markdown"
    assert doc.title == "Loadbear Operator Guide"
    assert doc.text == (DOCS / "guide.md").read_text()  # Markdown keeps its source text
    top = "Loadbear Operator Guide"
    assert headings(doc) == [
        (1, top, [top]),
        (2, "Installation", [top, "Installation"]),
        (3, "From PyPI", [top, "Installation", "From PyPI"]),
        (3, "From the container image", [top, "Installation", "From the container image"]),
        (2, "Configuration", [top, "Configuration"]),
        (3, "Settings", [top, "Configuration", "Settings"]),
        (3, "Tenants", [top, "Configuration", "Tenants"]),
        (2, "Costs and budgets", [top, "Costs and budgets"]),
        (2, "Troubleshooting", [top, "Troubleshooting"]),
    ]
    assert kinds(doc).count("code") == 2
    assert kinds(doc).count("list") == 2
    assert kinds(doc).count("table") == 1

    code = [b for b in doc.blocks if b.kind == "code"]
    assert code[0].text.startswith("```bash\n") and code[0].text.endswith("\n```")
    assert "\n\n# check the installation\n" in code[0].text  # a blank line and a '#' line stay inside
    assert code[0].heading_path == [top, "Installation", "From PyPI"]

    settings = next(b for b in doc.blocks if b.kind == "list")
    assert settings.text.startswith("- `listen`")
    assert "\n  - `openai`: needs an API key.\n" in settings.text  # nested items stay in the list
    assert settings.text.endswith("- `budgets`: monthly limits per tenant, in US dollars.")

    steps = [b for b in doc.blocks if b.kind == "list"][1]
    assert steps.text.splitlines() == [
        "1. Set a monthly budget for each tenant.",
        "2. Choose what happens at the limit: reject new requests, or only warn.",
        "3. Watch the daily report, which lists the ten most expensive tenants.",
    ]
    table = next(b for b in doc.blocks if b.kind == "table")
    assert table.text.splitlines()[0] == "| Setting | Default | Reloadable |"
    assert len(table.text.splitlines()) == 5


def test_markdown_headings_atx_setext_and_paths() -> None:
    doc = parse_text(
        "Title\n=====\n\nintro\n\n## A ##\n\ntext a\n\nSub of A\n--------\n\n### [Deep](http://x) *one*\n\n"
        "deep text\n\n# Second\n\nlast\n\n#not-a-heading\n\n####### seven hashes\n",
        "text/markdown",
    )
    assert_spans(doc)
    assert doc.title == "Title"
    assert headings(doc) == [
        (1, "Title", ["Title"]),
        (2, "A", ["Title", "A"]),
        (2, "Sub of A", ["Title", "Sub of A"]),
        (3, "[Deep](http://x) *one*", ["Title", "Sub of A", "Deep *one*"]),
        (1, "Second", ["Second"]),
    ]
    paras = [b for b in doc.blocks if b.kind == "paragraph"]
    assert [(p.text, p.heading_path) for p in paras] == [
        ("intro", ["Title"]),
        ("text a", ["Title", "A"]),
        ("deep text", ["Title", "Sub of A", "Deep *one*"]),
        ("last", ["Second"]),
        ("#not-a-heading", ["Second"]),
        ("####### seven hashes", ["Second"]),
    ]


def test_markdown_fenced_code_is_one_block() -> None:
    src = (
        "Before.\n\n~~~\n# not a heading\n\n- not a list\n\n| not | a table |\n|---|---|\n~~~\n\nAfter.\n\n"
        "````md\n```\ninner fence\n```\n````\n\n```\nunclosed\n\nfence runs to the end"
    )
    doc = parse_text(src, "text/markdown")
    assert_spans(doc)
    assert kinds(doc) == ["paragraph", "code", "paragraph", "code", "code"]
    assert doc.blocks[1].text == "~~~\n# not a heading\n\n- not a list\n\n| not | a table |\n|---|---|\n~~~"
    assert doc.blocks[3].text == "````md\n```\ninner fence\n```\n````"
    assert doc.blocks[4].text == "```\nunclosed\n\nfence runs to the end"
    assert headings(doc) == []


def test_markdown_lists_stay_together() -> None:
    src = (
        "Intro line\n- item one\n- item two\n\n- item three (loose)\n\n    continued paragraph of item three\n"
        "* star item\n\nParagraph after the list.\n\n1. one\n2. two\n   ```\n   code in item\n\n   more code\n   ```\n"
        "3. three\n\n---\n\nEnd."
    )
    doc = parse_text(src, "text/markdown")
    assert_spans(doc)
    assert kinds(doc) == ["paragraph", "list", "paragraph", "list", "paragraph"]
    assert doc.blocks[0].text == "Intro line"
    assert doc.blocks[1].text.startswith("- item one") and doc.blocks[1].text.endswith("* star item")
    assert "continued paragraph of item three" in doc.blocks[1].text
    assert doc.blocks[3].text.startswith("1. one") and doc.blocks[3].text.endswith("3. three")
    assert "more code" in doc.blocks[3].text
    assert doc.blocks[4].text == "End."  # the thematic break is not a block


def test_markdown_tables_indented_code_quotes_front_matter() -> None:
    src = (
        "---\ntitle: ignored\ntags: [a]\n---\n\nText before\n| a | b |\n| :-- | --: |\n| 1 | 2 |\n\n"
        "    indented = code\n\n    still code\n\n> quoted\n> text\n\nplain | pipe but no table\n"
    )
    doc = parse_text(src, "text/markdown")
    assert_spans(doc)
    assert kinds(doc) == ["paragraph", "table", "code", "paragraph", "paragraph"]
    assert doc.blocks[0].text == "Text before"
    assert doc.blocks[1].text == "| a | b |\n| :-- | --: |\n| 1 | 2 |"
    assert doc.blocks[2].text == "    indented = code\n\n    still code"
    assert doc.blocks[3].text == "> quoted\n> text"
    assert "title: ignored" not in " ".join(b.text for b in doc.blocks)


def test_markdown_crlf_and_bom() -> None:
    doc = load("bom.md")
    assert_spans(doc)
    assert doc.text == "# Notes\n\nFirst paragraph\nwith two lines.\n\n## Next\n\n- a\n- b\n"
    assert doc.title == "Notes"
    assert headings(doc) == [(1, "Notes", ["Notes"]), (2, "Next", ["Notes", "Next"])]
    assert kinds(doc) == ["heading", "paragraph", "heading", "list"]


# --- HTML -------------------------------------------------------------------------------


def test_html_fixture() -> None:
    doc = load("handbook.html")
    assert doc.content_type == "text/html"
    assert doc.title == "Support Handbook \u2014 Acme Cloud"
    for dropped in ("analytics", "font-family", "Home", "Pricing", "Enable JavaScript", "not content"):
        assert dropped not in doc.text
    assert headings(doc) == [
        (1, "Support Handbook", ["Support Handbook"]),
        (2, "Accounts", ["Support Handbook", "Accounts"]),
        (3, "Closing an account", ["Support Handbook", "Accounts", "Closing an account"]),
        (2, "Billing & invoices", ["Support Handbook", "Billing & invoices"]),
        (2, "Outages", ["Support Handbook", "Outages"]),
    ]
    by_kind = {k: [b.text for b in doc.blocks if b.kind == k] for k in ("paragraph", "list", "table", "code")}
    assert by_kind["paragraph"][0] == (
        "This handbook tells the support team how to answer the questions customers ask most often. "
        "It covers accounts, billing & invoices, and outages."
    )
    assert (
        "An account can only be closed by its owner.\n"
        "Closing it deletes every project after a grace period of thirty days." in by_kind["paragraph"]
    )
    assert by_kind["list"] == [
        "- Confirm the owner\u2019s identity.\n"
        "- Export their data if they ask for it.\n"
        "  - Projects are exported as ZIP archives.\n"
        "  - Invoices stay available for seven years.\n"
        "- Close the account from the admin console.",
        "1. Open the customer in the billing console.\n2. Choose Issue refund and enter the amount.",
    ]
    assert by_kind["table"] == [
        "Plan | Price per month | Support\nStarter | \u20ac19 | E-mail\n"
        "Team | \u20ac99 | E-mail and chat\nEnterprise | on request | 24/7 phone"
    ]
    assert by_kind["code"] == [
        "curl -s https://status.example.com/api/v2/incidents.json \\\n  | jq '.incidents[0].status'"
    ]
    # blocks are separated by a blank line in the rendered text
    assert doc.text.startswith("Support Handbook\n\nThis handbook")


def test_html_loose_markup() -> None:
    html = (
        "<h2>No <i>title</i> tag</h2><p>first<p>second &lt;b&gt; &#x27;x&#x27;<ul><li>a<li>b<ol start=3><li>c</ol></ul>"
        "<div>tail <script>ignored()</script>text</div><pre>  keep\n    indentation  </pre>"
        "<table><tr><td>1<td>2<tr><td>3<td><b>4</b></table><li>stray item<h1>Top</h1>after"
    )
    doc = parse_text(html, "text/html")
    assert_spans(doc)
    assert doc.title == "Top"  # no <title>: the first <h1>
    assert [b.text for b in doc.blocks] == [
        "No title tag",
        "first",
        "second <b> 'x'",
        "- a\n- b\n  3. c",
        "tail text",
        "  keep\n    indentation",
        "1 | 2\n3 | 4",
        "stray item",
        "Top",
        "after",
    ]
    assert kinds(doc) == [
        "heading", "paragraph", "paragraph", "list", "paragraph", "code", "table", "paragraph", "heading", "paragraph"
    ]


def test_html_title_falls_back_to_first_h1() -> None:
    doc = parse_text("<h2>Intro</h2><p>x</p><h1>Main</h1><p>y</p>", "text/html")
    assert doc.title == "Main"
    assert headings(doc) == [(2, "Intro", ["Intro"]), (1, "Main", ["Main"])]


def test_html_meta_charset_is_used_for_non_utf8_bytes() -> None:
    data = '<html><head><meta charset="iso-8859-1"></head><body><p>Caf\u00e9</p></body></html>'.encode("latin-1")
    doc = parse_file("page.html", data)
    assert doc.blocks[0].text == "Caf\u00e9"
    # a page that is valid UTF-8 despite a wrong declaration stays UTF-8
    data = '<meta charset="iso-8859-1"><p>Caf\u00e9</p>'.encode("utf-8")
    assert parse_file("page.htm", data).blocks[0].text == "Caf\u00e9"


# --- plain text -------------------------------------------------------------------------


def test_text_fixture() -> None:
    doc = load("notes.txt")
    assert doc.content_type == "text/plain"
    assert doc.title is None
    assert kinds(doc) == ["paragraph", "paragraph", "paragraph", "list", "paragraph", "paragraph"]
    assert doc.blocks[2].text == "Changes that need attention:"
    assert doc.blocks[3].text.count("\n- ") == 2
    assert all(b.heading_path == [] for b in doc.blocks)


def test_utf16_with_bom() -> None:
    doc = load("utf16.txt")
    assert [b.text for b in doc.blocks] == ["Gr\u00fc\u00dfe aus K\u00f6ln", "Dieser Text ist UTF-16 mit BOM kodiert."]


def test_declared_charset_decodes_latin1() -> None:
    doc = load("latin1.txt", content_type="text/plain; charset=ISO-8859-1")
    assert doc.blocks[0].text == "Caf\u00e9 opening hours"


def test_parse_text_types_and_normalisation() -> None:
    doc = parse_text("\ufeffone\r\ntwo\rthree\x00\n\n  second para  ")
    assert doc.text == "one\ntwo\nthree\n\n  second para  "
    assert [b.text for b in doc.blocks] == ["one\ntwo\nthree", "second para"]
    assert parse_text("# H", "text/markdown; charset=utf-8").title == "H"


# --- PDF --------------------------------------------------------------------------------


def test_pdf_fixture() -> None:
    doc = load("report.pdf")
    assert doc.content_type == "application/pdf"
    assert doc.title == "Quarterly Reliability Report"  # from the metadata
    top = "Quarterly Reliability Report"
    assert headings(doc) == [
        (1, top, [top]),
        (2, "Availability", [top, "Availability"]),
        (2, "Latency", [top, "Latency"]),
        (2, "Next steps", [top, "Next steps"]),
    ]
    paras = [b for b in doc.blocks if b.kind == "paragraph"]
    assert len(paras) == 5  # paragraphs from the vertical gaps, across two pages
    assert paras[0].text == (
        "This report summarises how the gateway behaved in the first quarter. It covers availability,\n"
        "latency and the incidents that affected customers."
    )
    assert paras[2].text == "Retries recovered two thirds of the failed requests without the caller noticing."
    assert paras[3].heading_path == [top, "Latency"]  # the second page


def test_pdf_with_owner_password_only_opens() -> None:
    doc = load("owner_locked.pdf")
    assert doc.title == "Locked for editing"
    assert [b.text for b in doc.blocks] == [
        "Editing restricted",
        "Anyone can read this document, but only its owner may change it.",
    ]


# --- DOCX -------------------------------------------------------------------------------


def test_docx_fixture() -> None:
    doc = load("policy.docx")
    assert doc.content_type == APPLICATION_DOCX
    assert doc.title == "Travel Expense Policy"
    assert headings(doc) == [
        (1, "Travel Expense Policy", ["Travel Expense Policy"]),
        (1, "Booking travel", ["Booking travel"]),
        (2, "Hotels", ["Booking travel", "Hotels"]),
        (1, "Claiming expenses", ["Claiming expenses"]),
    ]
    blocks = {b.kind: [] for b in doc.blocks}
    for b in doc.blocks:
        blocks[b.kind].append(b)
    assert [b.text for b in blocks["list"]] == [
        "- Economy class for flights under six hours.\n- Business class for longer flights.\n"
        "  - Only with a manager's approval.\n- Second-class rail tickets.",
        "1. Submit the claim within thirty days.\n2. Attach every receipt as a PDF or a photo.\n"
        "3. Wait for your manager to approve it.",
    ]
    assert blocks["list"][0].heading_path == ["Booking travel"]
    assert [b.text for b in blocks["table"]] == ["City | Nightly limit\nLondon | GBP 180\nBerlin | EUR 140"]
    assert blocks["table"][0].heading_path == ["Booking travel", "Hotels"]
    assert [b.text for b in blocks["code"]] == ["expenses submit --trip 2024-05-berlin \\\n    --receipts ./receipts/*.pdf"]
    assert "Hotels must be within the city's nightly limit.\nThe limits are listed below." in [
        b.text for b in blocks["paragraph"]
    ]


def _docx(document_xml: str, extra: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("word/document.xml", document_xml)
        for name, content in (extra or {}).items():
            zf.writestr(name, content)
    return buf.getvalue()


W = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'


def test_docx_minimal_heading_styles_without_styles_part() -> None:
    xml = (
        f'<w:document {W}><w:body>'
        '<w:p><w:pPr><w:pStyle w:val="Heading1"/></w:pPr><w:r><w:t>Intro</w:t></w:r></w:p>'
        '<w:p><w:r><w:t xml:space="preserve">Hello </w:t></w:r><w:hyperlink><w:r><w:t>world</w:t></w:r></w:hyperlink></w:p>'
        '<w:p><w:pPr><w:outlineLvl w:val="1"/></w:pPr><w:r><w:t>By outline</w:t></w:r></w:p>'
        '<w:p><w:pPr><w:numPr><w:ilvl w:val="0"/><w:numId w:val="7"/></w:numPr></w:pPr><w:r><w:t>x</w:t></w:r></w:p>'
        '<w:p><w:pPr><w:numPr><w:ilvl w:val="1"/><w:numId w:val="7"/></w:numPr></w:pPr><w:r><w:t>y</w:t></w:r></w:p>'
        '<w:p><w:r><w:delText>deleted</w:delText><w:t>kept</w:t></w:r></w:p>'
        "<w:sectPr/></w:body></w:document>"
    )
    doc = parse_file("mini.docx", _docx(xml))
    assert_spans(doc)
    assert doc.title == "Intro"  # no core properties and no Title style: the first level-1 heading
    assert [(b.kind, b.text) for b in doc.blocks] == [
        ("heading", "Intro"),
        ("paragraph", "Hello world"),
        ("heading", "By outline"),
        ("list", "- x\n  - y"),
        ("paragraph", "kept"),
    ]
    assert headings(doc) == [(1, "Intro", ["Intro"]), (2, "By outline", ["Intro", "By outline"])]


# --- bad inputs: exact errors -------------------------------------------------------------


def test_empty_file() -> None:
    err = raises("empty_file", 422, load, "empty.txt")
    assert err.message == "the file 'empty.txt' is empty"
    assert err.param == "file"


def test_whitespace_only_file() -> None:
    err = raises("empty_file", 422, load, "blank.md")
    assert err.message == "the file 'blank.md' contains only whitespace"


def test_file_without_content_blocks() -> None:
    err = raises("empty_file", 422, parse_file, "x.html", b"<script>only()</script><style>p{}</style>")
    assert err.message == "the file 'x.html' has no text content"


def test_unsupported_type() -> None:
    err = raises("unsupported_type", 415, load, "program.exe")
    assert err.message == f"unsupported extension '.exe'; supported: {SUPPORTED}"
    err = raises("unsupported_type", 415, parse_file, "README", b"hello")
    assert err.message == f"unsupported file 'README' (no extension); supported: {SUPPORTED}"
    err = raises("unsupported_type", 415, parse_file, "blob", b"hello", "application/octet-stream")
    assert err.message == (
        f"unsupported file 'blob' (no extension, content type 'application/octet-stream'); supported: {SUPPORTED}"
    )
    # an unsupported extension wins over a supported content type
    raises("unsupported_type", 415, parse_file, "legacy.doc", b"hello", "text/plain")


def test_content_type_is_a_hint_without_extension() -> None:
    doc = parse_file("upload", b"# Hi\n\ntext", "text/markdown")
    assert doc.content_type == "text/markdown" and doc.title == "Hi"
    assert parse_file("NOTES.TXT", b"upper-case extension").content_type == "text/plain"
    assert parse_file("guide.markdown", b"# T").title == "T"


def test_oversized_upload() -> None:
    data = (DOCS / "guide.md").read_bytes()
    err = raises("file_too_large", 413, parse_file, "guide.md", data, max_bytes=1000)
    assert err.message == f"the file is {len(data)} bytes; the limit is 1000 bytes"
    assert parse_file("guide.md", data, max_bytes=len(data)).blocks  # exactly at the limit is fine
    # size is checked before anything else
    raises("file_too_large", 413, parse_file, "program.exe", (DOCS / "program.exe").read_bytes(), max_bytes=10)


def test_bad_encoding_names_the_byte_offset() -> None:
    err = raises("bad_encoding", 422, load, "latin1.txt")
    assert err.message == (
        "the file is not valid UTF-8: cannot decode 0xE9 at byte offset 3 (line 1, column 4); "
        "save it as UTF-8 (or UTF-16 with a byte-order mark)"
    )
    err = raises("bad_encoding", 422, parse_file, "a.md", b"ok line\nsecond \xff\xfe line")
    assert err.message.startswith("the file is not valid UTF-8: cannot decode 0xFF at byte offset 15 (line 2, column 8)")


def test_nul_bytes_are_rejected() -> None:
    data = "plain ascii".encode("utf-16-le")  # UTF-16 without a byte-order mark
    err = raises("bad_encoding", 422, parse_file, "u16.txt", data)
    assert err.message == (
        "the file contains a NUL character at byte offset 1: it looks like binary data "
        "or UTF-16 without a byte-order mark"
    )


def test_bad_bytes_after_a_bom_and_unknown_charset() -> None:
    err = raises("bad_encoding", 422, parse_file, "b.txt", b"\xef\xbb\xbfgood \xc3(")
    assert err.message.startswith("the file is not valid UTF-8 (byte-order mark): cannot decode 0xC3 at byte offset 8")
    err = raises("bad_encoding", 422, parse_file, "c.txt", b"caf\xe9", "text/plain; charset=klingon")
    assert err.message == "unknown charset 'klingon'"
    assert decode_text(b"caf\xe9", "windows-1252") == "caf\u00e9"


def test_corrupt_pdf() -> None:
    err = raises("corrupt_file", 422, load, "corrupt.pdf")
    assert err.message.startswith("the PDF cannot be read: ")
    err = raises("corrupt_file", 422, parse_file, "fake.pdf", b"just some text pretending to be a PDF")
    assert err.message == "the file is not a PDF (no %PDF- header)"
    truncated = (DOCS / "report.pdf").read_bytes()[:700]
    err = raises("corrupt_file", 422, parse_file, "cut.pdf", truncated)
    assert err.message.startswith("the PDF cannot be read: ")


def test_encrypted_pdf() -> None:
    err = raises("encrypted_file", 422, load, "encrypted.pdf")
    assert err.message == "the PDF is password-protected; upload an unencrypted copy"


def test_image_only_pdf() -> None:
    err = raises("no_extractable_text", 422, load, "image_only.pdf")
    assert err.message == (
        "the PDF has 1 page(s) but no extractable text (scanned or image-only?); OCR is not supported"
    )


def test_corrupt_docx() -> None:
    err = raises("corrupt_file", 422, load, "corrupt.docx")
    assert err.message == "the DOCX cannot be read: not a valid zip archive (File is not a zip file)"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("content.xml", "<x/>")
    err = raises("corrupt_file", 422, parse_file, "odt-renamed.docx", buf.getvalue())
    assert err.message == "the DOCX has no word/document.xml (not a Word document?)"
    err = raises("corrupt_file", 422, parse_file, "bad.docx", _docx("<w:document><unclosed>"))
    assert err.message.startswith("the DOCX's word/document.xml is not well-formed XML: ")
    bomb = f'<!DOCTYPE d [<!ENTITY a "aaaa">]><w:document {W}><w:body/></w:document>'
    err = raises("corrupt_file", 422, parse_file, "dtd.docx", _docx(bomb))
    assert err.message == "the DOCX's word/document.xml declares a DTD, which Word documents never do"
    err = raises("empty_file", 422, parse_file, "blank.docx", _docx(f"<w:document {W}><w:body/></w:document>"))
    assert err.message == "the file 'blank.docx' has no text content"


def test_parse_text_errors() -> None:
    err = raises("empty_document", 422, parse_text, "  \n\t ")
    assert (err.message, err.param) == ("the document text is empty", "text")
    err = raises("unsupported_type", 415, parse_text, "x", "application/pdf")
    assert err.message == "unsupported content type 'application/pdf' for text; use text/plain, text/markdown or text/html"
    assert err.param == "content_type"
    err = raises("empty_document", 422, parse_text, "<nav>menu</nav>", "text/html")
    assert err.message == "the document has no text content"
