"""``loadbear eval``: run, the CI gate's exit codes, compare, show/list, validate, harvest, the report.

In-process (Typer's runner) on SQLite, with a fast hashing embedder in place of MiniLM.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from loadbear.cli import app
from test_evals_runner import DATASET, DOCS, HashEmbedder


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A SQLite database with tenant acme and its documents; the CLI reads it from the env."""
    import loadbear.knowledge.embeddings as embeddings
    from loadbear import Gateway, Settings

    monkeypatch.setattr(embeddings, "get_embedder", lambda name=None, catalog=None, **kw: HashEmbedder())
    for var in ("LOADBEAR_CONFIG", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("LOADBEAR_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    gw = Gateway(Settings.load(env={}, config_path=None, database_url=url))
    gw.migrate()
    tenant = gw.tenants.create_tenant("acme", "Acme")
    for ext, text in DOCS.items():
        gw.knowledge.ingest_text(tenant.id, text=text, external_id=ext, content_type="text/markdown")
    gw.close()
    (tmp_path / "set.yaml").write_text(DATASET, encoding="utf-8")

    def reingest(external_id: str, text: str) -> None:
        g = Gateway(Settings.load(env={}, config_path=None, database_url=url))
        try:
            g.knowledge.ingest_text(tenant.id, text=text, external_id=external_id, content_type="text/markdown")
        finally:
            g.close()

    return tmp_path, reingest


def cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_run_report_and_the_ci_gate_exit_codes(env):
    tmp, _ = env
    ok = cli("eval", "run", "set.yaml", "--tenant", "acme", "--label", "base", "--report", "r.html",
             "--fail-under", "retrieval.recall@5=0.5", "--fail-under", "generation.correct_refusal=1")
    assert ok.exit_code == 0, ok.output
    assert "PASS retrieval.recall@5" in ok.output and "stored run" in ok.output
    assert "Retrieval" in ok.output and "Generation" in ok.output and "Diagnosis" in ok.output

    html = (tmp / "r.html").read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>") and "<svg" in html and 'id="case-refund-window"' in html
    assert "<script" not in html and not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", html)
    assert "refunded in full within 14 days" in html  # the retrieved chunk text is in the case details

    # A stored run can be gated again without re-running it: fail, pass, unknown metric, bad syntax.
    failed = cli("eval", "show", "base", "--tenant", "acme", "--fail-under", "pass_rate=1.01")
    assert failed.exit_code == 1 and "FAIL pass_rate" in failed.output
    assert cli("eval", "show", "latest", "--tenant", "acme", "--fail-under", "pass_rate=0.3").exit_code == 0
    unknown = cli("eval", "show", "base", "--tenant", "acme", "--fail-under", "retrieval.recal@5=0.5")
    assert unknown.exit_code == 2 and "unknown metric" in unknown.output
    assert cli("eval", "show", "base", "--tenant", "acme", "--fail-under", "pass_rate>0.5").exit_code == 2
    # On run, a gate naming a metric the run cannot have fails before any case runs.
    early = cli("eval", "run", "set.yaml", "--tenant", "acme", "--fail-under", "retrieval.recall@9=0.5")
    assert early.exit_code == 2 and "retrieval.recall@5" in early.output

    as_json = json.loads(cli("eval", "show", "base", "--tenant", "acme", "--json", "--fail-under", "pass_rate=0.1").stdout)
    assert as_json["run"]["label"] == "base" and len(as_json["results"]) == 3 and as_json["gates"][0]["ok"]
    cases = cli("eval", "show", "base", "--tenant", "acme", "--cases")
    assert cases.exit_code == 0 and "refund-window" in cases.output

    assert cli("eval", "run", "set.yaml", "--tenant", "nobody").exit_code == 2
    assert cli("eval", "run", "set.yaml", "--tenant", "acme", "--model", "nope").exit_code == 2
    assert cli("eval", "show", "no-such-label", "--tenant", "acme").exit_code == 2
    assert cli("eval", "show", "latest").exit_code == 2  # 'latest' of which tenant?


def test_compare_flips_and_list(env):
    tmp, reingest = env
    assert cli("eval", "run", "set.yaml", "--tenant", "acme", "--label", "before").exit_code == 0
    reingest("billing/refunds.md", "# Refunds\n\nRefunds are no longer offered on any plan.\n")
    after = cli("eval", "run", "set.yaml", "--tenant", "acme", "--label", "after", "--compare-to", "before",
                "--fail-on-regression", "--report", "cmp.html")
    assert after.exit_code == 1, after.output
    assert "1 regressions (pass → fail)" in after.output and "refund-window: pass →" in after.output
    assert "changed knowledge_base.version" in after.output
    html = (tmp / "cmp.html").read_text(encoding="utf-8")
    assert "Regressions (passed before, fail now): 1" in html and "compared with base run" in html

    runs = json.loads(cli("eval", "list", "--tenant", "acme", "--json").stdout)
    assert [r["label"] for r in runs] == ["after", "before"]
    listed = cli("eval", "list", "--tenant", "acme")
    assert listed.exit_code == 0 and "before" in listed.output

    cmp = json.loads(cli("eval", "compare", "before", "after", "--tenant", "acme", "--json").stdout)
    assert [f["case_id"] for f in cmp["flips"]["regressions"]] == ["refund-window"]
    assert not cmp["same_pipeline"] and cmp["same_dataset"]
    # Run ids (or their prefixes) need no --tenant; the gate and the regression check apply to B.
    a, b = runs[1]["id"], runs[0]["id"]
    plain = cli("eval", "compare", a, b[:18])
    assert plain.exit_code == 0 and "regressions" in plain.output
    assert cli("eval", "compare", a, b, "--fail-on-regression").exit_code == 1
    assert cli("eval", "compare", b, b, "--fail-on-regression").exit_code == 0
    assert cli("eval", "compare", a, b, "--fail-under", "pass_rate=0.99").exit_code == 1


def test_validate(env):
    tmp, _ = env
    good = cli("eval", "validate", "set.yaml")
    assert good.exit_code == 0 and "3 cases (2 answerable, 1 no-answer)" in good.output
    (tmp / "bad.yaml").write_text("cases:\n  - id: x\n    query: Q?\n    expected: [a]\n  - id: x\n    qurey: Q?\n",
                                  encoding="utf-8")
    bad = cli("eval", "validate", "bad.yaml")
    assert bad.exit_code == 2
    assert "bad.yaml:6: case 'x': field 'qurey': unknown field; did you mean 'query'?" in bad.output
    assert "bad.yaml:5: case 'x': field 'query': is required" in bad.output
    assert cli("eval", "run", "bad.yaml", "--tenant", "acme").exit_code == 2


def test_harvest_writes_a_yaml_dataset(env):
    import yaml

    tmp, _ = env
    r = cli("eval", "harvest", "--tenant", "acme", "--since", "7d", "-o", "cases.yaml")
    assert r.exit_code == 0 and "wrote 0 case(s)" in r.output
    data = yaml.safe_load((tmp / "cases.yaml").read_text(encoding="utf-8"))
    assert data == {"name": "acme-harvest", "version": 1, "cases": []}
    bad = cli("eval", "harvest", "--tenant", "acme", "--since", "last week", "-o", "x.yaml")
    assert bad.exit_code == 2 and not (tmp / "x.yaml").exists()
