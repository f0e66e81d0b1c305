"""One self-contained HTML report (inline CSS and SVG, no scripts, nothing fetched).

``render_report(run, results, comparison=None, base=None)``: the summary (retrieval and
generation apart, diagnosis counts), charts, results by tag, the pipeline fingerprint, every
case (query, expected facts and sources, retrieved chunks, answer, diagnosis) and, when
comparing against ``base``, the metric deltas and the cases that flipped.
"""

from __future__ import annotations

from html import escape
from typing import Any, Sequence

__all__ = ["render_report", "GROUPS", "group_metrics"]

COLORS = {"pass": "#2f9e44", "retrieval_miss": "#e8590c", "generation_miss": "#7048e8", "both": "#c92a2a",
          "error": "#868e96"}
GROUPS = (("Retrieval", "retrieval."), ("Generation", "generation."), ("Judge (LLM)", "judge."))
PCT_LIKE = ("hit@", "recall@", "context_", "fact_coverage", "correct_refusal", "false_refusal", "groundedness",
            "judge.", "pass_rate", "mrr", "semantic_similarity")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#212529;background:#f8f9fa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dee2e6;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 6px}
.meta{color:#495057;font-size:13px}.meta code{font-size:12px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:#495057;font-size:12px}
table{border-collapse:collapse;background:#fff;width:100%;margin:6px 0}
th,td{border:1px solid #dee2e6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f3f5;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:16px}
.badge{display:inline-block;border-radius:10px;padding:0 8px;color:#fff;font-size:12px;white-space:nowrap}
.up{color:#2f9e44}.down{color:#c92a2a}
details{background:#fff;border:1px solid #dee2e6;border-radius:6px;margin:6px 0;padding:6px 10px}
summary{cursor:pointer}details[open] summary{margin-bottom:6px}
.chunk{border-left:3px solid #ced4da;padding:4px 8px;margin:6px 0;background:#f8f9fa;white-space:pre-wrap;font-size:12.5px}
.chunk.hit{border-left-color:#2f9e44}.answer{border-left:3px solid #1c7ed6;padding:6px 10px;background:#e7f5ff}
.yes{color:#2f9e44;font-weight:600}.no{color:#c92a2a;font-weight:600}.muted{color:#868e96}
svg text{font:12px system-ui,sans-serif}
"""


def _e(v: Any) -> str:
    return escape("" if v is None else str(v))


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return '<span class="muted">—</span>'
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return _e(v)


def _delta(d: float | None, lower_is_better: bool = False) -> str:
    if d is None:
        return '<span class="muted">—</span>'
    if d == 0:
        return "0"
    good = (d < 0) if lower_is_better else (d > 0)
    return f'<span class="{"up" if good else "down"}">{d:+.3f}</span>'


def _badge(diagnosis: str) -> str:
    return f'<span class="badge" style="background:{COLORS.get(diagnosis, "#868e96")}">{_e(diagnosis)}</span>'


def group_metrics(metrics: dict[str, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    out = []
    for title, prefix in GROUPS:
        rows = [(n, v) for n, v in metrics.items() if n.startswith(prefix)]
        if rows:
            out.append((title, rows))
    return out


def _svg_open(width: int, height: int, label: str) -> str:
    """An inline SVG that shrinks to fit its column (never wider than drawn)."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" style="max-width:100%" role="img" aria-label="{_e(label)}">')


def _bars(rows: Sequence[tuple[str, float | None, float | None]], compare: bool) -> str:
    """Horizontal bars on a 0..1 scale; with ``compare``, A (grey) above B (blue)."""
    label_w, bar_w, row_h = 230, 300, 36 if compare else 20
    height = row_h * len(rows) + 8
    parts = [_svg_open(label_w + bar_w + 70, height, "metric chart")]
    for i, (name, a, b) in enumerate(rows):
        y = 4 + i * row_h
        parts.append(f'<text x="0" y="{y + row_h / 2 + 4:.0f}">{_e(name)}</text>')
        bars = [(a, "#adb5bd"), (b, "#1c7ed6")] if compare else [(b, "#1c7ed6")]
        h = (row_h - 6) / len(bars)
        for j, (v, color) in enumerate(bars):
            if v is None:
                continue
            w = max(0.0, min(1.0, float(v))) * bar_w
            by = y + j * h
            parts.append(f'<rect x="{label_w}" y="{by:.1f}" width="{w:.1f}" height="{h - 1:.1f}" fill="{color}"/>')
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{by + h - 3:.1f}" style="font-size:11px">{float(v):.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _diagnosis_bar(counts: dict[str, int], total: int) -> str:
    width, h = 760, 22
    parts = [_svg_open(width, h + 24, "diagnosis counts")]
    x = 0.0
    legend_x = 0
    for d, color in COLORS.items():
        n = counts.get(d, 0)
        if total and n:
            w = n / total * width
            parts.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{h}" fill="{color}"/>')
            if w > 18:
                parts.append(f'<text x="{x + w / 2:.1f}" y="{h - 6}" fill="#fff" text-anchor="middle">{n}</text>')
            x += w
        label = f"{d} ({n})"
        parts.append(f'<rect x="{legend_x}" y="{h + 8}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{legend_x + 14}" y="{h + 17}">{_e(label)}</text>')
        legend_x += 24 + 8 * len(label)
    parts.append("</svg>")
    return "".join(parts)


def _metric_tables(summary: dict[str, Any], base: dict[str, Any] | None) -> str:
    metrics = summary.get("metrics") or {}
    bm = (base or {}).get("metrics") or {}
    blocks = []
    for title, rows in group_metrics(metrics):
        head = "<tr><th>metric</th>" + ("<th>base</th><th>this run</th><th>Δ</th>" if base else "<th>value</th>") \
               + "<th>cases</th></tr>"
        body = []
        for name, v in rows:
            n = (summary.get("counts") or {}).get(name, "")
            if base:
                bv = bm.get(name)
                d = round(v - bv, 4) if v is not None and bv is not None else None
                body.append(f"<tr><td>{_e(name)}</td><td class=n>{_num(bv)}</td><td class=n>{_num(v)}</td>"
                            f"<td class=n>{_delta(d, 'false_refusal' in name)}</td><td class=n>{n}</td></tr>")
            else:
                body.append(f"<tr><td>{_e(name)}</td><td class=n>{_num(v)}</td><td class=n>{n}</td></tr>")
        chart = _bars([(name.split(".", 1)[1], bm.get(name) if base else None, v) for name, v in rows
                       if any(p in name for p in PCT_LIKE)], compare=base is not None)
        blocks.append(f"<div><h3>{_e(title)}</h3><table>{head}{''.join(body)}</table>{chart}</div>")
    legend = '<p class="meta">Bars: grey the base run, blue this run.</p>' if base else ""
    return f'{legend}<div class="cols">{"".join(blocks)}</div>'


def _fingerprint(fp: dict[str, Any], changes: Sequence[dict[str, Any]] | None) -> str:
    from loadbear.evals.compare import flatten

    flat = flatten(fp)
    changed = {c["field"]: c for c in changes or []}
    rows = []
    for k in sorted(set(flat) | set(changed)):
        v = flat.get(k)
        if k in changed:
            rows.append(f'<tr><td>{_e(k)}</td><td><span class="down">{_e(changed[k]["a"])} → '
                        f'{_e(changed[k]["b"])}</span></td></tr>')
        else:
            rows.append(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>")
    return f"<table><tr><th>field</th><th>value</th></tr>{''.join(rows)}</table>"


def _flips(comparison: dict[str, Any]) -> str:
    flips = comparison["flips"]
    out = []
    for key, title in (("regressions", "Regressions (passed before, fail now)"), ("fixes", "Fixes (failed before, pass now)"),
                       ("changed", "Diagnosis changed (still failing)")):
        rows = flips.get(key) or []
        out.append(f"<h3>{_e(title)}: {len(rows)}</h3>")
        if rows:
            out.append("<table><tr><th>case</th><th>query</th><th>before</th><th>now</th></tr>" + "".join(
                f'<tr><td><a href="#case-{_e(r["case_id"])}">{_e(r["case_id"])}</a></td><td>{_e(r["query"])}</td>'
                f"<td>{_badge(r['a'])}</td><td>{_badge(r['b'])}</td></tr>" for r in rows) + "</table>")
    for key, title in (("only_in_a", "Only in the base run"), ("only_in_b", "Only in this run")):
        if comparison.get(key):
            out.append(f"<p>{_e(title)}: {_e(', '.join(comparison[key]))}</p>")
    return "".join(out)


def _case(r: dict[str, Any], k: int) -> str:
    m = r.get("metrics") or {}
    facts = r.get("facts") or []
    parts = [f'<details id="case-{_e(r["case_id"])}"><summary>{_badge(r["diagnosis"])} <b>{_e(r["case_id"])}</b> — '
             f'{_e(r.get("query"))}</summary>']
    tags = ", ".join(r.get("tags") or [])
    parts.append(f'<p class="meta">feature <code>{_e(r.get("feature"))}</code>'
                 + (f" · tags {_e(tags)}" if tags else "")
                 + (f" · served by <code>{_e(r.get('served_model'))}</code>" if r.get("served_model") else "")
                 + (f" · {r['latency_ms']} ms" if r.get("latency_ms") is not None else "")
                 + (f" · interaction <code>{_e(r.get('interaction_id'))}</code>" if r.get("interaction_id") else "")
                 + "</p>")
    if r.get("error"):
        parts.append(f'<p class="no">error: {_e(r["error"])}</p>')
    if r.get("expect_refusal"):
        parts.append("<p>Expected: <b>a refusal</b> (the documents do not answer this).</p>")
    if facts:
        parts.append("<table><tr><th>expected fact</th><th>in retrieved text</th><th>in answer</th></tr>" + "".join(
            f"<tr><td>{_e(f['fact'])}</td><td>{_mark(f.get('in_context'))}</td><td>{_mark(f.get('in_answer'))}</td></tr>"
            for f in facts) + "</table>")
    sources = r.get("expected_sources") or []
    retrieved = r.get("retrieved") or []
    if sources:
        rows = []
        for i, s in enumerate(sources):
            ranks = [c["rank"] for c in retrieved if i in (c.get("matches") or [])]
            rows.append(f"<tr><td><code>{_e(s['doc'])}</code></td><td>{_e(s.get('quote') or '')}</td>"
                        f"<td>{_mark('rank ' + ', '.join(map(str, ranks)) if ranks else None)}</td></tr>")
        parts.append("<table><tr><th>expected source</th><th>quote</th><th>retrieved</th></tr>" + "".join(rows) + "</table>")
    parts.append("<h3>Answer</h3>")
    if r.get("answer") is not None:
        parts.append(f'<div class="answer">{_e(r["answer"])}</div>')
        unsupported = [s for s in r.get("sentences") or [] if not s.get("supported")]
        if unsupported:
            parts.append("<p>Sentences not supported by the retrieved text:</p><ul>"
                         + "".join(f"<li>{_e(s['sentence'])}</li>" for s in unsupported) + "</ul>")
    else:
        parts.append('<p class="muted">(no answer)</p>')
    if r.get("judge"):
        j = r["judge"]
        parts.append(f"<p>Judge: {_e(j.get('error') or '')}"
                     + (f"correct {_num(j.get('correctness'))}, grounded {_num(j.get('groundedness'))} — {_e(j.get('reason'))}"
                        if "error" not in j else "") + "</p>")
    shown = ", ".join(f"{_e(n)} {_num(v)}" for n, v in m.items() if n != "pass")
    parts.append(f'<p class="meta">{shown}</p>')
    parts.append(f"<h3>Retrieved (top {k})</h3>")
    if not retrieved:
        parts.append('<p class="muted">(nothing retrieved)</p>')
    for c in retrieved:
        hit = bool(c.get("matches"))
        parts.append(f'<div class="chunk{" hit" if hit else ""}"><b>[{c["rank"]}] {_e(c.get("doc") or "")}</b> '
                     f'<span class="muted">{_e(c.get("title") or "")} · score {float(c.get("score") or 0):.4f}'
                     f'{" · matches an expected source" if hit else ""}</span>\n{_e(c.get("text"))}</div>')
    parts.append("</details>")
    return "".join(parts)


def _mark(v: Any) -> str:
    if v:
        return f'<span class="yes">✓ {_e(v)}</span>'
    return '<span class="no">✗</span>'


def render_report(run: dict[str, Any], results: Sequence[dict[str, Any]], comparison: dict[str, Any] | None = None,
                  base: dict[str, Any] | None = None) -> str:
    """The report of ``run``; with ``comparison`` (and the ``base`` run), the deltas and flips."""
    summary = run.get("summary") or {}
    ds = run.get("dataset") or {}
    k = summary.get("k") or (run.get("config") or {}).get("top_k") or 5
    title = f"loadbear eval — {ds.get('name', '')} — {run.get('label') or run['id'][:8]}"
    diag = summary.get("diagnosis") or {}
    total = summary.get("cases") or len(results)
    metrics = summary.get("metrics") or {}
    base_summary = (base or {}).get("summary") if comparison else None
    h = [f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content='width=device-width'>"
         f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"]
    h.append(f"<h1>{_e(title)}</h1>")
    h.append(f'<p class="meta">run <code>{_e(run["id"])}</code> · {_e(run.get("created_at"))} · model '
             f'<code>{_e(run.get("model"))}</code> · served by {_e(", ".join(f"{m} ({n})" for m, n in (summary.get("served_models") or {}).items()) or "—")}'
             f' · dataset <code>{_e(ds.get("path"))}</code> ({total} cases, sha256 {_e((ds.get("sha256") or "")[:12])})'
             f' · pipeline <code>{_e((run.get("pipeline_hash") or "")[:12])}</code></p>')
    if comparison:
        b = comparison["a"]
        h.append(f'<p class="meta">compared with base run <code>{_e(b["id"])}</code> ({_e(b.get("label") or "")}, '
                 f'{_e(b.get("created_at"))}) — {"same" if comparison["same_pipeline"] else "<b>different</b>"} pipeline, '
                 f'{"same" if comparison["same_dataset"] else "<b>different</b>"} dataset</p>')
    cards = [("pass rate", f"{metrics.get('pass_rate', 0):.1%}")]
    for name in (f"retrieval.recall@{k}", "retrieval.mrr", "generation.fact_coverage", "generation.groundedness"):
        if metrics.get(name) is not None:
            cards.append((name, f"{metrics[name]:.3f}"))
    h.append('<div class="cards">' + "".join(f"<div class=card><b>{_e(v)}</b><span>{_e(n)}</span></div>" for n, v in cards)
             + "</div>")
    h.append("<h2>Diagnosis</h2>" + _diagnosis_bar(diag, total))
    if comparison:
        h.append("<table><tr><th>diagnosis</th><th>base</th><th>this run</th><th>Δ</th></tr>" + "".join(
            f"<tr><td>{_badge(d['name'])}</td><td class=n>{d['a']}</td><td class=n>{d['b']}</td>"
            f"<td class=n>{_delta(float(d['delta']), d['name'] != 'pass') if d['delta'] else '0'}</td></tr>"
            for d in comparison["diagnosis"]) + "</table>")
    h.append("<h2>Metrics</h2>" + _metric_tables(summary, base_summary))
    for w in summary.get("warnings") or []:
        h.append(f'<p class="no">{_e(w)}</p>')
    if comparison:
        h.append("<h2>Flipped cases</h2>" + _flips(comparison))
    if summary.get("by_tag"):
        h.append("<h2>By tag</h2><table><tr><th>tag</th><th>cases</th><th>pass</th><th>pass rate</th></tr>" + "".join(
            f"<tr><td>{_e(t)}</td><td class=n>{v['cases']}</td><td class=n>{v['pass']}</td><td class=n>{v['pass_rate']:.1%}</td></tr>"
            for t, v in summary["by_tag"].items()) + "</table>")
    h.append("<h2>Pipeline fingerprint</h2>"
             + _fingerprint(run.get("fingerprint") or {}, comparison["fingerprint_changes"] if comparison else None))
    h.append("<h2>Cases</h2><table><tr><th>case</th><th>diagnosis</th><th>recall@k</th><th>context has answer</th>"
             "<th>fact coverage</th><th>grounded</th><th>similarity</th></tr>")
    for r in results:
        m = r.get("metrics") or {}
        h.append(f'<tr><td><a href="#case-{_e(r["case_id"])}">{_e(r["case_id"])}</a></td><td>{_badge(r["diagnosis"])}</td>'
                 f"<td class=n>{_num(m.get(f'retrieval.recall@{k}'))}</td><td class=n>{_num(m.get('retrieval.context_contains_answer'))}</td>"
                 f"<td class=n>{_num(m.get('generation.fact_coverage', m.get('generation.correct_refusal')))}</td>"
                 f"<td class=n>{_num(m.get('generation.groundedness'))}</td><td class=n>{_num(m.get('generation.semantic_similarity'))}</td></tr>")
    h.append("</table>")
    h.extend(_case(r, k) for r in results)
    h.append('<p class="meta">Generated by loadbear. Metrics are described in docs/evals.md.</p></main></body></html>')
    return "".join(h)
