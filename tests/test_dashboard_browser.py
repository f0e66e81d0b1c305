"""The dashboard in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): every
page against a seeded server, numbers checked against the ledger, filters and an interaction's
detail clicked through, and a tenant key that must never show another tenant.

Screenshots are saved as test artifacts (a temporary directory, printed in the report); with
``LOADBEAR_SCREENSHOT_DIR=docs/screenshots`` the same run regenerates the README's images.
Without /usr/bin/chromium the tests skip, unless ``LOADBEAR_REQUIRE_BROWSER=1`` (CI), where they
fail instead: install it with ``scripts/install-chromium.sh``.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from conftest import Stack, sim_models
from loadbear.dashboard.metrics import percentile
from loadbear.dashboard.seed import SeedPlan, seed_eval_runs, seed_history
from loadbear.gateway.breaker import breaker_key
from loadbear.storage.values import utcnow

CHROMIUM = "/usr/bin/chromium"
REQUIRE = bool(os.environ.get("LOADBEAR_REQUIRE_BROWSER"))

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None

if sync_playwright is None or not os.path.exists(CHROMIUM):
    reason = ("browser tests need Debian's chromium at /usr/bin/chromium (scripts/install-chromium.sh) and the "
              "playwright package (pip install -e '.[dev]')")
    if REQUIRE:
        raise RuntimeError(f"LOADBEAR_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason, allow_module_level=True)

DAYS = 14


def usd(micro: int) -> str:
    v = Decimal(int(micro)) / Decimal(1_000_000)
    places = Decimal("0.01") if abs(v) >= 1 or v == 0 else Decimal("0.0001")
    return "$" + f"{v.quantize(places, rounding=ROUND_HALF_UP):,}"


def pct_texts(r: float) -> set[str]:
    """What the page may show for a ratio (either rounding when it sits on a half)."""
    x = r * 1000
    lo, hi = math.floor(x + 1e-9) / 10, math.ceil(x - 1e-9) / 10
    return {f"{lo:.1f}%", f"{hi:.1f}%"}


class Seeded:
    def __init__(self, tmp: Path) -> None:
        from loadbear.testing import UpstreamSimulator

        self.sim = UpstreamSimulator(seed=7).start()
        self.stack = Stack(f"sqlite:///{tmp / 'dash.db'}", sim_models(self.sim.url),
                           tenant_settings={"store_content": True, "monthly_budget_usd": 5})
        gw = self.stack.gateway
        self.stack.add_tenant("globex", {"monthly_budget_usd": 2})
        self.stack.add_tenant("initech")
        gw.tenants.update_settings("globex", {})
        self.tenants = {t.slug: t for t in gw.tenants.list_tenants()}
        self.keys = {slug: gw.tenants.create_key(slug, "dashboard", ["usage:read"])[1] for slug in ("acme", "globex")}
        self.seeded = seed_history(gw, self.tenants, SeedPlan(days=DAYS))
        # A few real requests through the gateway (the official SDK against the simulator).
        client = self.stack.openai()
        for n in range(3):
            client.chat.completions.create(model="gpt-4o-mini", user="acm-user-01",
                                           messages=[{"role": "user", "content": f"Real question {n}?"}],
                                           extra_headers={"X-Loadbear-Feature": "support-chat"})
        stream = client.chat.completions.create(model="gpt-4o-mini", stream=True, user="acm-user-02",
                                                messages=[{"role": "user", "content": "Stream it"}])
        for _ in stream:
            pass
        gw.ledger.flush(10)
        self.runs = seed_eval_runs(gw.db, self.tenants["acme"])
        # The provider "started failing at 3 a.m.": gpt-4o's breaker is open.
        # (In a thread: Playwright's sync API may already run an event loop in this one.)
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        async def trip():
            for _ in range(gw.breakers.threshold):
                await gw.breakers.record(breaker_key(gw.catalog.get("gpt-4o")), False, 10)

        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, trip()).result()
        today = utcnow().date()
        self.start, self.end = today - timedelta(days=DAYS - 1), today

    def sql(self, sql: str, params=()):
        with self.stack.gateway.db.system_tx(write=False) as c:
            return c.fetchall(sql, params)

    def usage(self, slug: str | None = None):
        where, args = "day >= ? AND day <= ?", [self.start.isoformat(), self.end.isoformat()]
        if slug:
            where += " AND tenant_id = ?"
            args.append(self.tenants[slug].id)
        return self.sql(f"SELECT * FROM usage_daily WHERE {where}", args)

    def raw(self, slug: str | None = None):
        where, args = "created_at >= ? AND json_extract(metadata, '$.eval_run') IS NULL", [self.start.isoformat()]
        if slug:
            where += " AND tenant_id = ?"
            args.append(self.tenants[slug].id)
        return self.sql(f"SELECT * FROM ai_interactions WHERE {where}", args)

    def user_id(self, external_id: str):
        return self.sql("SELECT id FROM users WHERE external_id = ?", (external_id,))[0]["id"]

    def close(self) -> None:
        self.stack.close()
        self.sim.stop()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    s = Seeded(tmp_path_factory.mktemp("dash-browser"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    target = os.environ.get("LOADBEAR_SCREENSHOT_DIR")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def open_dashboard(browser, seeded):
    contexts = []

    def open_(key: str):
        ctx = browser.new_context(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
        contexts.append(ctx)
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.errors = errors
        page.goto(seeded.stack.url + "/dashboard/")
        page.fill("#key-input", key)
        page.click("#login-button")
        wait_page(page, "overview")
        return page

    yield open_
    for ctx in contexts:
        ctx.close()


def wait_page(page, name: str) -> None:
    page.wait_for_selector(f"#view[data-page='{name}']:not([data-loading])", timeout=10_000)


def go(page, name: str) -> None:
    page.click(f"a.nav-link[data-page='{name}']")
    wait_page(page, name)


def kpi(page, name: str) -> tuple[str, str]:
    el = page.locator(f"[data-kpi='{name}']")
    return el.get_attribute("data-value"), el.locator(".kpi-value").inner_text()


def test_wrong_key_is_refused(browser, seeded):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(seeded.stack.url + "/dashboard/")
    page.fill("#key-input", "lb_not_a_real_key")
    page.click("#login-button")
    expect(page.locator("#login-error")).to_contain_text("key")
    assert page.locator("#view").count() == 0
    # A real key without the usage:read scope says so.
    chat_only = seeded.stack.gateway.tenants.create_key("acme", "chat only", ["chat"])[1]
    page.fill("#key-input", chat_only)
    page.click("#login-button")
    expect(page.locator("#login-error")).to_contain_text("usage:read")
    assert page.locator("#view").count() == 0
    ctx.close()


def test_admin_walks_every_page(open_dashboard, seeded, shots):
    page = open_dashboard(seeded.stack.admin_key)

    # Overview: spend, tokens, requests against the rollups; savings against the raw rows.
    usage, raw = seeded.usage(), seeded.raw()
    cost = sum(r["cost_micro_usd"] for r in usage)
    assert kpi(page, "cost") == (str(cost), usd(cost))
    requests = sum(r["requests"] for r in usage)
    assert kpi(page, "requests") == (str(requests), f"{requests:,}")
    cache_saved = sum(r["saved_micro_usd"] for r in raw if r["cached"])
    assert kpi(page, "saved-cache") == (str(cache_saved), usd(cache_saved))
    routing = sum(r["saved_micro_usd"] for r in raw if not r["cached"])
    assert kpi(page, "saved-routing")[0] == str(routing)
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in usage)
    assert kpi(page, "tokens")[0] == str(tokens) and tokens > 0
    models = {r["model"] for r in usage}
    legend = page.locator("#spend-chart .legend-item").all_inner_texts()
    assert set(legend) == models
    assert page.locator("#spend-chart rect.bar").count() >= DAYS
    page.screenshot(path=str(shots / "overview.png"), full_page=True)
    page.click("#group-toggle button[data-group='feature']")
    wait_page(page, "overview")
    expect(page.locator("#group-toggle button.on")).to_have_text("By feature")
    assert set(page.locator("#spend-chart .legend-item").all_inner_texts()) == {r["feature"] for r in usage}

    # Tenants: spend per tenant, budgets.
    go(page, "tenants")
    for slug in ("acme", "globex", "initech"):
        spend = sum(r["cost_micro_usd"] for r in seeded.usage(slug))
        row = page.locator(f"table[data-table='tenants'] tr[data-id='{slug}']")
        assert row.locator("[data-cost]").get_attribute("data-cost") == str(spend)
        assert row.locator("[data-cost]").inner_text() == usd(spend)
    expect(page.locator("table[data-table='tenants'] tr[data-id='initech']")).to_contain_text("no budget")
    expect(page.locator("table[data-table='tenants'] tr[data-id='acme']")).to_contain_text("of $5.00")
    assert page.locator("[data-tenant-card]").count() == 3
    # Top features and users by cost, as the rollups rank them.
    for table_name, col in (("features", "feature"), ("users", "user_external_id")):
        cost_by: dict[str, int] = {}
        for r in seeded.usage("acme"):
            if r[col]:
                cost_by[r[col]] = cost_by.get(r[col], 0) + r["cost_micro_usd"]
        top = sorted(cost_by.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        shown = [row.locator("td").all_inner_texts() for row in
                 page.locator(f"[data-tenant-card='acme'] table[data-table='{table_name}'] tbody tr").all()]
        assert [(cells[0], cells[2]) for cells in shown] == [(name, usd(c)) for name, c in top], table_name
    page.screenshot(path=str(shots / "tenants.png"), full_page=True)

    # Reliability: rates and the open breaker.
    go(page, "reliability")
    errors = sum(1 for r in raw if r["status"] == "error")
    value, text = kpi(page, "error-rate")
    assert float(value) == round(errors / len(raw), 4) and text in pct_texts(errors / len(raw))
    degraded = sum(1 for r in raw if r["status"] == "degraded")
    assert float(kpi(page, "degraded-rate")[0]) == round(degraded / len(raw), 4)
    expect(page.locator("[data-breaker='gpt-4o']")).to_have_text("open")
    expect(page.locator("[data-breaker='gpt-4o-mini']")).to_have_text("closed")
    # Percentiles of uncached answers (a cache hit made no upstream call).
    timed = [r for r in raw if r["status"] in ("ok", "degraded") and not r["cached"]]
    assert kpi(page, "latency-p50")[0] == str(percentile(sorted(r["latency_ms"] for r in timed), 50))
    assert kpi(page, "ttft-p50")[0] == str(percentile(sorted(r["ttft_ms"] for r in timed if r["ttft_ms"] is not None), 50))
    assert page.locator("#latency-chart path.line").count() == 2
    page.screenshot(path=str(shots / "reliability.png"), full_page=True)

    # Cache.
    go(page, "cache")
    hits = sum(1 for r in raw if r["cached"])
    value, text = kpi(page, "hit-rate")
    assert float(value) == round(hits / len(raw), 4) and text in pct_texts(hits / len(raw))
    assert kpi(page, "hits")[0] == str(hits)
    page.screenshot(path=str(shots / "cache.png"), full_page=True)

    # Evaluations: the runs and a side-by-side comparison.
    go(page, "evals")
    assert page.locator("table[data-table='runs'] tbody tr").count() == 2
    page.click("#compare-button")
    page.wait_for_selector("table[data-table='compare-metrics']")
    expect(page.locator("[data-flips='regressions']")).to_contain_text("case-03")
    expect(page.locator("[data-run='a']")).to_contain_text("baseline")
    expect(page.locator("[data-run='b']")).to_contain_text("rerank-v2")
    base, new = seeded.runs
    metric_rows = {cells[0]: cells for cells in (row.locator("td").all_inner_texts() for row in
                   page.locator("table[data-table='compare-metrics'] tbody tr").all())}
    for name in ("pass_rate", "retrieval.recall@5"):
        a, b = base["summary"]["metrics"][name], new["summary"]["metrics"][name]
        assert float(metric_rows[name][1]) == pytest.approx(a, abs=5e-5), name
        assert float(metric_rows[name][2]) == pytest.approx(b, abs=5e-5), name
    page.screenshot(path=str(shots / "evals.png"), full_page=True)
    assert page.errors == []


def test_interactions_filters_and_detail(open_dashboard, seeded, shots):
    page = open_dashboard(seeded.stack.admin_key)
    page.select_option("#tenant-select", "acme")
    wait_page(page, "overview")
    go(page, "interactions")
    rows = page.locator("table[data-table='interactions'] tbody tr")
    assert rows.count() == 25
    page.screenshot(path=str(shots / "interactions.png"), full_page=True)

    page.click("#older")
    wait_page(page, "interactions")
    expect(page.locator("#page-no")).to_have_text("Page 2")
    page.click("#newer")
    wait_page(page, "interactions")

    acme = seeded.raw("acme")
    page.select_option("select[data-filter='status']", "error")
    wait_page(page, "interactions")
    errors = [r for r in acme if r["status"] == "error"]
    assert rows.count() == min(25, len(errors)) > 0
    assert all("error" in t for t in rows.all_inner_texts())
    page.select_option("select[data-filter='status']", "")
    wait_page(page, "interactions")
    page.select_option("select[data-filter='cached']", "true")
    wait_page(page, "interactions")
    assert rows.count() == min(25, sum(1 for r in acme if r["cached"]))
    page.click("#clear-filters")
    wait_page(page, "interactions")
    page.select_option("select[data-filter='user']", "acm-user-01")
    wait_page(page, "interactions")
    assert rows.count() == min(25, sum(1 for r in acme if r["user_id"] == seeded.user_id("acm-user-01"))) > 0
    assert all("acm-user-01" in t for t in rows.all_inner_texts())
    page.click("#clear-filters")
    wait_page(page, "interactions")
    # A one-day window with the date inputs.
    day = (seeded.end - timedelta(days=3)).isoformat()
    for name in ("from", "to"):
        page.fill(f"input[data-filter='{name}']", day)
        wait_page(page, "interactions")
    assert rows.count() == min(25, sum(1 for r in acme if r["created_at"][:10] == day)) > 0
    assert all(t.startswith(day) for t in page.locator(
        "table[data-table='interactions'] tbody tr td:first-child").all_inner_texts())
    page.click("#clear-filters")
    wait_page(page, "interactions")

    # A fallback: two attempts, the cost of the one that answered.
    fb = next(r for r in acme if r["attempt_count"] == 2 and r["status"] == "ok" and r["retrieved_chunk_ids"] is None)
    page.select_option("select[data-filter='feature']", fb["feature"])
    wait_page(page, "interactions")
    page.goto(seeded.stack.url + f"/dashboard/#/interactions/{fb['id']}")
    page.wait_for_selector(f"#interaction-detail[data-id='{fb['id']}']")
    assert page.locator("table[data-table='attempts'] tbody tr").count() == 2
    assert kpi(page, "detail-cost") == (str(fb["cost_micro_usd"]), usd(fb["cost_micro_usd"]))
    expect(page.locator("#prompt-text")).to_have_text(fb["prompt_text"])
    expect(page.locator("#response-text")).to_have_text(fb["response_text"])
    assert kpi(page, "detail-latency")[0] == str(fb["latency_ms"])
    assert kpi(page, "detail-tokens")[0] == str(fb["prompt_tokens"] + fb["completion_tokens"])

    # Opening a row from the list: a grounded answer with its sources and feedback.
    grounded = seeded.sql("SELECT i.id, i.feature FROM ai_interactions i JOIN feedback f ON f.interaction_id = i.id"
                          " WHERE i.retrieved_chunk_ids IS NOT NULL ORDER BY i.created_at DESC LIMIT 1")
    page.goto(seeded.stack.url + "/dashboard/#/interactions")
    wait_page(page, "interactions")
    page.click("#clear-filters")
    wait_page(page, "interactions")
    target = grounded[0]["id"] if grounded else None
    if target:
        page.goto(seeded.stack.url + f"/dashboard/#/interactions/{target}")
    else:
        rows.first.click()
    page.wait_for_selector("#interaction-detail")
    if target:
        assert page.locator("#sources li").count() == 2
        expect(page.locator("#sources")).to_contain_text("Help centre")
        assert page.locator("#feedback-list li").count() >= 1
    page.screenshot(path=str(shots / "interaction.png"), full_page=True)
    page.click("a.back")
    wait_page(page, "interactions")
    rows.first.click()
    page.wait_for_selector("#interaction-detail")
    assert page.errors == []


def test_tenant_key_sees_only_its_tenant(open_dashboard, seeded, shots):
    page = open_dashboard(seeded.keys["globex"])
    assert page.locator("#tenant-select").count() == 0
    expect(page.locator("#who")).to_contain_text("globex")
    own = seeded.usage("globex")
    cost = sum(r["cost_micro_usd"] for r in own)
    assert kpi(page, "cost") == (str(cost), usd(cost))
    foreign = ("acm-user", "ini-user", "Acme", "initech", "baseline")
    for name in ("overview", "tenants", "reliability", "cache", "interactions", "evals"):
        go(page, name)
        text = page.locator("body").inner_text()
        assert not any(f in text for f in foreign), name
    assert page.locator("[data-tenant-card]").count() == 0 or page.locator("[data-tenant-card='globex']").count() == 1
    go(page, "tenants")
    assert page.locator("table[data-table='tenants'] tbody tr").count() == 1
    go(page, "interactions")
    assert page.locator("table[data-table='interactions'] th", has_text="Tenant").count() == 0
    page.locator("table[data-table='interactions'] tbody tr").first.click()
    page.wait_for_selector("#interaction-detail")
    expect(page.locator("#content-hidden")).to_be_visible()  # globex does not store content
    # Another tenant's interaction by URL: refused by the server, nothing shown.
    acme_id = seeded.seeded["interactions"]["acme"][0]
    page.goto(seeded.stack.url + f"/dashboard/#/interactions/{acme_id}")
    expect(page.locator("#page-error")).to_contain_text("No interaction")
    assert page.locator("#interaction-detail").count() == 0
    assert not any(f in page.locator("body").inner_text() for f in foreign)
    # Even with the admin's tenant preference forced into storage, the server answers 403.
    page.evaluate("""() => sessionStorage.setItem('loadbear.dashboard.prefs', JSON.stringify({tenant: 'acme', days: 14}))""")
    page.goto(seeded.stack.url + "/dashboard/#/overview")
    page.reload()
    wait_page(page, "overview")
    assert kpi(page, "cost") == (str(cost), usd(cost))
    status = page.evaluate("""async (key) => (await fetch('/dashboard/api/overview?tenant=acme',
        {headers: {Authorization: 'Bearer ' + key}})).status""", seeded.keys["globex"])
    assert status == 403
