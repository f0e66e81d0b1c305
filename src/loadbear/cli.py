"""The ``loadbear`` command line: a thin shell over :class:`loadbear.Gateway`."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from loadbear.config.settings import Settings
from loadbear.evals.cli import eval_app
from loadbear.router_cli import router_app

app = typer.Typer(help="loadbear: the load-bearing AI layer for multi-tenant SaaS.", no_args_is_help=True)
tenants_app = typer.Typer(help="Create and list tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke a tenant's API keys.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(eval_app, name="eval")
app.add_typer(router_app, name="router")


def _gateway(schema: bool = False):
    """With ``schema``, for commands that read or write tables: an unmigrated database is a clear
    error naming the fix, not a traceback about a missing table."""
    from loadbear.gateway.core import Gateway

    gw = Gateway.from_settings(Settings.load())
    if schema and not gw.is_current():
        gw.close()
        _fail("the database has pending migrations (or none applied yet); run `loadbear migrate` first", 2)
    return gw


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _emit(obj, as_json: bool, human: str) -> None:
    typer.echo(json.dumps(obj, indent=None if as_json else 2) if as_json else human)


@app.command()
def migrate() -> None:
    """Apply pending schema migrations to the configured database."""
    gw = _gateway()
    try:
        ran = gw.migrate()
    finally:
        gw.close()
    typer.echo(f"applied migrations: {ran}" if ran else "database is up to date")


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Bind address (LOADBEAR_HOST)."),
    port: Optional[int] = typer.Option(None, help="Port (LOADBEAR_PORT)."),
    workers: int = typer.Option(1, help="Worker processes."),
) -> None:
    """Serve the HTTP API."""
    import uvicorn

    from loadbear.observability import uvicorn_log_config

    settings = Settings.load()
    if workers > 1:
        typer.secho("note: each worker process keeps its own /metrics counters and a scrape reaches one "
                    "of them; for exact metrics run one worker per replica.", fg=typer.colors.YELLOW, err=True)
    uvicorn.run(
        "loadbear.api.factory:build_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        # uvicorn's own access log stays off: loadbear's (LOADBEAR_ACCESS_LOG) carries the ids.
        access_log=False,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(settings.log_level, settings.log_format),
    )


DEMO_DOCS = "examples/helpdesk/docs"
SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx")


@app.command()
def demo(
    slug: str = typer.Option("demo", help="Slug of the demo tenant."),
    docs: str = typer.Option(DEMO_DOCS, help="Help-centre folder to load into a new demo tenant."),
) -> None:
    """Create the demo tenant (if missing) with the example help centre, and print a fresh API key."""
    setup_demo(slug, docs)


def setup_demo(slug: str = "demo", docs: str = DEMO_DOCS) -> None:
    """What `loadbear demo` does, callable from Python (and from `loadbear run`)."""
    from pathlib import Path

    from loadbear.knowledge.types import KnowledgeError
    from loadbear.tenancy.models import TenancyError

    settings = Settings.load()
    gw = _gateway()
    loaded = failed = 0
    try:
        gw.migrate()
        try:
            gw.tenants.get_tenant(slug)
        except TenancyError:
            t = gw.tenants.create_tenant(slug, "Demo tenant", {
                "support_contact": "support@example.com",
                "knowledge_features": {"helpdesk": {"top_k": 5}},
                # The demo shows the response cache at work (a repeated question answers from it).
                "cache_enabled": True,
            })
            folder = Path(docs)
            if folder.is_dir():
                typer.echo(f"Loading the example help centre from {folder} (first run only)...")
                for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES):
                    try:
                        gw.knowledge.ingest_file(t.id, filename=f.name, data=f.read_bytes(),
                                                 external_id=f.relative_to(folder).as_posix())
                        loaded += 1
                    except KnowledgeError as exc:
                        failed += 1
                        typer.secho(f"  skipped {f}: {exc.code}: {exc.message}", fg=typer.colors.YELLOW, err=True)
                typer.echo(f"Loaded {loaded} document(s){f', {failed} skipped' if failed else ''}.")
        _, key = gw.tenants.create_key(slug, name="demo")
    finally:
        gw.close()
    base = f"http://{settings.host}:{settings.port}"
    typer.echo(f"Demo tenant '{slug}' ready. Its API key (shown once):\n\n  {key}\n")
    typer.echo("Try it (a grounded answer from the example help centre, with citations):\n")
    typer.echo(
        f"  curl -s {base}/v1/chat/completions \\\n"
        f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
        "    -d '{\"model\": \"auto\", \"knowledge\": {\"top_k\": 3}, "
        "\"messages\": [{\"role\": \"user\", \"content\": \"How long do I have to ask for a refund?\"}]}'\n"
    )
    typer.echo(f"  # or with the openai SDK: OpenAI(base_url='{base}/v1', api_key='{key}')\n")
    typer.echo(f"Dashboard: {base}/dashboard (sign in with this key)\n")


@app.command()
def run() -> None:
    """Migrate, create the demo tenant and key, and serve (what `make run` does)."""
    setup_demo("demo", DEMO_DOCS)
    serve(None, None, 1)


@app.command()
def simulate(
    port: int = typer.Option(8100, help="Port to listen on (127.0.0.1)."),
    host: str = typer.Option("127.0.0.1"),
    latency_ms: str = typer.Option("0:0", help="Latency range MIN:MAX in ms before the first byte."),
    tokens_per_second: Optional[float] = typer.Option(None, help="Pace of streamed chunks."),
    fault_rate: float = typer.Option(0.0, help="Share of requests that get a fault."),
    faults: Optional[str] = typer.Option(None, help="Fault kinds to draw from, comma-separated."),
    seed: int = typer.Option(0, help="Seed for latencies and faults."),
    reply_words: int = typer.Option(20, help="Words in each reply (one streamed chunk per word)."),
) -> None:
    """Run the upstream simulator: a fake OpenAI/Anthropic server with fault injection."""
    from loadbear.testing.simulator import main as sim_main

    argv = ["--port", str(port), "--host", host, "--latency-ms", latency_ms, "--fault-rate", str(fault_rate),
            "--seed", str(seed), "--reply-words", str(reply_words)]
    if tokens_per_second is not None:
        argv += ["--tokens-per-second", str(tokens_per_second)]
    if faults:
        argv += ["--faults", faults]
    sim_main(argv)


@app.command()
def ingest(
    paths: list[str] = typer.Argument(..., help="Files and folders to ingest (folders recursively)."),
    tenant: str = typer.Option(..., "--tenant", help="Tenant slug."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Ingest files into a tenant's knowledge base; one bad file never stops the rest."""
    from pathlib import Path

    from rich.progress import Progress

    from loadbear.knowledge.types import KnowledgeError
    from loadbear.tenancy.models import TenancyError

    # (file, external id): a folder's files are named relative to the folder, so re-ingesting
    # the same folder from anywhere replaces the same documents.
    files: list[tuple[Path, str]] = []
    missing: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.extend((f, f.relative_to(path).as_posix()) for f in sorted(path.rglob("*"))
                         if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES)
        elif path.is_file():
            files.append((path, path.name))
        else:
            missing.append(p)
    gw = _gateway()
    results: list[dict] = [{"path": m, "ok": False, "error": "no such file or folder"} for m in missing]
    try:
        gw.migrate()
        try:
            t = gw.tenants.get_tenant(tenant)
        except TenancyError as exc:
            _fail(exc.message, 2)
        with Progress(transient=True, disable=as_json) as progress:
            task = progress.add_task("ingesting", total=len(files))
            for f, external_id in files:
                progress.update(task, description=f"ingesting {external_id}")
                try:
                    doc = gw.knowledge.ingest_file(t.id, filename=f.name, data=f.read_bytes(),
                                                   external_id=external_id, source_url=f"file://{f.resolve()}")
                    results.append({"path": str(f), "ok": True, "document_id": doc.id, "chunks": doc.chunk_count,
                                    "version": doc.version})
                except KnowledgeError as exc:
                    results.append({"path": str(f), "ok": False, "error": f"{exc.code}: {exc.message}"})
                except OSError as exc:
                    results.append({"path": str(f), "ok": False, "error": f"unreadable: {exc}"})
                progress.advance(task)
    finally:
        gw.close()
    ok = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    if as_json:
        typer.echo(json.dumps({"ingested": len(ok), "failed": len(failed), "files": results}))
    else:
        for r in failed:
            typer.secho(f"  ✗ {r['path']}: {r['error']}", fg=typer.colors.RED, err=True)
        typer.echo(f"ingested {len(ok)} file(s) into {tenant} ({sum(r['chunks'] for r in ok)} chunks), "
                   f"{len(failed)} failed")
    if failed and not ok:
        raise typer.Exit(1)


@app.command()
def reembed(tenant: str = typer.Option(..., "--tenant", help="Tenant slug.")) -> None:
    """Re-embed a tenant's chunks with the configured embedding model."""
    from loadbear.tenancy.models import TenancyError

    gw = _gateway()
    try:
        t = gw.tenants.get_tenant(tenant)
        n = gw.knowledge.reembed(t.id)
        # Read before close: afterwards `gw.knowledge` would build a new service and load the model again.
        model = gw.knowledge.embedder.name
    except TenancyError as exc:
        _fail(exc.message, 2)
    finally:
        gw.close()
    typer.echo(f"re-embedded {n} chunk(s) for {tenant} with {model}")


@tenants_app.command("create")
def tenants_create(
    slug: str,
    name: Optional[str] = typer.Option(None, help="Display name (defaults to the slug)."),
    settings_json: Optional[str] = typer.Option(None, "--settings", help="Tenant settings as a JSON object."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    from loadbear.tenancy.models import TenancyError

    settings = None
    if settings_json:
        try:
            settings = json.loads(settings_json)
        except json.JSONDecodeError as exc:
            _fail(f"--settings is not valid JSON: {exc}", 2)
    gw = _gateway()
    try:
        gw.migrate()
        tenant = gw.tenants.create_tenant(slug, name, settings)
    except TenancyError as exc:
        _fail(exc.message, 2)
    finally:
        gw.close()
    _emit(tenant.public(), as_json, f"created tenant {tenant.slug} ({tenant.id})")


@tenants_app.command("list")
def tenants_list(as_json: bool = typer.Option(False, "--json")) -> None:
    gw = _gateway(schema=True)
    try:
        tenants = gw.tenants.list_tenants()
    finally:
        gw.close()
    if as_json:
        typer.echo(json.dumps([t.public() for t in tenants]))
        return
    for t in tenants:
        typer.echo(f"{t.slug:24} {t.id}  {t.name}")


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="Tenant slug."),
    name: str = typer.Option("", help="A label for the key."),
    scope: Optional[list[str]] = typer.Option(None, "--scope", help="Scope (repeatable); default: all."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    from loadbear.tenancy.models import TenancyError

    gw = _gateway(schema=True)
    try:
        key, plaintext = gw.tenants.create_key(tenant, name, scope or None)
    except TenancyError as exc:
        _fail(exc.message, 2)
    finally:
        gw.close()
    _emit({**key.public(), "tenant": tenant, "key": plaintext}, as_json,
          f"created key {key.prefix} for {tenant} (shown once):\n{plaintext}")


@keys_app.command("list")
def keys_list(tenant: str = typer.Option(..., "--tenant"), as_json: bool = typer.Option(False, "--json")) -> None:
    from loadbear.tenancy.models import TenancyError

    gw = _gateway(schema=True)
    try:
        keys = gw.tenants.list_keys(tenant)
    except TenancyError as exc:
        _fail(exc.message, 2)
    finally:
        gw.close()
    if as_json:
        typer.echo(json.dumps([k.public() for k in keys]))
        return
    for k in keys:
        state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
        typer.echo(f"{k.prefix:14} {k.id}  {','.join(k.scopes)}  {state}  last used {k.last_used_at or 'never'}")


@keys_app.command("revoke")
def keys_revoke(
    key: str = typer.Argument(..., help="Key id or visible prefix."),
    tenant: str = typer.Option(..., "--tenant"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    from loadbear.tenancy.models import TenancyError

    gw = _gateway(schema=True)
    try:
        revoked = gw.tenants.revoke_key(tenant, key)
    except TenancyError as exc:
        _fail(exc.message, 2)
    finally:
        gw.close()
    _emit(revoked.public(), as_json, f"revoked {revoked.prefix}")


@app.command()
def usage(
    tenant: str = typer.Option(..., "--tenant"),
    by: str = typer.Option("day", "--by", help="day, feature, model or user."),
    from_: Optional[str] = typer.Option(None, "--from", help="First day (YYYY-MM-DD); default 30 days ago."),
    to: Optional[str] = typer.Option(None, "--to", help="Last day (YYYY-MM-DD); default today."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Spend and savings (cache, routing) side by side for one tenant, from the daily rollups."""
    from loadbear.ledger.reports import ReportError, parse_period, tenant_usage
    from loadbear.tenancy.models import TenancyError

    gw = _gateway(schema=True)
    try:
        t = gw.tenants.get_tenant(tenant)
        start, end = parse_period(from_, to)
        report = tenant_usage(gw.db, t.id, start, end, by)
    except (TenancyError, ReportError) as exc:
        _fail(exc.message, 2)
    finally:
        gw.close()
    if as_json:
        typer.echo(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    # Two tables, so that each fits an 80-column terminal: what the traffic was, then what it
    # cost and what loadbear saved, side by side.
    rows = report["data"] + [{**report["totals"], by: "total"}]
    title = f"{tenant}, {report['from']} → {report['to']}, by {by}"
    traffic = Table(title=f"usage for {title}")
    for col in (by, "requests", "errors", "cached", "tokens", "avg ms"):
        traffic.add_column(col, justify="left" if col == by else "right")
    for row in rows:
        traffic.add_row(str(row[by] or "—"), str(row["requests"]), str(row["errors"]), str(row["cached_requests"]),
                        str(row["total_tokens"]), str(row["avg_latency_ms"] or "—"))
    money = Table(title=f"spend and savings for {title}",
                  caption="saved = cache hits (the calls they replaced) + routing (vs the strong tier);"
                          " without loadbear = spend + saved")
    money.add_column(by, min_width=10)  # long end-user ids wrap; the numbers do not
    for col in ("spend $", "saved\ncache $", "saved\nrouting $", "saved\ntotal $", "without\nloadbear $", "saved\n%"):
        money.add_column(col, justify="right", no_wrap=True)  # a number never wraps mid-way
    for row in rows:
        pct = row["saved_pct"]
        money.add_row(str(row[by] or "—"), *(_usd(row[c]) for c in (
            "cost_usd", "saved_cache_usd", "saved_routing_usd", "saved_usd", "cost_without_loadbear_usd")),
            "—" if pct is None else f"{pct:.1f}")
    console = Console()
    console.print(traffic)
    console.print(money)


def _usd(v: float) -> str:
    # Cents are enough from a dollar up; under it, micro-dollars (a request costs a few hundred).
    return f"{v:,.2f}" if abs(v) >= 1 else f"{v:.6f}"


def _fetch_providers(url: str, admin_key: Optional[str]) -> list[dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url.rstrip("/") + "/admin/providers",
                                 headers={"Authorization": f"Bearer {admin_key or ''}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())["data"]
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except Exception:  # noqa: BLE001
            message = str(exc)
        _fail(f"{url}: HTTP {exc.code}: {message}")
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        _fail(f"cannot read {url}/admin/providers: {exc}")
    return []  # unreachable


def _local_providers(settings: Settings) -> tuple[list[dict], str]:
    import os

    from loadbear.config.catalog import Catalog
    from loadbear.gateway.breaker import BreakerRegistry, breaker_key
    from loadbear.storage.db import open_database, sqlite_path

    catalog = Catalog.from_settings(settings.models, default_model=settings.default_model)
    db = None
    if settings.breaker_store in ("auto", "database") and not settings.redis_url and (
            not settings.is_sqlite or os.path.exists(sqlite_path(settings.database_url))):
        # The servers' shared breaker state is in the database; never create a SQLite file to look.
        db = open_database(settings.database_url, settings.pg_app_role, 2,
                           app_url=getattr(settings, "database_app_url", None))
    try:
        breakers = BreakerRegistry.from_settings(settings, db=db)
        rows = [
            {"model": m.name, "provider": m.provider, "upstream_model": m.upstream_model, "tier": m.tier,
             "fallbacks": m.fallbacks, "max_retries": m.max_retries,
             "timeouts": {"connect": m.timeouts.connect, "first_token": m.timeouts.first_token,
                          "idle": m.timeouts.idle, "total": m.timeouts.total},
             **breakers.snapshot(breaker_key(m))}
            for m in catalog
        ]
    finally:
        if db is not None:
            db.close()
    if breakers.backend == "redis":
        note = "breaker state from Redis (LOADBEAR_REDIS_URL), shared by every replica"
    elif breakers.backend == "database":
        note = ("breaker state from the database, shared by every replica on it; "
                "error rates and latency are per server process: use --url to see a running server's")
    else:
        note = ("breaker state lives inside each server process (no database found, or breaker_store = memory); "
                "use --url to see a running server's")
    return rows, note


@app.command()
def providers(
    url: Optional[str] = typer.Option(None, "--url", help="A running server (reads GET /admin/providers)."),
    admin_key: Optional[str] = typer.Option(None, "--admin-key", help="Admin key (default LOADBEAR_ADMIN_KEY)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """The model catalog with each model's breaker state, recent error rate and latency."""
    settings = Settings.load()
    if url:
        rows = _fetch_providers(url, admin_key or settings.admin_key)
        store = rows[0].get("breaker_store") if rows else None
        note = f"live from {url}" + (f"; breaker state: {store}" if store else "")
    else:
        from loadbear.config.catalog import CatalogError

        try:
            rows, note = _local_providers(settings)
        except CatalogError as exc:  # a loadbear.toml mistake: say which, not a traceback
            _fail(f"model catalog: {exc}")
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    colors = {"closed": "green", "open": "red", "half_open": "yellow"}
    table = Table(title="providers", caption=note)
    for col in ("model", "provider", "upstream", "tier", "fallbacks", "breaker", "trips", "calls (5 min)",
                "error rate", "p50 ms", "p95 ms"):
        table.add_column(col, justify="right" if col in ("trips", "calls (5 min)", "error rate", "p50 ms", "p95 ms") else "left")
    for r in rows:
        state = r.get("breaker", "closed")
        rate = r.get("error_rate")
        table.add_row(
            r["model"], r["provider"], str(r.get("upstream_model") or ""), str(r.get("tier") or ""),
            " → ".join(r.get("fallbacks") or []) or "—",
            f"[{colors.get(state, 'white')}]{state}[/]", str(r.get("trips", 0)), str(r.get("calls", 0)),
            "—" if rate is None else f"{rate:.1%}",
            "—" if r.get("p50_latency_ms") is None else str(r["p50_latency_ms"]),
            "—" if r.get("p95_latency_ms") is None else str(r["p95_latency_ms"]),
        )
    Console(width=160).print(table)


if __name__ == "__main__":  # pragma: no cover
    app()
