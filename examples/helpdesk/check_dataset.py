"""Check the helpdesk evaluation set against its documents.

    .venv/bin/python examples/helpdesk/check_dataset.py [eval.yaml] [--docs DIR]

Verifies that:

* the file is ``{name, version, cases: [...]}`` (YAML) or one case per line (JSONL);
* every case has a unique slug ``id``, a ``query``, ``expected`` (text or a list of facts),
  ``expected_sources`` (a list of ``{doc, quote}``), ``feature`` and ``tags``;
* every ``doc`` exists under ``docs/`` (its path relative to ``docs/`` is its external id);
* every ``quote`` appears verbatim in its document's text, compared with whitespace collapsed:
  for Markdown/text the raw file, for HTML the file minus its tags (entities decoded), for PDF
  the text layer read with pypdf (skipped, with a message, when pypdf is not installed);
* when the ``loadbear`` package is importable, each quote also appears in the text that
  ``loadbear.knowledge.parse.parse_file`` produces, i.e. what ingestion actually stores;
* ``paraphrase_of`` names another case; no-answer cases (tag ``no-answer``) have empty
  ``expected`` and ``expected_sources`` and ``expect_refusal: true``, and vice versa.

It also warns about documents outside 250-900 words and lists documents no case cites.
Exit status 1 when there is any error.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
WS = re.compile(r"\s+")
DOC_SUFFIXES = (".md", ".markdown", ".txt", ".html", ".htm", ".pdf", ".docx")
INLINE_TAGS = {"a", "abbr", "b", "bdi", "cite", "code", "data", "em", "i", "kbd", "mark", "q", "s",
               "samp", "small", "span", "strong", "sub", "sup", "time", "u", "var"}
TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]*)\b[^>]*>")


def norm(text: str) -> str:
    return WS.sub(" ", text).strip()


def strip_html(raw: str) -> str:
    raw = re.sub(r"<!--.*?-->", " ", raw, flags=re.S)
    raw = re.sub(r"<(script|style)\b.*?</\1\s*>", " ", raw, flags=re.S | re.I)
    raw = re.sub(r"<!DOCTYPE[^>]*>", " ", raw, flags=re.I)
    # inline elements join their text to the surrounding words; block elements separate it
    raw = TAG.sub(lambda m: "" if m.group(2).lower() in INLINE_TAGS else " ", raw)
    return html.unescape(raw)


class Texts:
    """Document text, per path, computed once."""

    def __init__(self, docs: Path) -> None:
        self.docs = docs
        self.raw: dict[str, str | None] = {}
        self.parsed: dict[str, str | None] = {}
        self.notes: list[str] = []
        try:
            from pypdf import PdfReader  # noqa: F401
            self.have_pypdf = True
        except ImportError:
            self.have_pypdf = False
            self.notes.append("pypdf is not installed: quotes in PDF documents were not checked")
        try:
            from loadbear.knowledge.parse import parse_file  # noqa: F401
            self.have_loadbear = True
        except ImportError:
            self.have_loadbear = False
            self.notes.append("loadbear is not importable: quotes were not checked against the ingestion parser")

    def source_text(self, rel: str) -> str | None:
        """The text the brief defines; None when it cannot be read (PDF without pypdf)."""
        if rel not in self.raw:
            path = self.docs / rel
            suffix = path.suffix.lower()
            if suffix == ".pdf":
                if self.have_pypdf:
                    from pypdf import PdfReader
                    reader = PdfReader(str(path))
                    self.raw[rel] = norm("\n".join(page.extract_text() or "" for page in reader.pages))
                else:
                    self.raw[rel] = None
            elif suffix in (".html", ".htm"):
                self.raw[rel] = norm(strip_html(path.read_text(encoding="utf-8")))
            elif suffix == ".docx":
                self.raw[rel] = None
            else:
                self.raw[rel] = norm(strip_html(path.read_text(encoding="utf-8")))
        return self.raw[rel]

    def ingested_text(self, rel: str) -> str | None:
        if not self.have_loadbear:
            return None
        if rel not in self.parsed:
            from loadbear.knowledge.parse import parse_file
            path = self.docs / rel
            self.parsed[rel] = norm(parse_file(path.name, path.read_bytes()).text)
        return self.parsed[rel]


def load_cases(path: Path) -> tuple[dict, list[dict]]:
    if path.suffix.lower() == ".jsonl":
        cases = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {"name": path.stem, "version": None}, cases
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise SystemExit(f"{path}: expected a mapping with a 'cases' list")
    return data, data["cases"]


def word_count(texts: Texts, rel: str) -> int | None:
    text = texts.source_text(rel)
    return len(text.split()) if text is not None else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", nargs="?", default=str(HERE / "eval.yaml"))
    ap.add_argument("--docs", default=None, help="documents folder (default: docs/ next to the dataset)")
    args = ap.parse_args(argv)

    dataset = Path(args.dataset)
    docs = Path(args.docs) if args.docs else dataset.resolve().parent / "docs"
    meta, cases = load_cases(dataset)
    texts = Texts(docs)
    errors: list[str] = []
    warnings: list[str] = []

    if dataset.suffix.lower() != ".jsonl":
        for key in ("name", "version"):
            if key not in meta:
                errors.append(f"top level: missing '{key}'")

    all_docs = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*")
                      if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
    for rel in all_docs:
        if rel != rel.lower() or " " in rel:
            errors.append(f"document {rel}: external ids must be lowercase without spaces")
        words = word_count(texts, rel)
        if words is not None and not 250 <= words <= 900:
            warnings.append(f"document {rel}: {words} words (outside 250-900)")

    ids: Counter[str] = Counter(str(c.get("id")) for c in cases if isinstance(c, dict))
    for dup in sorted(i for i, n in ids.items() if n > 1):
        errors.append(f"duplicate id {dup!r} ({ids[dup]} cases)")

    cited: Counter[str] = Counter()
    tags: Counter[str] = Counter()
    quotes_checked = quotes_ingested = quotes_skipped = 0
    for n, case in enumerate(cases, 1):
        if not isinstance(case, dict):
            errors.append(f"case #{n}: not a mapping")
            continue
        cid = case.get("id")
        where = f"case {cid!r}" if cid else f"case #{n}"
        if not isinstance(cid, str) or not SLUG.match(cid):
            errors.append(f"{where}: id must be a lowercase slug")
        for key in ("query", "feature"):
            if not isinstance(case.get(key), str) or not case[key].strip():
                errors.append(f"{where}: '{key}' must be a non-empty string")
        expected = case.get("expected")
        if not (isinstance(expected, str) or (isinstance(expected, list)
                                              and all(isinstance(f, str) and f.strip() for f in expected))):
            errors.append(f"{where}: 'expected' must be a text or a list of non-empty strings")
        case_tags = case.get("tags")
        if not isinstance(case_tags, list) or not all(isinstance(t, str) for t in case_tags):
            errors.append(f"{where}: 'tags' must be a list of strings")
            case_tags = []
        tags.update(case_tags)
        sources = case.get("expected_sources")
        if not isinstance(sources, list):
            errors.append(f"{where}: 'expected_sources' must be a list")
            sources = []

        no_answer = "no-answer" in case_tags
        if no_answer:
            if expected or sources:
                errors.append(f"{where}: a no-answer case must have empty 'expected' and 'expected_sources'")
            if case.get("expect_refusal") is not True:
                errors.append(f"{where}: a no-answer case needs 'expect_refusal: true'")
        else:
            if case.get("expect_refusal"):
                errors.append(f"{where}: 'expect_refusal' is set but the case is not tagged no-answer")
            if not expected or not sources:
                errors.append(f"{where}: needs expected facts and expected sources (or the no-answer tag)")
        if "multi-doc" in case_tags and len({s.get("doc") for s in sources if isinstance(s, dict)}) < 2:
            errors.append(f"{where}: tagged multi-doc but cites fewer than 2 documents")
        if "paraphrase" in case_tags or "paraphrase_of" in case:
            target = case.get("paraphrase_of")
            if "paraphrase" not in case_tags:
                errors.append(f"{where}: has paraphrase_of but no 'paraphrase' tag")
            if target not in ids or target == cid:
                errors.append(f"{where}: paraphrase_of {target!r} does not name another case")

        for s in sources:
            if not isinstance(s, dict) or not isinstance(s.get("doc"), str):
                errors.append(f"{where}: each expected source needs a 'doc'")
                continue
            rel = s["doc"]
            if not (docs / rel).is_file():
                errors.append(f"{where}: document {rel!r} does not exist under {docs}")
                continue
            cited[rel] += 1
            quote = s.get("quote")
            if quote is None:
                continue
            if not isinstance(quote, str) or not quote.strip():
                errors.append(f"{where}: quote for {rel} must be a non-empty string")
                continue
            q = norm(quote)
            text = texts.source_text(rel)
            if text is None:
                quotes_skipped += 1
            else:
                quotes_checked += 1
                if q not in text:
                    errors.append(f"{where}: quote not found in {rel}: {quote!r}")
            parsed = texts.ingested_text(rel)
            if parsed is not None:
                quotes_ingested += 1
                if q not in parsed:
                    errors.append(f"{where}: quote not found in the ingested (parsed) text of {rel}: {quote!r}")

    uncited = [d for d in all_docs if d not in cited]
    print(f"dataset: {dataset} (name={meta.get('name')!r}, version={meta.get('version')!r})")
    print(f"documents: {len(all_docs)} in {docs}; cited by cases: {len(cited)}; never cited: {len(uncited)}")
    for d in uncited:
        print(f"  not cited: {d}")
    print(f"cases: {len(cases)}; unique ids: {len(ids)}")
    print("tags: " + ", ".join(f"{t}={n}" for t, n in sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))))
    print(f"quotes: {quotes_checked} found verbatim in source text, {quotes_skipped} skipped, "
          f"{quotes_ingested} also checked against the loadbear parser")
    for note in texts.notes:
        print(f"note: {note}")
    for w in warnings:
        print(f"warning: {w}")
    for e in errors:
        print(f"ERROR: {e}")
    print("OK" if not errors else f"FAILED: {len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
