"""The CLI commands that scripts rely on, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadbear.ledger.records import AttemptRecord, InteractionRecord
from loadbear.storage.values import utcnow, uuid7


def run(args, db_url, check=True):
    env = {**os.environ, "LOADBEAR_DATABASE_URL": db_url}
    env.pop("LOADBEAR_CONFIG", None)
    p = subprocess.run([sys.executable, "-m", "loadbear.cli", *args], capture_output=True, text=True, env=env,
                       timeout=180)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_tenants_keys_usage(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    created = json.loads(run(["tenants", "create", "acme", "--name", "Acme", "--json"], url).stdout)
    assert created["slug"] == "acme" and created["name"] == "Acme"
    dup = run(["tenants", "create", "acme", "--json"], url, check=False)
    assert dup.returncode == 2 and "already exists" in dup.stderr
    listed = json.loads(run(["tenants", "list", "--json"], url).stdout)
    assert [t["slug"] for t in listed] == ["acme"]

    key = json.loads(run(["keys", "create", "--tenant", "acme", "--name", "ci", "--json"], url).stdout)
    assert key["key"].startswith("lb_") and key["tenant"] == "acme"
    keys = json.loads(run(["keys", "list", "--tenant", "acme", "--json"], url).stdout)
    assert [k["prefix"] for k in keys] == [key["prefix"]] and keys[0]["revoked_at"] is None
    missing = run(["keys", "create", "--tenant", "nope", "--json"], url, check=False)
    assert missing.returncode == 2 and "no tenant" in missing.stderr
    revoked = json.loads(run(["keys", "revoke", key["prefix"], "--tenant", "acme", "--json"], url).stdout)
    assert revoked["revoked_at"]

    # usage reads the rollups the writer maintains
    from loadbear.ledger.writer import LedgerWriter
    from loadbear.storage.db import open_database

    db = open_database(url)
    w = LedgerWriter(db, dead_letter_path=tmp_path / "dl.jsonl")
    now = utcnow()
    for i in range(3):
        w.submit(InteractionRecord(id=uuid7(), tenant_id=created["id"], feature="chat", requested_model="gpt-4o-mini",
                                   model="gpt-4o-mini", status="ok", created_at=now, latency_ms=10, prompt_tokens=100,
                                   completion_tokens=50, cost_micro_usd=45,
                                   attempts=[AttemptRecord(1, "openai", "gpt-4o-mini", "gpt-4o-mini", "ok", now, 10)]))
    w.close()
    db.close()
    report = json.loads(run(["usage", "--tenant", "acme", "--by", "model", "--json"], url).stdout)
    assert report["data"][0]["model"] == "gpt-4o-mini" and report["totals"]["requests"] == 3
    assert report["totals"]["cost_micro_usd"] == 135
    table = run(["usage", "--tenant", "acme", "--by", "day"], url).stdout
    assert "total" in table and "0.000135" in table
    bad = run(["usage", "--tenant", "acme", "--by", "colour"], url, check=False)
    assert bad.returncode == 2 and "group_by" in bad.stderr


def test_migrate_and_demo(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    assert "applied migrations" in run(["migrate"], url).stdout
    assert "up to date" in run(["migrate"], url).stdout
    docs = tmp_path / "helpcentre"
    (docs / "billing").mkdir(parents=True)
    (docs / "billing" / "refunds.md").write_text("# Refunds\n\nRefunds are possible within 14 days.\n")
    (docs / "broken.pdf").write_bytes(b"not a pdf")
    out = run(["demo", "--docs", str(docs)], url).stdout
    assert "Demo tenant 'demo' ready" in out and "curl" in out and "lb_" in out
    assert "Loaded 1 document(s), 1 skipped" in out
    out2 = run(["demo", "--docs", str(docs)], url).stdout  # idempotent: adds a key, not a tenant or documents
    assert "ready" in out2 and "Loaded" not in out2
    from loadbear import Gateway, Settings

    gw = Gateway(Settings.load(env={}, database_url=url))
    try:
        t = gw.tenants.get_tenant("demo")
        documents, _ = gw.knowledge.list(t.id)
        assert [d.external_id for d in documents] == ["billing/refunds.md"]
    finally:
        gw.close()
    assert len(json.loads(run(["keys", "list", "--tenant", "demo", "--json"], url).stdout)) == 2


def test_simulate_command_serves(tmp_path: Path):
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loadbear.cli", "simulate", "--port", str(port), "--seed", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                               json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "no start"
                time.sleep(0.1)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_setup_demo_is_callable_from_python(tmp_path: Path, monkeypatch, capsys):
    """`loadbear run` calls the demo set-up directly: it must not depend on Typer's defaults."""
    from loadbear.cli import setup_demo

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "hello.md").write_text("# Hello\n\nSupport is open on weekdays.\n")
    monkeypatch.setenv("LOADBEAR_DATABASE_URL", f"sqlite:///{tmp_path / 'py.db'}")
    setup_demo("demo", str(docs))
    setup_demo()  # the defaults are plain values too (a missing folder is simply skipped)
    out = capsys.readouterr().out
    assert "Dashboard: http://" in out and "/dashboard" in out
    from loadbear import Gateway, Settings

    gw = Gateway(Settings.load())
    try:
        # The demo shows the response cache at work; other tenants opt in.
        assert gw.tenants.get_tenant("demo").settings.cache_enabled is True
    finally:
        gw.close()
