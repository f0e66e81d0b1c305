"""``loadbear eval ...``: run a dataset, list/show/compare stored runs, gate CI, harvest cases.

Exit codes: 0 fine; 1 a ``--fail-under`` gate failed (or ``--fail-on-regression`` found one);
2 a usage problem (invalid dataset, unknown tenant, model, run or metric).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Optional

import typer

eval_app = typer.Typer(help="Evaluate retrieval and generation on a dataset; store, compare and gate runs.",
                       no_args_is_help=True)

FAIL_UNDER_HELP = "Exit 1 unless METRIC ≥ MIN, e.g. retrieval.recall@5=0.9 (repeatable)."


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _gateway():
    """The configured gateway, its schema current (eval tables come with migration 0007)."""
    from loadbear.cli import _gateway as make

    gw = make()
    try:
        gw.migrate()
    except BaseException:
        gw.close()
        raise
    return gw


def _console():
    from rich.console import Console

    return Console(width=160)


def _parse_gates(specs: Optional[list[str]]):
    from loadbear.evals.compare import GateError, parse_gate

    try:
        return [parse_gate(s) for s in specs or []]
    except GateError as exc:
        _fail(str(exc))
    return []


def _tenant(gw, slug: str):
    from loadbear.tenancy.models import TenancyError

    try:
        return gw.tenants.get_tenant(slug)
    except TenancyError as exc:
        _fail(exc.message)


def _load(path: str):
    from loadbear.evals.dataset import DatasetError, load_dataset

    try:
        ds = load_dataset(path)
    except DatasetError as exc:
        for issue in exc.issues:
            typer.secho(issue.format(exc.path), fg=typer.colors.RED, err=True)
        _fail(f"{len(exc.issues)} problem(s) in {exc.path}")
    for w in ds.warnings:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    return ds


# -- output -------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_summary(run: dict[str, Any]) -> None:
    from rich.table import Table

    from loadbear.evals.report import group_metrics

    s = run.get("summary") or {}
    ds = run.get("dataset") or {}
    con = _console()
    served = ", ".join(f"{m} ({n})" for m, n in (s.get("served_models") or {}).items()) or "—"
    con.print(f"[bold]run {run['id']}[/]" + (f" ({run['label']})" if run.get("label") else "")
              + f" — {ds.get('name')}: {s.get('cases', 0)} cases ({s.get('answerable', 0)} answerable, "
              f"{s.get('no_answer', 0)} no-answer), model {run.get('model')} → {served}, k={s.get('k')}")
    metrics = s.get("metrics") or {}
    counts = s.get("counts") or {}
    for title, rows in group_metrics(metrics):
        t = Table(title=title, title_justify="left")
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_column("cases", justify="right")
        for name, v in rows:
            t.add_row(name, _fmt(v), str(counts.get(name, "")))
        con.print(t)
    diag = s.get("diagnosis") or {}
    t = Table(title="Diagnosis", title_justify="left")
    for d in diag:
        t.add_column(d, justify="right")
    t.add_column("pass rate", justify="right")
    t.add_row(*[str(n) for n in diag.values()], f"{metrics.get('pass_rate', 0):.1%}")
    con.print(t)
    for w in s.get("warnings") or []:
        con.print(f"[yellow]warning: {w}[/]")


def print_cases(results: list[dict[str, Any]]) -> None:
    from rich.table import Table

    t = Table(title="Cases", title_justify="left")
    for col in ("case", "diagnosis", "recall@k", "ctx has answer", "facts", "grounded", "answer"):
        t.add_column(col, justify="right" if col in ("recall@k", "ctx has answer", "facts", "grounded") else "left")
    for r in results:
        m = r.get("metrics") or {}
        cut = max((int(n.rsplit("@", 1)[1]) for n in m if n.startswith("retrieval.recall@")), default=None)
        recall = m.get(f"retrieval.recall@{cut}")
        answer = (r.get("answer") or r.get("error") or "").replace("\n", " ")
        t.add_row(r["case_id"], r["diagnosis"], _fmt(recall), _fmt(m.get("retrieval.context_contains_answer")),
                  _fmt(m.get("generation.fact_coverage", m.get("generation.correct_refusal"))),
                  _fmt(m.get("generation.groundedness")), answer[:60] + ("…" if len(answer) > 60 else ""))
    _console().print(t)


def print_comparison(cmp: dict[str, Any]) -> None:
    from rich.table import Table

    con = _console()
    a, b = cmp["a"], cmp["b"]
    con.print(f"[bold]compare[/] A {a['id']} ({a.get('label') or '-'}, {a.get('created_at')}) → "
              f"B {b['id']} ({b.get('label') or '-'}, {b.get('created_at')})")
    con.print(("same pipeline" if cmp["same_pipeline"] else "[yellow]different pipeline[/]") + ", "
              + ("same dataset" if cmp["same_dataset"] else "[yellow]different dataset[/]"))
    for ch in cmp["fingerprint_changes"]:
        con.print(f"  changed {ch['field']}: {ch['a']} → {ch['b']}")
    t = Table(title="Metrics", title_justify="left")
    for col in ("metric", "A", "B", "Δ"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for m in cmp["metrics"]:
        d = m["delta"]
        worse_if_up = "false_refusal" in m["name"]
        color = "" if not d else ("red" if (d > 0) == worse_if_up else "green")
        t.add_row(m["name"], _fmt(m["a"]), _fmt(m["b"]), f"[{color}]{d:+.3f}[/]" if d else _fmt(d))
    con.print(t)
    t = Table(title="Diagnosis", title_justify="left")
    for col in ("diagnosis", "A", "B", "Δ"):
        t.add_column(col, justify="left" if col == "diagnosis" else "right")
    for d in cmp["diagnosis"]:
        t.add_row(d["name"], str(d["a"]), str(d["b"]), f"{d['delta']:+d}" if d["delta"] else "0")
    con.print(t)
    flips = cmp["flips"]
    for key, title, color in (("regressions", "regressions (pass → fail)", "red"), ("fixes", "fixes (fail → pass)", "green"),
                              ("changed", "diagnosis changed", "yellow")):
        rows = flips[key]
        con.print(f"[bold {color}]{len(rows)} {title}[/]")
        for r in rows:
            con.print(f"  {r['case_id']}: {r['a']} → {r['b']}")
    for key, title in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
        if cmp[key]:
            con.print(f"{title}: {', '.join(cmp[key])}")


def _gate(summary: dict[str, Any], gates, as_json: bool) -> list[dict[str, Any]]:
    from loadbear.evals.compare import GateError, check_gates

    try:
        results = check_gates(summary, gates)
    except GateError as exc:
        _fail(str(exc))
    if not as_json:
        for g in results:
            typer.secho(("PASS " if g.ok else "FAIL ") + g.message, fg=typer.colors.GREEN if g.ok else typer.colors.RED,
                        err=not g.ok)
    return [{"metric": g.metric, "minimum": g.minimum, "value": g.value, "ok": g.ok} for g in results]


def _write_report(path: str, run, results, comparison=None, base=None) -> None:
    from loadbear.evals.report import render_report

    Path(path).write_text(render_report(run, results, comparison, base), encoding="utf-8")
    typer.echo(f"report: {path}", err=True)


def _resolve(gw, ref: str, tenant: Optional[str]):
    """The stored run a reference names, within ``--tenant`` when given, else the run id's tenant."""
    from loadbear.evals.store import EvalStore, RunNotFound

    store = EvalStore(gw.db)
    try:
        tenant_id = _tenant(gw, tenant).id if tenant else store.find_tenant(ref)
        return store.resolve(tenant_id, ref)
    except RunNotFound as exc:
        _fail(exc.message)


def _finish(as_json: bool, payload: dict[str, Any], gates: list[dict[str, Any]], regressions: bool = False) -> None:
    if as_json:
        typer.echo(json.dumps(payload, default=str))
    if any(not g["ok"] for g in gates) or regressions:
        raise typer.Exit(1)


# -- commands -----------------------------------------------------------------------------


@eval_app.command("run")
def run_cmd(
    dataset: str = typer.Argument(..., help="Dataset file: YAML ({name, version, cases}) or JSONL."),
    tenant: str = typer.Option(..., "--tenant", help="Tenant slug whose knowledge base is evaluated."),
    model: str = typer.Option("auto", "--model", help="Model to answer with (default: the tenant's 'auto')."),
    label: Optional[str] = typer.Option(None, "--label", help="A name for the run (compare by label)."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, max=64, help="Cases in flight at once."),
    top_k: int = typer.Option(5, "--top-k", min=1, max=20, help="Chunks retrieved per case (k of the metrics)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Also grade with this LLM (a real provider's model)."),
    similarity: bool = typer.Option(True, "--similarity/--no-similarity",
                                    help="Semantic similarity with local embeddings (all-MiniLM-L6-v2)."),
    compare_to: Optional[str] = typer.Option(None, "--compare-to", help="A stored run to compare with (id, label, latest)."),
    report: Optional[str] = typer.Option(None, "--report", help="Write a self-contained HTML report here."),
    fail_under: Optional[list[str]] = typer.Option(None, "--fail-under", help=FAIL_UNDER_HELP),
    fail_on_regression: bool = typer.Option(False, "--fail-on-regression",
                                            help="With --compare-to: exit 1 if a case that passed now fails."),
    show_cases: bool = typer.Option(False, "--cases", help="Print one line per case."),
    as_json: bool = typer.Option(False, "--json", help="Print the run (summary, gates, comparison) as JSON."),
) -> None:
    """Run DATASET through the tenant's real pipeline (retrieval + generation) and store the run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from loadbear.evals.judge import JudgeError
    from loadbear.evals.metrics import metric_names
    from loadbear.evals.runner import EvalConfig, run_eval
    from loadbear.evals.store import EvalStore
    from loadbear.gateway.errors import ApiError

    gates = _parse_gates(fail_under)
    known = metric_names(top_k, similarity=similarity, judge=bool(judge))
    unknown = [g.metric for g in gates if g.metric not in known]
    if unknown:
        _fail(f"unknown metric(s) {', '.join(unknown)}; with --top-k {top_k} the metrics are: {', '.join(known)}")
    ds = _load(dataset)
    config = EvalConfig(model=model, top_k=top_k, concurrency=concurrency, label=label, judge=judge,
                        similarity=similarity)
    gw = _gateway()

    async def main():
        try:
            t = _tenant(gw, tenant)
            base = _resolve(gw, compare_to, tenant) if compare_to else None
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          transient=True, disable=as_json) as progress:
                task = progress.add_task(f"evaluating {ds.name}", total=len(ds.cases))

                def tick(case, info):
                    progress.update(task, advance=1, description=f"{case.id}" + (" (error)" if info.get("error") else ""))

                run = await run_eval(gw, t, ds, config, progress=tick)
            base_results = EvalStore(gw.db).results(base["tenant_id"], base["id"]) if base else None
            return run, base, base_results
        finally:
            await gw.aclose()

    try:
        run, base, base_results = asyncio.run(main())
    except (ApiError, JudgeError) as exc:
        _fail(getattr(exc, "message", str(exc)))
    results = run.pop("results")
    comparison = None
    if base is not None:
        from loadbear.evals.compare import compare_runs

        comparison = compare_runs(base, base_results, run, results)
    if not as_json:
        print_summary(run)
        if show_cases:
            print_cases(results)
        if comparison:
            print_comparison(comparison)
    if report:
        _write_report(report, run, results, comparison, base)
    gate_rows = _gate(run["summary"], gates, as_json)
    regressed = bool(fail_on_regression and comparison and comparison["flips"]["regressions"])
    if not as_json:
        typer.echo(f"stored run {run['id']}" + (f" ({label})" if label else ""))
    _finish(as_json, {"run": run, "gates": gate_rows, "comparison": comparison}, gate_rows, regressed)


@eval_app.command("compare")
def compare_cmd(
    run_a: str = typer.Argument(..., help="The reference run (id, id prefix, label, latest, latest~N)."),
    run_b: str = typer.Argument(..., help="The new run."),
    tenant: Optional[str] = typer.Option(None, "--tenant", help="Tenant slug (needed for labels and 'latest')."),
    report: Optional[str] = typer.Option(None, "--report", help="Write a self-contained HTML report of B vs A."),
    fail_under: Optional[list[str]] = typer.Option(None, "--fail-under", help=FAIL_UNDER_HELP + " Checked on B."),
    fail_on_regression: bool = typer.Option(False, "--fail-on-regression", help="Exit 1 if a case passed in A and fails in B."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Metric deltas and flipped cases between two runs of the same tenant."""
    from loadbear.evals.compare import compare_runs
    from loadbear.evals.store import EvalStore

    gates = _parse_gates(fail_under)
    gw = _gateway()
    try:
        a = _resolve(gw, run_a, tenant)
        b = _resolve(gw, run_b, tenant)
        if a["tenant_id"] != b["tenant_id"]:
            _fail("the two runs belong to different tenants")
        store = EvalStore(gw.db)
        ra, rb = store.results(a["tenant_id"], a["id"]), store.results(b["tenant_id"], b["id"])
    finally:
        gw.close()
    cmp = compare_runs(a, ra, b, rb)
    if not as_json:
        print_comparison(cmp)
    if report:
        _write_report(report, b, rb, cmp, a)
    gate_rows = _gate(b.get("summary") or {}, gates, as_json)
    _finish(as_json, cmp | {"gates": gate_rows}, gate_rows, fail_on_regression and bool(cmp["flips"]["regressions"]))


@eval_app.command("show")
def show_cmd(
    run: str = typer.Argument("latest", help="Run id, id prefix, label, latest or latest~N."),
    tenant: Optional[str] = typer.Option(None, "--tenant", help="Tenant slug (needed for labels and 'latest')."),
    show_cases: bool = typer.Option(False, "--cases", help="Print one line per case."),
    report: Optional[str] = typer.Option(None, "--report", help="Write a self-contained HTML report."),
    fail_under: Optional[list[str]] = typer.Option(None, "--fail-under", help=FAIL_UNDER_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A stored run's scores (and, with --cases, its cases)."""
    from loadbear.evals.store import EvalStore

    gates = _parse_gates(fail_under)
    if run.startswith("latest") and not tenant:
        _fail("'latest' needs --tenant")
    gw = _gateway()
    try:
        r = _resolve(gw, run, tenant)
        results = EvalStore(gw.db).results(r["tenant_id"], r["id"]) if (show_cases or report or as_json) else []
    finally:
        gw.close()
    if r["status"] != "completed":
        typer.secho(f"run {r['id']} is {r['status']}" + (f": {r['error']}" if r.get("error") else ""),
                    fg=typer.colors.YELLOW, err=True)
    if not as_json:
        print_summary(r)
        if show_cases:
            print_cases(results)
    if report:
        _write_report(report, r, results)
    gate_rows = _gate(r.get("summary") or {}, gates, as_json)
    _finish(as_json, {"run": r, "results": results, "gates": gate_rows}, gate_rows)


@eval_app.command("list")
def list_cmd(
    tenant: str = typer.Option(..., "--tenant", help="Tenant slug."),
    limit: int = typer.Option(20, "--limit", min=1, max=1000),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Only runs of this dataset name."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The tenant's runs, newest first."""
    from loadbear.evals.store import EvalStore

    gw = _gateway()
    try:
        t = _tenant(gw, tenant)
        runs = EvalStore(gw.db).list_runs(t.id, limit, dataset)
    finally:
        gw.close()
    if as_json:
        typer.echo(json.dumps(runs, default=str))
        return
    from rich.table import Table

    table = Table(title=f"eval runs of {tenant}")
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("created", no_wrap=True, min_width=19)
    for col in ("label", "dataset", "model", "status", "pass rate", "recall@k", "fact coverage", "pipeline"):
        table.add_column(col)
    for r in runs:
        s = r.get("summary") or {}
        m = s.get("metrics") or {}
        k = s.get("k") or (r.get("config") or {}).get("top_k")
        table.add_row(r["id"], (r.get("created_at") or "")[:19].replace("T", " "), r.get("label") or "",
                      (r.get("dataset") or {}).get("name", ""),
                      r.get("model") or "", r["status"], f"{m['pass_rate']:.1%}" if "pass_rate" in m else "—",
                      _fmt(m.get(f"retrieval.recall@{k}")), _fmt(m.get("generation.fact_coverage")),
                      (r.get("pipeline_hash") or "")[:8])
    _console().print(table)


@eval_app.command("validate")
def validate_cmd(dataset: str = typer.Argument(..., help="Dataset file to check.")) -> None:
    """Check a dataset: every problem with its line and field (exit 2 if any)."""
    ds = _load(dataset)
    tags: dict[str, int] = {}
    for c in ds.cases:
        for t in c.tags:
            tags[t] = tags.get(t, 0) + 1
    refusals = sum(1 for c in ds.cases if c.expect_refusal)
    typer.echo(f"{ds.path}: OK — {len(ds.cases)} cases ({len(ds.cases) - refusals} answerable, {refusals} no-answer)"
               + (f"; tags: {', '.join(f'{t}={n}' for t, n in sorted(tags.items()))}" if tags else ""))


@eval_app.command("harvest")
def harvest_cmd(
    tenant: str = typer.Option(..., "--tenant", help="Tenant slug."),
    since: str = typer.Option("7d", "--since", help="Window start: a duration (7d, 24h) or an ISO date."),
    output: str = typer.Option(..., "-o", "--output", help="YAML file to write the draft cases to."),
    feature: Optional[str] = typer.Option(None, "--feature", help="Only interactions of this feature."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many cases."),
) -> None:
    """Draft eval cases from negative feedback, degraded answers and errors (label them, then run)."""
    import yaml

    try:
        from loadbear.evals.harvest import harvest_cases
    except ImportError:
        _fail("feedback harvesting is not available in this build (loadbear.evals.harvest is missing)")
    gw = _gateway()
    try:
        t = _tenant(gw, tenant)
        try:
            cases = harvest_cases(gw, t.id, since, feature=feature, limit=limit)
        except ValueError as exc:
            _fail(str(exc))
    finally:
        gw.close()
    unlabelled = sum(1 for c in cases if c.get("needs_label"))
    header = (f"# Draft evaluation cases harvested from tenant {tenant} (since {since}) by `loadbear eval harvest`.\n"
              "# Label each case (query, expected facts, expected_sources), remove needs_label, then check it with\n"
              f"#   loadbear eval validate {output}\n")
    body = yaml.safe_dump({"name": f"{tenant}-harvest", "version": 1, "cases": cases}, sort_keys=False,
                          allow_unicode=True, width=100)
    Path(output).write_text(header + body, encoding="utf-8")
    typer.echo(f"wrote {len(cases)} case(s) to {output} ({unlabelled} need a label)")
