"""Bad input gets a clear 4xx in OpenAI's error shape, and nothing is written."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import sim_models
from loadbear.testing import Fault

MSG = [{"role": "user", "content": "hello"}]


def post(stack, body=None, *, key="default", raw=None, headers=None, path="/v1/chat/completions"):
    h = dict(headers or {})
    if key == "default":
        key = stack.key
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    if raw is not None:
        h.setdefault("Content-Type", "application/json")
        return httpx.post(stack.url + path, content=raw, headers=h)
    return httpx.post(stack.url + path, json=body, headers=h)


def assert_error(r, status, code, param=None, type_=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    if type_ is not None:
        assert err["type"] == type_
    return err


def no_rows(stack):
    assert stack.rows() == []


@pytest.mark.parametrize(
    "raw,code,param",
    [
        (b"{not json", "invalid_json", None),
        (b"", "invalid_json", None),
        (b"[1, 2]", "invalid_type", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "missing_required_parameter", "model"),
        (b'{"model": "gpt-4o-mini"}', "missing_required_parameter", "messages"),
        (b'{"model": "gpt-4o-mini", "messages": []}', "invalid_type", "messages"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "invalid_type", "model"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "wizard", "content": "x"}]}', "invalid_value", "messages[0].role"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user"}]}', "missing_required_parameter", "messages[0].content"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": 3}]}', "invalid_type", "messages[0].content"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "temperature": 7}', "invalid_value", "temperature"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "invalid_type", "temperature"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "invalid_type", "max_tokens"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "invalid_type", "stream"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}', "invalid_value", "stream_options"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "n": 2}', "unsupported_value", "n"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stop": [1]}', "invalid_type", "stop"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "metadata": {"feature": ""}}', "invalid_type", "metadata.feature"),
        # Keys loadbear writes itself: a client setting them could hide its spend from the usage
        # rollups (eval traffic is kept out of them) or forge the reliability numbers.
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "metadata": {"eval_run": "r1"}}', "reserved_metadata_key", "metadata.eval_run"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "metadata": {"skipped": "gpt-4o"}}', "reserved_metadata_key", "metadata.skipped"),
    ],
)
def test_malformed_requests(stack, simulator, raw, code, param):
    r = post(stack, raw=raw)
    assert_error(r, 400, code, param, "invalid_request_error")
    no_rows(stack)
    assert simulator.requests == []


def test_bad_feature_header(stack):
    r = post(stack, {"model": "gpt-4o-mini", "messages": MSG}, headers={"X-Loadbear-Feature": "x" * 101})
    assert_error(r, 400, "invalid_type", "X-Loadbear-Feature")
    no_rows(stack)


def test_missing_invalid_and_revoked_keys(stack, simulator):
    assert_error(post(stack, {"model": "gpt-4o-mini", "messages": MSG}, key=None), 401, "missing_api_key",
                 type_="authentication_error")
    assert_error(post(stack, {"model": "gpt-4o-mini", "messages": MSG}, key="lb_nope_x"), 401, "invalid_api_key")
    r = httpx.post(stack.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG},
                   headers={"Authorization": "Basic abc"})
    assert_error(r, 401, "missing_api_key")
    # revoke through the admin API: the same replica stops accepting it at once
    keys = httpx.get(stack.url + "/admin/tenants/acme/keys", headers={"Authorization": f"Bearer {stack.admin_key}"}).json()
    key_id = keys["data"][0]["id"]
    assert post(stack, {"model": "gpt-4o-mini", "messages": MSG}).status_code == 200
    r = httpx.delete(f"{stack.url}/admin/tenants/acme/keys/{key_id}", headers={"Authorization": f"Bearer {stack.admin_key}"})
    assert r.status_code == 200 and r.json()["revoked_at"]
    err = assert_error(post(stack, {"model": "gpt-4o-mini", "messages": MSG}), 401, "invalid_api_key")
    assert "revoked" in err["message"]
    assert len(stack.rows()) == 1  # only the request made before revocation
    assert len(simulator.requests) == 1


def test_sdk_sees_authentication_error(stack):
    with pytest.raises(openai.AuthenticationError) as exc:
        stack.openai(key="lb_wrong").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert exc.value.status_code == 401
    assert exc.value.body["code"] == "invalid_api_key"


def test_scope_is_enforced(stack):
    _, usage_only = stack.gateway.tenants.create_key("acme", "reader", ["usage:read"])
    r = post(stack, {"model": "gpt-4o-mini", "messages": MSG}, key=usage_only)
    assert_error(r, 403, "insufficient_scope", type_="permission_error")
    assert httpx.get(stack.url + "/v1/usage", headers={"Authorization": f"Bearer {usage_only}"}).status_code == 200
    no_rows(stack)


def test_body_over_limit(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url))
    limit = s.settings.max_body_bytes
    big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * (limit + 10)}]}
    assert_error(post(s, big), 413, "request_too_large")

    # chunked upload without Content-Length is counted as it arrives
    def chunks():
        yield b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
        for _ in range(limit // 65536 + 2):
            yield b"y" * 65536
        yield b'"}]}'

    r = httpx.post(s.url + "/v1/chat/completions", content=chunks(),
                   headers={"Authorization": f"Bearer {s.key}", "Content-Type": "application/json"})
    assert_error(r, 413, "request_too_large")
    no_rows(s)
    assert simulator.requests == []


def test_unknown_model(stack, simulator):
    r = post(stack, {"model": "gpt-9", "messages": MSG})
    err = assert_error(r, 404, "model_not_found", "model", "invalid_request_error")
    assert "gpt-9" in err["message"]
    # the same answer when a stream is asked for: refused before any event is sent
    r = post(stack, {"model": "gpt-9", "messages": MSG, "stream": True})
    assert r.headers["content-type"].startswith("application/json")
    assert_error(r, 404, "model_not_found", "model", "invalid_request_error")
    with pytest.raises(openai.NotFoundError):
        stack.openai().chat.completions.create(model="gpt-9", messages=MSG)
    no_rows(stack)


def test_model_not_allowed_for_tenant(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), tenant_settings={"allowed_models": ["gpt-4o-mini"]})
    r = post(s, {"model": "gpt-4o", "messages": MSG})
    assert_error(r, 403, "model_not_allowed", "model", "permission_error")
    with pytest.raises(openai.PermissionDeniedError):
        s.openai().chat.completions.create(model="gpt-4o", messages=MSG)
    no_rows(s)
    assert simulator.requests == []


def test_upstream_context_length_is_the_clients_400(stack, simulator):
    simulator.script([Fault("context_length")])
    r = post(stack, {"model": "gpt-4o-mini", "messages": MSG})
    err = assert_error(r, 400, "context_length_exceeded", None, "invalid_request_error")
    assert "context" in err["message"].lower()
    assert len(simulator.requests) == 1, "a request fault must not burn through the chain"
    row = stack.rows()[0]
    assert row["status"] == "error" and row["error_type"] == "context_length" and row["attempt_count"] == 1
    assert r.headers["x-loadbear-interaction-id"] == str(row["id"]), "the refusal names its ledger row"


def test_upstream_bad_request_stream(stack, simulator):
    simulator.script([Fault("bad_request")])
    r = post(stack, {"model": "gpt-4o-mini", "messages": MSG, "stream": True})
    assert_error(r, 400, "invalid_request", None, "invalid_request_error")
    assert r.headers["content-type"].startswith("application/json")
    row = stack.rows()[0]
    assert row["status"] == "error" and row["streamed"] and row["error_type"] == "bad_request"
    assert r.headers["x-loadbear-interaction-id"] == str(row["id"])


def test_upstream_500_then_fallback_is_invisible(stack, simulator):
    simulator.script([Fault("server_error"), Fault("server_error")], model="gpt-4o-mini")
    out = stack.openai().chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert out.model == "claude-3-5-haiku-latest"
    row = stack.rows()[0]
    assert row["status"] == "ok" and row["attempt_count"] == 3
    assert [a["status"] for a in stack.attempts(out.id)] == ["error", "error", "ok"]


def test_unknown_route_and_method(stack):
    r = httpx.get(stack.url + "/v1/nothing", headers={"Authorization": f"Bearer {stack.key}"})
    assert_error(r, 404, "404", type_="not_found_error")
    r = httpx.get(stack.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {stack.key}"})
    assert_error(r, 405, "405")
