"""Eval datasets: YAML and JSONL, and validation errors that name the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadbear.evals.dataset import DatasetError, ExpectedSource, load_dataset, parse_dataset

HELPDESK = Path(__file__).resolve().parents[1] / "examples" / "helpdesk" / "eval.yaml"


def issues(text: str, jsonl: bool = False) -> list[tuple[int | None, str | None, str | None, str]]:
    with pytest.raises(DatasetError) as info:
        parse_dataset(text, "set.yaml", jsonl=jsonl)
    return [(i.line, i.case, i.field, i.message) for i in info.value.issues]


def test_the_helpdesk_dataset_loads():
    ds = load_dataset(HELPDESK)
    assert (ds.name, ds.version, len(ds.cases), ds.warnings) == ("helpdesk", 1, 40, [])
    first = ds.cases[0]
    assert first.id == "refund-window-monthly" and first.facts == ["14 days", "first payment"]
    assert first.expected_sources[0].doc == "billing/refunds.md" and first.feature == "helpdesk"
    assert sum(c.expect_refusal for c in ds.cases) == 7
    assert len(ds.sha256) == 64


def test_yaml_forms_and_defaults():
    ds = parse_dataset(
        "- id: a\n  query: What is it?\n  expected: It is a thing.\n"
        "  expected_sources: [docs/a.md, {doc: docs/b.md, quote: ' a  quote '}]\n"
        "- id: b\n  query: Unknown?\n  expect_refusal: true\n", "bare.yaml")
    a, b = ds.cases
    assert ds.name == "bare" and a.feature == "eval" and a.tags == []
    assert a.facts == ["It is a thing."] and a.reference == "It is a thing."  # a text is one fact and the reference
    assert a.expected_sources == [ExpectedSource("docs/a.md"), ExpectedSource("docs/b.md", "a  quote")]
    assert b.expect_refusal and b.facts == [] and a.line == 1 and b.line == 5


def test_every_problem_is_reported_with_line_and_field():
    text = """name: t
version: 1
cases:
  - id: ok-1
    query: Fine?
    expected: [x]
  - id: ok-1
    query: Duplicate?
    expected: [x]
  - id: bad case
    query: ""
    expected: {a: 1}
    expected_sources:
      - quote: no doc here
    tags: billing
  - id: refusal-with-facts
    query: Q?
    expect_refusal: "yes"
  - id: nothing-expected
    query: Q?
    expectd: [typo]
    paraphrase_of: nowhere
"""
    got = issues(text)
    assert (7, "ok-1", "id", "duplicate id (first used on line 4)") in got
    assert (10, "bad case", "id", "must be a string of letters, digits and . _ : / - (no spaces, at most 200 characters)") in got
    assert (11, "bad case", "query", "must be a non-empty string") in got
    assert (12, "bad case", "expected", "must be a text or a list of facts (strings)") in got
    assert (13, "bad case", "expected_sources[0].doc", "is required: the document's external id") in got
    assert (15, "bad case", "tags", "must be a list of non-empty strings") in got
    assert (18, "refusal-with-facts", "expect_refusal", "must be true or false") in got
    assert any(i[:3] == (19, "nothing-expected", "expected") and "expect_refusal: true" in i[3] for i in got)
    assert (21, "nothing-expected", "expectd", "unknown field; did you mean 'expected'?") in got
    # an invalid case is left out, so this one is checked against the valid ones only
    assert not any(i[2] == "paraphrase_of" and i[1] == "bad case" for i in got)
    assert [i[0] for i in got] == sorted(i[0] for i in got)
    # the message names the file, line, case and field
    with pytest.raises(DatasetError) as info:
        parse_dataset(text, "set.yaml")
    assert "set.yaml:11: case 'bad case': field 'query': must be a non-empty string" in str(info.value)


def test_conventions_for_refusals_paraphrases_and_harvested_cases():
    got = issues("""cases:
  - id: a
    query: Q?
    expected: [x]
    expected_sources: [d.md]
    expect_refusal: true
  - id: b
    query: Q?
    expected: [x]
    paraphrase_of: zz
  - id: c
    query: Q?
    expected: []
    needs_label: true
  - id: d
    query: Q?
    expected: [yes]
""")
    assert (17, "d", "expected", "item 0 reads as the YAML boolean true (yes/no/on/off): quote it") in got
    assert (4, "a", "expected", "a case with 'expect_refusal: true' has no expected facts (leave it empty)") in got
    assert (5, "a", "expected_sources", "a case with 'expect_refusal: true' has no expected sources") in got
    assert (7, "b", "paraphrase_of", "'zz' does not name another case of this dataset") in got
    assert any(i[1:3] == ("c", "needs_label") and "not labelled yet" in i[3] for i in got)


def test_unknown_fields_warn_and_syntax_errors_have_a_line():
    ds = parse_dataset("cases:\n  - id: a\n    query: Q?\n    expected: [x]\n    owner: kim\nextra: 1\n", "w.yaml")
    assert ds.warnings == ["w.yaml: unknown top-level field 'extra' (ignored)",
                           "w.yaml:5: case 'a': unknown field 'owner' (ignored)"]
    assert issues("cases:\n  - id: a\n    query: [unclosed\n") [0][0] == 4
    assert issues("cases: {}\n") == [(1, None, "cases", "must be a list of cases (the file is {name, version, cases: [...]})")]
    assert issues("cases: []\n") == [(None, None, "cases", "the dataset has no cases")]
    assert issues("just text\n")[0][3].startswith("expected a mapping")


def test_jsonl(tmp_path):
    good = [{"id": "a", "query": "Q?", "expected": ["x"], "expected_sources": [{"doc": "d.md"}]},
            {"id": "b", "query": "R?", "expect_refusal": True}]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in good) + "\n\n", encoding="utf-8")
    ds = load_dataset(path)
    assert ds.name == "set" and [c.id for c in ds.cases] == ["a", "b"] and ds.cases[1].line == 2
    got = issues('{"id": "a", "query": "Q?", "expected": ["x"]}\n{"id": "b", "query": 5, "expected": ["x"]}\n{bad json\n',
                 jsonl=True)
    assert got[0] == (2, "b", "query", "must be a non-empty string")
    assert got[1][0] == 3 and got[1][3].startswith("not valid JSON")


def test_unreadable_files(tmp_path):
    with pytest.raises(DatasetError, match="cannot read the file"):
        load_dataset(tmp_path / "missing.yaml")
    (tmp_path / "latin.yaml").write_bytes(b"cases: [caf\xe9]")
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset(tmp_path / "latin.yaml")
