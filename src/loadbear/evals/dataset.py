"""Evaluation datasets: YAML (``{name, version, cases: [...]}`` or a bare list) or JSONL (one case a line).

A case::

    id: refund-window-monthly                # unique, no spaces
    query: How long do I have to ask for a refund?
    expected: ["14 days", "first payment"]   # short facts (or one text) a good answer contains
    expected_sources:                         # document external ids, optionally with a quote
      - doc: billing/refunds.md
        quote: "refunded in full within 14 days of the first payment"
      - billing/cancelling.md                 # a bare id: any chunk of that document
    feature: helpdesk                         # ledger feature of the eval calls (default "eval")
    tags: [billing]
    expect_refusal: false                     # true: not in the docs, the right reply says so
    paraphrase_of: other-case-id              # optional
    needs_label: false                        # set by `loadbear eval harvest`; true is an error
    reference: "New monthly subscriptions ..." # optional reference answer (semantic similarity)

Every problem is reported with its file, line and field, all at once (:class:`DatasetError`).
Unknown fields are warnings, unless they look like a misspelt known field (then an error).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Case", "Dataset", "DatasetError", "ExpectedSource", "Issue", "load_dataset", "parse_dataset"]

DEFAULT_FEATURE = "eval"
CASE_FIELDS = ("id", "query", "expected", "expected_sources", "feature", "tags", "expect_refusal",
               "paraphrase_of", "reference", "metadata",
               # written by `loadbear eval harvest`: where the case came from, and whether it is labelled
               "source", "needs_label")
TOP_FIELDS = ("name", "version", "description", "cases")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$")
MAX_QUERY = 4000
FEATURE_MAX = 100


@dataclass(frozen=True)
class ExpectedSource:
    doc: str
    quote: str | None = None


@dataclass
class Case:
    id: str
    query: str
    facts: list[str] = field(default_factory=list)
    expected_sources: list[ExpectedSource] = field(default_factory=list)
    feature: str = DEFAULT_FEATURE
    tags: list[str] = field(default_factory=list)
    expect_refusal: bool = False
    paraphrase_of: str | None = None
    # The reference answer: ``expected`` when it was given as a text, else ``reference``.
    reference: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    line: int | None = None


@dataclass
class Dataset:
    name: str
    version: Any
    path: str
    sha256: str
    cases: list[Case]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Issue:
    line: int | None
    case: str | None
    field: str | None
    message: str

    def format(self, path: str) -> str:
        where = f"{path}:{self.line}" if self.line else path
        parts = [where]
        if self.case:
            parts.append(f"case {self.case!r}")
        if self.field:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts) + f": {self.message}"


class DatasetError(ValueError):
    """The dataset is invalid; ``issues`` lists every problem with its line and field."""

    def __init__(self, path: str, issues: list[Issue]) -> None:
        self.path = path
        self.issues = issues
        lines = [i.format(path) for i in issues]
        super().__init__(f"{len(issues)} problem(s) in {path}:\n" + "\n".join(f"  {ln}" for ln in lines))


# -- reading ------------------------------------------------------------------------------


def load_dataset(path: str | Path) -> Dataset:
    """Read and validate a dataset file (``.jsonl``/``.ndjson`` one case a line, else YAML/JSON)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DatasetError(str(path), [Issue(None, None, None, f"cannot read the file: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(str(path), [Issue(None, None, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    return parse_dataset(text, str(path), jsonl=p.suffix.lower() in (".jsonl", ".ndjson"))


def parse_dataset(text: str, path: str = "<dataset>", *, jsonl: bool = False) -> Dataset:
    issues: list[Issue] = []
    warnings: list[str] = []
    if jsonl:
        meta: dict[str, Any] = {"name": Path(path).stem, "version": None}
        items = _jsonl_items(text, issues)
    else:
        meta, items = _yaml_items(text, path, issues, warnings)
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    cases: list[Case] = []
    seen: dict[str, int | None] = {}
    for n, (raw, line, key_lines) in enumerate(items, 1):
        case = _case(raw, n, line, key_lines, issues, warnings, path)
        if case is None:
            continue
        if case.id in seen:
            first = seen[case.id]
            issues.append(Issue(line, case.id, "id", "duplicate id" + (f" (first used on line {first})" if first else "")))
            continue
        seen[case.id] = line
        cases.append(case)
    for case in cases:
        if case.paraphrase_of is not None and (case.paraphrase_of not in seen or case.paraphrase_of == case.id):
            issues.append(Issue(case.line, case.id, "paraphrase_of",
                                f"{case.paraphrase_of!r} does not name another case of this dataset"))
    if not items and not issues:
        issues.append(Issue(None, None, "cases", "the dataset has no cases"))
    if issues:
        issues.sort(key=lambda i: (i.line or 0))
        raise DatasetError(path, issues)
    name = meta.get("name")
    return Dataset(name=str(name) if name is not None else Path(path).stem, version=meta.get("version"),
                   path=path, sha256=sha, cases=cases, warnings=warnings)


Item = tuple[Any, "int | None", dict[str, int]]


def _jsonl_items(text: str, issues: list[Issue]) -> list[Item]:
    items: list[Item] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            issues.append(Issue(n, None, None, f"not valid JSON: {exc.msg} (column {exc.colno})"))
            continue
        items.append((value, n, {}))
    return items


def _yaml_items(text: str, path: str, issues: list[Issue], warnings: list[str]) -> tuple[dict[str, Any], list[Item]]:
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        issues.append(Issue(mark.line + 1 if mark else None, None, None, f"YAML syntax error: {problem}"))
        return {}, []
    if data is None:
        issues.append(Issue(None, None, None, "the file is empty"))
        return {}, []
    meta: dict[str, Any] = {}
    seq_node = None
    if isinstance(data, dict):
        meta = data
        for key in data:
            if key not in TOP_FIELDS:
                warnings.append(f"{path}: unknown top-level field {key!r} (ignored)")
        cases = data.get("cases")
        key_node, seq_node = _entry(root, "cases")
        if not isinstance(cases, list):
            issues.append(Issue(key_node.start_mark.line + 1 if key_node is not None else 1, None, "cases",
                                "must be a list of cases (the file is {name, version, cases: [...]})"))
            return meta, []
    elif isinstance(data, list):
        cases = data
        seq_node = root
    else:
        issues.append(Issue(1, None, None, "expected a mapping with a 'cases' list, or a list of cases"))
        return {}, []
    nodes = list(seq_node.value) if seq_node is not None and isinstance(seq_node, yaml.SequenceNode) else []
    items: list[Item] = []
    for i, value in enumerate(cases):
        node = nodes[i] if i < len(nodes) else None
        line = node.start_mark.line + 1 if node is not None else None
        key_lines: dict[str, int] = {}
        if isinstance(node, yaml.MappingNode):
            for k, _v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    key_lines[str(k.value)] = k.start_mark.line + 1
        items.append((value, line, key_lines))
    return meta, items


def _entry(root: Any, key: str) -> tuple[Any, Any]:
    """The (key node, value node) of ``key`` in a YAML mapping node, or (None, None)."""
    import yaml

    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k, v
    return None, None


# -- validation ---------------------------------------------------------------------------


def _case(raw: Any, n: int, line: int | None, key_lines: dict[str, int], issues: list[Issue],
          warnings: list[str], path: str) -> Case | None:
    if not isinstance(raw, dict):
        issues.append(Issue(line, f"#{n}", None, f"a case must be a mapping, not {type(raw).__name__}"))
        return None
    cid = raw.get("id")
    label = cid if isinstance(cid, str) and cid else f"#{n}"
    before = len(issues)

    def bad(fld: str, message: str) -> None:
        top = re.split(r"[.\[]", fld, maxsplit=1)[0]  # expected_sources[0].doc -> expected_sources
        issues.append(Issue(key_lines.get(fld, key_lines.get(top, line)), label, fld, message))

    for key in raw:
        if key in CASE_FIELDS:
            continue
        close = difflib.get_close_matches(str(key), CASE_FIELDS, n=1, cutoff=0.8)
        if close:
            bad(str(key), f"unknown field; did you mean '{close[0]}'?")
        else:
            warnings.append(f"{path}:{key_lines.get(str(key), line) or '?'}: case {label!r}: "
                            f"unknown field {key!r} (ignored)")

    if cid is None:
        bad("id", "is required")
    elif not isinstance(cid, str) or not ID_RE.match(cid):
        bad("id", "must be a string of letters, digits and . _ : / - (no spaces, at most 200 characters)")

    query = raw.get("query")
    if query is None:
        bad("query", "is required")
    elif not isinstance(query, str) or not query.strip():
        bad("query", "must be a non-empty string")
    elif len(query) > MAX_QUERY:
        bad("query", f"is longer than {MAX_QUERY} characters")

    refusal = raw.get("expect_refusal", False)
    if not isinstance(refusal, bool):
        bad("expect_refusal", "must be true or false")
        refusal = False

    facts: list[str] = []
    reference = None
    expected = raw.get("expected")
    if expected is None or expected == [] or expected == "":
        if not refusal:
            bad("expected", "is required: the facts (or a text) a good answer contains; "
                            "for a question the documents do not answer, set 'expect_refusal: true'")
    elif isinstance(expected, str):
        facts, reference = [expected.strip()], expected.strip()
    elif isinstance(expected, list):
        for j, f in enumerate(expected):
            if isinstance(f, (int, float)) and not isinstance(f, bool):
                f = str(f)  # `expected: [30]` means the fact "30"
            if isinstance(f, bool):
                bad("expected", f"item {j} reads as the YAML boolean {str(f).lower()} (yes/no/on/off): quote it")
            elif not isinstance(f, str) or not f.strip():
                bad("expected", f"item {j} must be a non-empty string")
            else:
                facts.append(f.strip())
    else:
        bad("expected", "must be a text or a list of facts (strings)")
    if refusal and facts:
        bad("expected", "a case with 'expect_refusal: true' has no expected facts (leave it empty)")

    sources: list[ExpectedSource] = []
    raw_sources = raw.get("expected_sources", [])
    if raw_sources is None:
        raw_sources = []
    if not isinstance(raw_sources, list):
        bad("expected_sources", "must be a list of document external ids or {doc, quote} mappings")
        raw_sources = []
    for j, s in enumerate(raw_sources):
        where = f"expected_sources[{j}]"
        if isinstance(s, str) and s.strip():
            sources.append(ExpectedSource(s.strip()))
        elif isinstance(s, dict):
            doc, quote = s.get("doc"), s.get("quote")
            extra = set(s) - {"doc", "quote"}
            if extra:
                bad(where, f"unknown key(s) {', '.join(sorted(map(str, extra)))}; a source is {{doc, quote}}")
            if not isinstance(doc, str) or not doc.strip():
                bad(f"{where}.doc", "is required: the document's external id")
                continue
            if quote is not None and (not isinstance(quote, str) or not quote.strip()):
                bad(f"{where}.quote", "must be a non-empty string (or left out)")
                continue
            sources.append(ExpectedSource(doc.strip(), quote.strip() if quote else None))
        else:
            bad(where, "must be a document external id or a {doc, quote} mapping")
    if refusal and sources:
        bad("expected_sources", "a case with 'expect_refusal: true' has no expected sources")

    feature = raw.get("feature", DEFAULT_FEATURE)
    if feature is None:
        feature = DEFAULT_FEATURE
    if not isinstance(feature, str) or not feature.strip() or len(feature) > FEATURE_MAX:
        bad("feature", f"must be a non-empty string of at most {FEATURE_MAX} characters")
        feature = DEFAULT_FEATURE

    tags = raw.get("tags", [])
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        bad("tags", "must be a list of non-empty strings")
        tags = []

    para = raw.get("paraphrase_of")
    if para is not None and not isinstance(para, str):
        bad("paraphrase_of", "must be the id of another case")
        para = None

    ref = raw.get("reference")
    if ref is not None:
        if not isinstance(ref, str) or not ref.strip():
            bad("reference", "must be a non-empty string")
        else:
            reference = ref.strip()

    if raw.get("needs_label"):
        bad("needs_label", "this harvested case is not labelled yet: write its query and expected facts "
                           "(or set expect_refusal), then remove needs_label")

    metadata = raw.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        bad("metadata", "must be a mapping")
        metadata = {}

    if len(issues) > before:
        return None
    return Case(id=cid, query=query.strip(), facts=facts, expected_sources=sources, feature=feature,
                tags=list(tags), expect_refusal=refusal, paraphrase_of=para, reference=reference,
                metadata=dict(metadata), line=line)
