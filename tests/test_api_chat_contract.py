"""The chat API's contract details that the broader chat tests leave implicit: generation
parameters reach the upstream, the interaction id is in the header of non-streamed answers,
every request leaves one complete ledger row on both backends, /v1/models agrees with what chat
accepts, the catalog built from provider environment variables serves for real, and the
`loadbear simulate` command passes every flag through."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import sim_models
from loadbear.config.catalog import Catalog, CatalogError

MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do refunds work?"}]


def test_generation_parameters_reach_the_openai_upstream(stack, simulator):
    client = stack.openai()
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG, temperature=0.3, max_tokens=5,
                                   stop=["END", "STOP"], user="end-user-7", top_p=0.9)
    sent = simulator.requests[-1].body
    assert sent["model"] == "gpt-4o-mini" and sent["messages"] == MSG
    assert sent["temperature"] == 0.3 and sent["top_p"] == 0.9
    assert sent["max_tokens"] == 5 and sent["stop"] == ["END", "STOP"] and sent["user"] == "end-user-7"
    assert "stream" not in sent

    list(client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True, stop="END"))
    sent = simulator.requests[-1].body
    # loadbear always asks the upstream for stream usage, whatever the client asked for.
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["stop"] == ["END"]
    rows = stack.rows()
    assert len(rows) == 2 and all(not r["tokens_estimated"] for r in rows), "usage came from the upstream"


def test_generation_parameters_reach_the_anthropic_upstream(stack, simulator):
    out = stack.openai().chat.completions.create(model="claude-3-5-haiku-latest", messages=MSG, temperature=0.4,
                                                 max_tokens=3, stop="END", user="end-user-8")
    sent = simulator.requests[-1].body
    assert simulator.requests[-1].path == "/v1/messages"
    assert sent["system"] == "Be brief." and sent["messages"] == [{"role": "user", "content": "How do refunds work?"}]
    assert sent["temperature"] == 0.4 and sent["max_tokens"] == 3
    assert sent["stop_sequences"] == ["END"] and sent["metadata"] == {"user_id": "end-user-8"}
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


def test_non_streamed_answer_carries_the_interaction_id_header(stack):
    raw = stack.openai().chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
    out = raw.parse()
    assert raw.headers["x-loadbear-interaction-id"] == out.id
    assert raw.headers["x-loadbear-model"] == "gpt-4o-mini"
    assert [str(r["id"]) for r in stack.rows()] == [out.id]


def test_one_complete_ledger_row_per_request_on_both_backends(stack_factory, simulator, db_url):
    s = stack_factory(sim_models(simulator.url), db_url=db_url)
    client = s.openai()
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=MSG, user="u-1")
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed_id = chunks[0].id
    usage = chunks[-1].usage
    rows = {str(r["id"]): r for r in s.rows()}
    assert set(rows) == {plain.id, streamed_id}
    for rid, u, streamed in ((plain.id, plain.usage, False), (streamed_id, usage, True)):
        row = rows[rid]
        assert row["status"] == "ok" and bool(row["streamed"]) is streamed and row["feature"] == "chat"
        assert row["prompt_tokens"] == u.prompt_tokens > 0 and row["completion_tokens"] == u.completion_tokens > 0
        assert row["cost_micro_usd"] == round(u.prompt_tokens * 0.15 + u.completion_tokens * 0.60) > 0
        assert row["latency_ms"] is not None and row["latency_ms"] >= 0
        assert row["ttft_ms"] is not None and 0 <= row["ttft_ms"] <= row["latency_ms"]
        assert not row["tokens_estimated"]
        assert len(s.attempts(rid)) == 1
    assert rows[plain.id]["user_id"] is not None and rows[streamed_id]["user_id"] is None


def test_models_list_leaves_out_forbidden_tiers(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), tenant_settings={"forbidden_tiers": ["complex"]})
    ids = {m.id for m in s.openai().models.list().data}
    assert "gpt-4o" not in ids, "a model the tenant may not call must not be listed"
    assert {"gpt-4o-mini", "claude-3-5-haiku-latest", "local"} <= ids
    with pytest.raises(openai.PermissionDeniedError):
        s.openai().chat.completions.create(model="gpt-4o", messages=MSG)
    # every listed model is one chat accepts
    for model in sorted(ids):
        assert s.openai().chat.completions.create(model=model, messages=MSG).choices[0].message.content


def test_catalog_refuses_an_unknown_provider_kind():
    with pytest.raises(CatalogError, match="model 'typo': unknown provider kind 'openia'"):
        Catalog.from_settings({"typo": {"provider": "openia"}}, env={})
    cat = Catalog.from_settings({"llama": {"provider": "ollama", "base_url": "http://127.0.0.1:11434/v1"},
                                 "az": {"provider": "azure", "base_url": "https://x.openai.azure.com/openai/deployments/d"}},
                                env={})
    assert {"llama", "az"} <= set(cat.names())


def _env_gateway(monkeypatch, tmp_path: Path, env: dict[str, str]):
    """A server built the way `loadbear serve` builds it: settings and catalog from the environment."""
    from loadbear import Gateway, Settings
    from loadbear.api.app import create_app
    from loadbear.testing.server import ServerThread

    for var in list(os.environ):
        if var.startswith("LOADBEAR_") or var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY",
                                                   "ANTHROPIC_BASE_URL"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)  # no ./loadbear.toml
    monkeypatch.setenv("LOADBEAR_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.setenv("LOADBEAR_LEDGER_FLUSH_INTERVAL_MS", "5")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    gw = Gateway.from_settings(Settings.load())
    gw.migrate()
    gw.tenants.create_tenant("acme")
    _, key = gw.tenants.create_key("acme", "t")
    server = ServerThread(create_app(gw, own_gateway=True)).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    return gw, server, client


def test_provider_keys_in_the_environment_serve_through_their_base_urls(monkeypatch, tmp_path, simulator):
    gw, server, client = _env_gateway(monkeypatch, tmp_path, {
        "OPENAI_API_KEY": "sk-env-openai", "OPENAI_BASE_URL": simulator.url + "/v1",
        "ANTHROPIC_API_KEY": "sk-ant-env", "ANTHROPIC_BASE_URL": simulator.url,
    })
    try:
        ids = {m.id for m in client.models.list().data}
        assert {"gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-latest", "local"} <= ids
        for model in ("gpt-4o", "gpt-4o-mini"):
            out = client.chat.completions.create(model=model, messages=MSG)
            assert out.model == model and out.choices[0].message.content.startswith("Simulated answer")
            rec = simulator.requests[-1]
            assert rec.path == "/v1/chat/completions" and rec.body["model"] == model
            assert rec.headers["authorization"] == "Bearer sk-env-openai"
        out = client.chat.completions.create(model="claude-3-5-haiku-latest", messages=MSG)
        rec = simulator.requests[-1]
        assert out.model == "claude-3-5-haiku-latest" and rec.path == "/v1/messages"
        assert rec.headers["x-api-key"] == "sk-ant-env"
        # "auto" without routing rules: the catalog's default chain, led by gpt-4o-mini
        assert client.chat.completions.create(model="auto", messages=MSG).model == "gpt-4o-mini"
        assert len(simulator.requests) == 4
    finally:
        server.stop()


def test_without_provider_keys_the_local_model_serves(monkeypatch, tmp_path, simulator):
    gw, server, client = _env_gateway(monkeypatch, tmp_path, {})
    try:
        assert [m.id for m in client.models.list().data] == ["local"]
        out = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hello"}])
        assert out.model == "local" and "offline" in out.choices[0].message.content.lower()
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        gw.ledger.flush(10)
        with gw.db.system_tx(write=False) as c:
            rows = c.fetchall("SELECT provider, tokens_estimated, status FROM ai_interactions")
        assert [(r["provider"], bool(r["tokens_estimated"]), r["status"]) for r in rows] == [("local", True, "ok")]
        assert simulator.requests == [], "nothing leaves the machine"
    finally:
        server.stop()


def test_simulate_command_passes_every_flag_through():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadbear.cli", "simulate", "--port", str(port), "--latency-ms", "40:60",
         "--tokens-per-second", "400", "--fault-rate", "0.5", "--faults", "rate_limit,unavailable", "--seed", "11"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/_sim/health")
                break
            except httpx.ConnectError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "the simulator did not start"
                time.sleep(0.1)
        config = httpx.post(base + "/_sim/config", json={}).json()["config"]
        assert config["latency_ms"] == [40.0, 60.0] and config["tokens_per_second"] == 400.0
        assert config["fault_rate"] == 0.5 and config["faults"] == ["rate_limit", "unavailable"]
        assert config["seed"] == 11

        def outcomes() -> list[int]:
            got = []
            for _ in range(8):
                t0 = time.monotonic()
                r = httpx.post(base + "/v1/chat/completions",
                               json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                assert time.monotonic() - t0 >= 0.04, "the latency range applies"
                if r.status_code == 429:
                    assert r.headers["retry-after"]
                got.append(r.status_code)
            return got

        first = outcomes()
        assert set(first) <= {200, 429, 503} and 200 in first and len(set(first)) > 1
        assert httpx.post(base + "/_sim/reset").status_code == 200
        assert outcomes() == first, "the same seed gives the same faults"
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode is not None


def test_simulate_command_refuses_bad_flags():
    r = subprocess.run([sys.executable, "-m", "loadbear.cli", "simulate", "--faults", "bogus"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown fault kind 'bogus'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "loadbear.cli", "simulate", "--latency-ms", "slow"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "expected MIN:MAX milliseconds" in r.stderr
