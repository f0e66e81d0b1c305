"""Reliability details the main fault suites leave implicit: the per-model *connect* timeout
against an upstream that never completes the TCP handshake, a 404 from the upstream failing over
at once, the retry settings reaching the executor, bad fallback configuration refused with a
clear error (catalog and tenant settings, the latter through the admin API), a tenant override
changed at run time, and the fault ledger (failover, degraded, mid-stream error with its cost,
client fault) on both backends.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Iterator

import httpx
import openai
import pytest

from loadbear.config.catalog import Catalog, CatalogError
from loadbear.testing import Fault
from test_faults import (
    DEGRADED_TEXT,
    FAST,
    GPT4O_REPLY,
    HAIKU_REPLY,
    MESSAGES,
    MINI_REPLY,
    NO_LOCAL,
    chat,
    fault,
    fault_models,
    interaction,
    make_stack,
    shared_simulator,  # noqa: F401  (fixtures)
    simulator,  # noqa: F401
    upstream_calls,
    wait_rows,
)
from test_faults_stream import raw_stream


# -- connect timeout --------------------------------------------------------------------------


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A listening socket whose accept queue is full: the kernel drops further SYNs, so a
    connect neither succeeds nor is refused — it hangs, as behind a dead load balancer."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fill = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fill.append(c)
    time.sleep(0.05)
    probe = socket.socket()
    probe.settimeout(0.2)
    try:
        probe.connect(("127.0.0.1", port))
        pytest.skip("this kernel completes connects beyond the accept queue")
    except TimeoutError:
        pass
    finally:
        probe.close()
    yield f"http://127.0.0.1:{port}"
    for c in fill:
        c.close()
    srv.close()


@pytest.mark.parametrize("stream", [False, True])
def test_connect_timeout_is_a_retryable_failure_then_failover(stack_factory, simulator, blackhole, stream):
    # first_token and total far above connect: only the connect deadline can end these attempts.
    models = fault_models(simulator, **{"gpt-blackhole": {
        "provider": "openai", "base_url": blackhole + "/v1", "api_key": "sk", "max_retries": 1,
        "fallbacks": ["gpt-4o-mini"], "timeouts": {"connect": 0.3, "first_token": 4.0, "idle": 4.0, "total": 8.0}}})
    stack = make_stack(stack_factory, simulator, models=models)
    started = time.monotonic()
    if stream:
        sse = raw_stream(stack, model="gpt-blackhole")
        assert sse.status == 200 and sse.done and sse.content == MINI_REPLY
    else:
        out = chat(stack, model="gpt-blackhole").parse()
        assert out.model == "gpt-4o-mini" and out.choices[0].message.content == MINI_REPLY
    assert time.monotonic() - started < 2.0
    row = interaction(stack)
    attempts = stack.attempts(row["id"])
    assert [(a["model"], a["status"], a["error_type"]) for a in attempts] == [
        ("gpt-blackhole", "error", "timeout"), ("gpt-blackhole", "error", "timeout"), ("gpt-4o-mini", "ok", None)]
    assert all(250 <= a["latency_ms"] < 1000 for a in attempts[:2]), [a["latency_ms"] for a in attempts]
    assert "connect" in attempts[0]["error"]
    assert (row["status"], row["model"], row["attempt_count"]) == ("ok", "gpt-4o-mini", 3)
    assert [c.model for c in upstream_calls(simulator)] == ["gpt-4o-mini"]


# -- 404 from the upstream -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_model_not_found_fails_over_at_once(stack_factory, simulator, stream):
    """A 404 is our catalog's mistake, not a blip: no retry of that model, straight to the next."""
    stack = make_stack(stack_factory, simulator)
    simulator.script([Fault("server_error", status=404, message="The model does not exist")], model="gpt-4o-mini")
    if stream:
        sse = raw_stream(stack)
        assert sse.done and sse.content == HAIKU_REPLY
    else:
        assert chat(stack).parse().choices[0].message.content == HAIKU_REPLY
    row = interaction(stack)
    assert [(a["model"], a["error_type"], a["http_status"]) for a in stack.attempts(row["id"])] == [
        ("gpt-4o-mini", "not_found", 404), ("claude-3-5-haiku-latest", None, None)]
    assert [c.model for c in upstream_calls(simulator)] == ["gpt-4o-mini", "claude-3-5-haiku-latest"]


def test_out_of_credit_402_fails_over_instead_of_blaming_the_client(stack_factory, simulator):
    """A 402 is our account's problem: the chain continues (a 400 would have stopped it)."""
    stack = make_stack(stack_factory, simulator)
    simulator.script([Fault("server_error", status=402, message="Insufficient credits")], model="gpt-4o-mini")
    raw = chat(stack)
    assert raw.http_response.status_code == 200 and raw.parse().choices[0].message.content == HAIKU_REPLY
    row = interaction(stack)
    assert [(a["model"], a["error_type"], a["http_status"]) for a in stack.attempts(row["id"])] == [
        ("gpt-4o-mini", "auth", 402), ("claude-3-5-haiku-latest", None, None)]


def test_which_statuses_blame_the_request():
    from loadbear.providers._http import map_http_error

    body = b'{"error": {"message": "x"}}'
    kinds = {s: map_http_error(s, body).kind.value for s in (400, 401, 402, 403, 404, 408, 413, 422, 429, 500, 529)}
    assert kinds == {400: "bad_request", 401: "auth", 402: "auth", 403: "auth", 404: "not_found", 408: "timeout",
                     413: "bad_request", 422: "bad_request", 429: "rate_limited", 500: "server_error",
                     529: "server_error"}
    ctx = b'{"error": {"message": "This model\'s maximum context length is 8192 tokens", "code": "context_length_exceeded"}}'
    assert map_http_error(400, ctx).kind.value == "context_length"


# -- settings ------------------------------------------------------------------------------------


def test_retry_settings_reach_the_executor(tmp_path):
    from loadbear import Gateway, Settings

    env = {"LOADBEAR_RETRY_BASE_DELAY_S": "0.05", "LOADBEAR_RETRY_MAX_DELAY_S": "0.5",
           "LOADBEAR_RETRY_AFTER_MAX_S": "3", "LOADBEAR_REQUEST_DEADLINE_S": "12"}
    gw = Gateway(Settings.load(env=env, database_url=f"sqlite:///{tmp_path / 'g.db'}"))
    try:
        p = gw.executor.policy
        assert (p.base_delay, p.max_delay, p.max_retry_after) == (0.05, 0.5, 3.0)
        assert gw.settings_request_deadline == 12.0
    finally:
        gw.close()


@pytest.mark.parametrize("entry, message", [
    ({"timeouts": {"conect": 1}}, "unknown timeouts conect"),
    ({"timeouts": {"total": -1}}, "timeouts.total must be a number of seconds > 0"),
    ({"timeouts": {"idle": "fast"}}, "timeouts.idle must be a number"),
    ({"timeouts": 5}, "'timeouts' must be a table"),
    ({"max_retries": -1}, "'max_retries' must be an integer >= 0"),
    ({"max_retries": 1.5}, "'max_retries' must be an integer >= 0"),
    ({"fallbacks": "local"}, "'fallbacks' must be a list of model names"),
    ({"fallbacks": ["local", 3]}, "'fallbacks' must be a list of model names"),
    ({"fallbacks": ["nope"]}, "falls back to unknown model 'nope'"),
])
def test_bad_model_reliability_config_is_refused(entry, message):
    with pytest.raises(CatalogError, match=message):
        Catalog.from_settings({"m": {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", **entry}}, env={})


def test_partial_timeouts_and_no_limit_are_accepted():
    cat = Catalog.from_settings({"m": {"provider": "openai", "max_retries": 0,
                                       "timeouts": {"first_token": 2, "total": None}}}, env={})
    t = cat.get("m").timeouts
    assert (t.first_token, t.total, cat.get("m").max_retries) == (2, None, 0)


# -- per-tenant fallback chains through the admin API ---------------------------------------------


def test_tenant_fallback_override_via_admin_api_is_validated_and_applies_at_once(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator)
    admin = {"Authorization": f"Bearer {stack.admin_key}"}
    url = stack.url + "/admin/tenants/acme"
    for bad, param in (({"fallback_overrides": {"gpt-4o-mini": "gpt-4o"}}, "settings.fallback_overrides"),
                       ({"allow_continuation": "yes"}, "settings.allow_continuation"),
                       ({"support_contact": 42}, "settings.support_contact")):
        r = httpx.patch(url, headers=admin, json={"settings": bad})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    # Names must be catalog models: a typo would silently shorten the chain.
    r = httpx.patch(url, headers=admin, json={"settings": {"fallback_overrides": {"gpt-4o-mini": ["gpt4o", "local"]}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "settings.fallback_overrides"
    assert r.json()["error"]["code"] == "model_not_found" and "gpt4o" in r.json()["error"]["message"]
    r = httpx.post(stack.url + "/admin/tenants", headers=admin,
                   json={"slug": "typo-co", "settings": {"fallback_overrides": {"gtp-4o-mini": ["local"]}}})
    assert r.status_code == 400 and "gtp-4o-mini" in r.json()["error"]["message"]
    assert httpx.get(stack.url + "/admin/tenants/typo-co", headers=admin).status_code == 404
    # The catalog chain first, then the override set through the API, on the next request.
    simulator.script([fault("server_error")] * 2, model="gpt-4o-mini")
    assert chat(stack).parse().model == "claude-3-5-haiku-latest"
    r = httpx.patch(url, headers=admin, json={"settings": {"fallback_overrides": {"gpt-4o-mini": ["gpt-4o"]}}})
    assert r.status_code == 200 and r.json()["settings"]["fallback_overrides"] == {"gpt-4o-mini": ["gpt-4o"]}
    simulator.script([fault("server_error")] * 2, model="gpt-4o-mini")
    out = chat(stack).parse()
    assert out.model == "gpt-4o" and out.choices[0].message.content == GPT4O_REPLY


# -- the fault ledger on both backends -------------------------------------------------------------


def test_fault_ledger_on_both_backends(stack_factory, simulator, db_url):
    stack = make_stack(stack_factory, simulator, db_url=db_url, tenant={"fallback_overrides": NO_LOCAL})
    client = stack.openai()

    # A client fault: one call, a 400, the chain untouched. (First: the five upstream failures
    # below open gpt-4o-mini's breaker at the default threshold.)
    simulator.script([fault("context_length")], model="gpt-4o-mini")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    # Failover across providers, non-streamed.
    simulator.script([fault("unavailable"), fault("refused")], model="gpt-4o-mini")
    served = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert served.model == "claude-3-5-haiku-latest"
    # Every model fails: the honest degraded answer.
    simulator.script([fault("server_error")] * 2, model="gpt-4o-mini")
    simulator.script([fault("rate_limit")] * 2, model="claude-3-5-haiku-latest")
    degraded = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert degraded.headers["x-loadbear-degraded"] == "true"
    assert degraded.parse().choices[0].message.content == DEGRADED_TEXT
    # Mid-stream failure: the partial answer, then an error event; the tokens it produced are charged.
    simulator.script([fault("cut_mid_stream", after_chunks=2)], model="gpt-4o-mini")
    sse = raw_stream(stack)
    assert not sse.done and sse.error["code"] == "stream_cut" and sse.content == "Alpha one"

    rows = wait_rows(stack, 4)
    assert [(r["status"], r["model"], r["attempt_count"], r["error_type"]) for r in rows] == [
        ("error", "gpt-4o-mini", 1, "context_length"),
        ("ok", "claude-3-5-haiku-latest", 3, None),
        ("degraded", "gpt-4o-mini", 4, "rate_limited"),
        ("error", "gpt-4o-mini", 1, "stream_cut"),
    ]
    per_row = [[(a["model"], a["status"], a["error_type"], a["http_status"]) for a in stack.attempts(r["id"])]
               for r in rows]
    assert per_row == [
        [("gpt-4o-mini", "error", "context_length", 400)],
        [("gpt-4o-mini", "error", "server_error", 503), ("gpt-4o-mini", "error", "connection", None),
         ("claude-3-5-haiku-latest", "ok", None, None)],
        [("gpt-4o-mini", "error", "server_error", 500)] * 2 + [("claude-3-5-haiku-latest", "error", "rate_limited", 429)] * 2,
        [("gpt-4o-mini", "error", "stream_cut", None)],
    ]
    cut = stack.attempts(rows[3]["id"])[0]
    assert cut["completion_tokens"] > 0 and cut["cost_micro_usd"] > 0 and rows[3]["cost_micro_usd"] == cut["cost_micro_usd"]
    assert rows[2]["cost_micro_usd"] == 0 and rows[1]["cost_micro_usd"] > 0 and rows[0]["cost_micro_usd"] == 0
    assert all(a["latency_ms"] is not None and a["latency_ms"] >= 0
               for r in rows for a in stack.attempts(r["id"]))
    assert len(upstream_calls(simulator)) == sum(r["attempt_count"] for r in rows) == 9


# -- upstream answers that are 200 but not an answer ------------------------------------------------


class Odd:
    """A tiny upstream (a broken proxy) on 127.0.0.1. ``mode = "hollow"``: 200 with nothing in it
    (an OpenAI ``[DONE]``-only stream, an Anthropic ``message_stop``-only one, a completion with
    neither content nor a finish reason). ``mode = "garbage_usage"``: a fine answer whose token
    counts are strings."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        odd = self
        self.mode = "hollow"

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                out, ctype = odd.answer(self.path.endswith("/messages"), bool(body.get("stream")), body["model"])
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, anthropic: bool, stream: bool, model: str) -> tuple[bytes, str]:
        def sse(*events: tuple[str | None, dict | str]) -> bytes:
            out = b""
            for name, data in events:
                if name:
                    out += f"event: {name}\n".encode()
                out += b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n"
            return out

        hollow = self.mode == "hollow"
        if anthropic:
            usage = {"input_tokens": "9", "output_tokens": "many"} if not hollow else {"input_tokens": 9, "output_tokens": 0}
            if stream:
                # Good counts at the start, a bad one at the end (the cumulative output count).
                events = [("message_start", {"type": "message_start", "message": {"usage": {
                    "input_tokens": 9, "output_tokens": 1}}})]
                if not hollow:
                    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                        "delta": {"type": "text_delta", "text": "Odd answer."}}),
                               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                                  "usage": {"output_tokens": "many"}})]
                events.append(("message_stop", {"type": "message_stop"}))
                return sse(*events), "text/event-stream"
            content = [] if hollow else [{"type": "text", "text": "Odd answer."}]
            return json.dumps({"id": "x", "type": "message", "role": "assistant", "model": model, "content": content,
                               "stop_reason": None if hollow else "end_turn", "usage": usage}).encode(), "application/json"
        usage = {"prompt_tokens": "9", "completion_tokens": "many", "total_tokens": "lots"}
        if stream:
            if hollow:
                return sse((None, "[DONE]")), "text/event-stream"
            chunk = {"id": "x", "object": "chat.completion.chunk", "model": model, "choices": [
                {"index": 0, "delta": {"content": "Odd answer."}, "finish_reason": "stop"}]}
            return sse((None, chunk), (None, {"id": "x", "object": "chat.completion.chunk", "model": model,
                                              "choices": [], "usage": usage}), (None, "[DONE]")), "text/event-stream"
        message = {"role": "assistant", "content": None if hollow else "Odd answer."}
        return json.dumps({"id": "x", "object": "chat.completion", "model": model, "choices": [
            {"index": 0, "message": message, "finish_reason": None if hollow else "stop"}],
            **({} if hollow else {"usage": usage})}).encode(), "application/json"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def odd() -> Iterator[Odd]:
    o = Odd()
    yield o
    o.close()


def odd_stack(stack_factory, simulator, odd: Odd, provider: str):
    models = fault_models(simulator, **{"gpt-odd": {
        "provider": provider, "base_url": odd.url + ("/v1" if provider == "openai" else ""), "api_key": "sk",
        "max_retries": 0, "fallbacks": ["gpt-4o-mini"], "timeouts": dict(FAST), "input_price": 1.0,
        "output_price": 2.0}})
    return make_stack(stack_factory, simulator, models=models)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_200_is_a_failure_not_an_empty_success(stack_factory, simulator, odd, stream, provider):
    stack = odd_stack(stack_factory, simulator, odd, provider)
    if stream:
        sse = raw_stream(stack, model="gpt-odd")
        assert sse.done and sse.content == MINI_REPLY
    else:
        assert chat(stack, model="gpt-odd").parse().choices[0].message.content == MINI_REPLY
    row = interaction(stack)
    assert [(a["model"], a["status"], a["error_type"]) for a in stack.attempts(row["id"])] == [
        ("gpt-odd", "error", "malformed"), ("gpt-4o-mini", "ok", None)]
    assert (row["status"], row["model"]) == ("ok", "gpt-4o-mini")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
def test_garbage_token_counts_are_estimated_not_a_500(stack_factory, simulator, odd, stream, provider):
    """Token counts that are not integers: the answer is served and the row written, with our own
    count (marked estimated) — a string there used to escape as a TypeError: a 500, no row."""
    odd.mode = "garbage_usage"
    stack = odd_stack(stack_factory, simulator, odd, provider)
    if stream:
        sse = raw_stream(stack, model="gpt-odd")
        assert sse.done and sse.content == "Odd answer."
    else:
        assert chat(stack, model="gpt-odd").parse().choices[0].message.content == "Odd answer."
    row = interaction(stack)
    assert (row["status"], row["model"], row["attempt_count"]) == ("ok", "gpt-odd", 1)
    assert row["tokens_estimated"] and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert row["cost_micro_usd"] > 0


def test_an_unexpected_provider_exception_is_a_failure_like_any_other():
    """Whatever a provider raises besides ProviderError (a mapping that did not foresee an answer's
    shape) is recorded as a malformed attempt and the chain goes on — before or after the first
    token — instead of escaping as a 500 without a ledger row."""
    import asyncio

    from loadbear.gateway.breaker import BreakerRegistry
    from loadbear.gateway.executor import CallState, Executor, MidStreamFailure
    from loadbear.providers.base import ChatRequest, ModelConfig, StreamDelta
    from loadbear.providers.scripted import ScriptedProvider

    class Broken:
        name = "openai"

        def __init__(self, after: int) -> None:
            self.after = after

        async def complete(self, request, model):
            raise TypeError("unsupported operand type(s)")

        async def stream(self, request, model):
            for _ in range(self.after):
                yield StreamDelta("word ")
            raise KeyError("choices")

    good = ScriptedProvider()
    good.script(["fine answer"] * 3)

    class Providers:
        def __init__(self, broken):
            self.broken = broken

        def get(self, model):
            return self.broken if model.name == "bad" else good

    bad = ModelConfig(name="bad", provider="openai", upstream_model="bad", max_retries=0)
    ok = ModelConfig(name="ok", provider="scripted", upstream_model="ok", max_retries=0)
    req = ChatRequest(messages=[{"role": "user", "content": "hi"}])

    async def run():
        ex = Executor(Providers(Broken(after=0)), BreakerRegistry(threshold=5, cooldown=30))
        st = CallState()
        result = await ex.complete([bad, ok], req, st, time.monotonic() + 5)
        assert result.text == "fine answer"
        assert [(a.model, a.status, a.error_type) for a in st.attempts] == [("bad", "error", "malformed"), ("ok", "ok", None)]
        assert "TypeError" in st.attempts[0].error

        st = CallState()
        texts = [d.text async for d in ex.stream([bad, ok], req, st, time.monotonic() + 5)]
        assert "".join(texts).strip() == "fine answer"
        assert [a.error_type for a in st.attempts] == ["malformed", None]

        ex = Executor(Providers(Broken(after=2)), BreakerRegistry(threshold=5, cooldown=30))
        st = CallState()
        with pytest.raises(MidStreamFailure) as info:
            async for _ in ex.stream([bad, ok], req, st, time.monotonic() + 5):
                pass
        assert info.value.error.kind.value == "malformed" and "KeyError" in info.value.error.message
        assert [(a.status, a.error_type, a.completion_tokens > 0) for a in st.attempts] == [("error", "malformed", True)]

    asyncio.run(run())


def test_cli_providers_names_a_catalog_mistake(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from loadbear.cli import app

    cfg = tmp_path / "loadbear.toml"
    cfg.write_text('[models.fast]\nprovider = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
                   'timeouts = { conect = 2 }\n')
    monkeypatch.setenv("LOADBEAR_CONFIG", str(cfg))
    monkeypatch.setenv("LOADBEAR_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.delenv("LOADBEAR_REDIS_URL", raising=False)
    res = CliRunner().invoke(app, ["providers"])
    assert res.exit_code == 1
    assert "model 'fast': unknown timeouts conect" in res.output and "Traceback" not in res.output
