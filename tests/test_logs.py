"""Structured JSON logs: one object per line, carrying the request and interaction ids, never a
prompt, an answer or a key; `loadbear serve` writes them by default."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import sim_models
from loadbear.gateway.executor import RetryPolicy
from loadbear.observability import JsonFormatter, TextFormatter, bind_call, bind_request, configure_logging
from loadbear.observability.logs import uvicorn_log_config
from loadbear.testing import Fault

SECRET_PROMPT = "zebra-umbrella-7731 what is my balance?"


@pytest.fixture
def captured():
    """Every line logged under "loadbear" (at INFO and up), formatted as `loadbear serve` does."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("loadbear")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def wait_for(stream: io.StringIO, pred, timeout: float = 5.0) -> list[dict]:
    """The access line is written once the response is sent, a moment after the client has it."""
    deadline = time.monotonic() + timeout
    while True:
        got = lines(stream)
        if pred(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_request_log_lines_carry_request_and_interaction_ids(stack_factory, simulator, captured):
    stack = stack_factory(sim_models(simulator.url, **{"gpt-4o-mini": {"max_retries": 0},
                                                       "claude-3-5-haiku-latest": {"max_retries": 0}}),
                          retry_policy=RetryPolicy(base_delay=0.01, max_delay=0.05),
                          tenant_settings={"fallback_overrides": {"gpt-4o-mini": ["claude-3-5-haiku-latest"],
                                                                  "claude-3-5-haiku-latest": []}})
    stack.gateway.settings.access_log = True
    client = stack.openai()
    msgs = [{"role": "user", "content": SECRET_PROMPT}]

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs,
                                                           extra_headers={"X-Request-Id": "req-ok-1"})
    ok = raw.parse()
    got = wait_for(captured, lambda ls: any(l.get("request_id") == "req-ok-1" for l in ls))
    [access] = [l for l in got if l["logger"] == "loadbear.access" and l["request_id"] == "req-ok-1"]
    assert access["level"] == "info" and access["message"] == "POST /v1/chat/completions 200"
    assert access["interaction_id"] == ok.id and access["tenant"] == "acme"
    assert (access["method"], access["path"], access["status"]) == ("POST", "/v1/chat/completions", 200)
    assert access["duration_ms"] >= 0 and access["ts"].endswith("Z")

    # Every model fails: the degraded answer is logged as a warning with both ids.
    simulator.script([Fault("server_error")], model="gpt-4o-mini")
    simulator.script([Fault("unavailable")], model="claude-3-5-haiku-latest")
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs)
    degraded_id = raw.parse().id
    rid = raw.headers["x-request-id"]
    got = wait_for(captured, lambda ls: sum(l.get("request_id") == rid for l in ls) >= 2)
    [warn] = [l for l in got if l["logger"] == "loadbear.chat"]
    assert warn["level"] == "warning" and warn["message"] == "chat request degraded: server_error"
    assert (warn["request_id"], warn["interaction_id"], warn["tenant"]) == (rid, degraded_id, "acme")
    assert (warn["status"], warn["model"], warn["attempts"]) == ("degraded", "gpt-4o-mini", 2)

    # Refused before any model call: still an access line with the request id (and no interaction).
    r = httpx.post(stack.url + "/v1/chat/completions", headers={"Authorization": "Bearer lb_nope_0123456789abcdef",
                                                                "X-Request-Id": "req-401"},
                   json={"model": "gpt-4o-mini", "messages": msgs})
    assert r.status_code == 401
    got = wait_for(captured, lambda ls: any(l.get("request_id") == "req-401" for l in ls))
    [denied] = [l for l in got if l.get("request_id") == "req-401"]
    assert denied["status"] == 401 and "interaction_id" not in denied

    text = captured.getvalue()
    assert "zebra-umbrella" not in text  # never the prompt
    assert stack.key not in text and "lb_nope" not in text  # never a key
    assert ok.choices[0].message.content not in text  # never the answer


def test_access_log_is_off_by_default(stack_factory, simulator, captured):
    stack = stack_factory(sim_models(simulator.url))
    assert stack.gateway.settings.access_log is False
    stack.openai().chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    time.sleep(0.05)
    assert not [l for l in lines(captured) if l["logger"] == "loadbear.access"]


def test_json_formatter_context_extras_exceptions_and_redaction():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("loadbear.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        def in_request():
            bind_request("rid-1")
            bind_call("iid-1", "acme")
            logger.warning("upstream said %s", "Authorization: Bearer sk-proj-abcdefghijklmnop1234 rejected",
                           extra={"model": "gpt-4o"})
            try:
                raise RuntimeError("key lb_abcd1234_ZZZZZZZZZZZZZZZZZZZZ leaked")
            except RuntimeError:
                logger.exception("boom")

        contextvars.copy_context().run(in_request)
        logger.warning("outside any request")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    first, second, third = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert set(first) == {"ts", "level", "logger", "message", "request_id", "interaction_id", "tenant", "model"}
    assert (first["request_id"], first["interaction_id"], first["tenant"], first["model"]) == (
        "rid-1", "iid-1", "acme", "gpt-4o")
    assert first["message"] == "upstream said Authorization: Bearer [redacted] rejected"
    assert second["exc"].startswith("Traceback") and "[redacted]" in second["exc"] and "ZZZZ" not in second["exc"]
    assert "lb_abcd" not in second["exc"]
    # The ids belong to the request's context only.
    assert "request_id" not in third and "interaction_id" not in third


def test_text_format_and_bad_format():
    record = logging.LogRecord("loadbear.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)

    def in_request():
        bind_request("rid-2")
        return TextFormatter().format(record)

    line = contextvars.copy_context().run(in_request)
    assert line.endswith("INFO loadbear.x hello world [request_id=rid-2]")
    with pytest.raises(ValueError, match="LOADBEAR_LOG_FORMAT must be one of json, text"):
        configure_logging("info", "xml")
    with pytest.raises(ValueError, match="LOADBEAR_LOG_FORMAT"):
        uvicorn_log_config("info", "yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_writes_json_lines(tmp_path):
    """`loadbear serve`: uvicorn's own lines and loadbear's are all JSON objects, with the ids."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADBEAR_")}
    env.update(LOADBEAR_DATABASE_URL=f"sqlite:///{tmp_path / 'lb.db'}", LOADBEAR_PORT=str(port),
               LOADBEAR_ACCESS_LOG="true", LOADBEAR_ADMIN_KEY="admin-for-logs")
    proc = subprocess.Popen([sys.executable, "-m", "loadbear.cli", "serve"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"X-Request-Id": "serve-probe"})
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        assert r.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 401
        time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(30)
    out = [line for line in proc.stderr.read().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in out]  # every line is one JSON object
    assert any(p["logger"].startswith("uvicorn") for p in parsed)
    assert not any("color_message" in p for p in parsed)
    probe = [p for p in parsed if p.get("request_id") == "serve-probe"]
    assert probe and probe[0]["logger"] == "loadbear.access" and probe[0]["status"] == 200
    assert any(p.get("status") == 401 and p.get("path") == "/metrics" for p in parsed)
