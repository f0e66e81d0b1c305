"""Fault injection, streaming: before the first token failover is invisible (one clean stream
ending in ``[DONE]``); after it the stream ends with an OpenAI-shaped error event and no
``[DONE]`` — checked through raw SSE parsing and through the official openai SDK — and the
ledger says what happened, with the cost of the tokens the failed attempt produced.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from loadbear.testing import Fault
from test_faults import (
    DEGRADED_TEXT,
    HAIKU_REPLY,
    MESSAGES,
    MINI_REPLY,
    NO_LOCAL,
    UPSTREAM_FAULTS,
    assert_ledger_matches,
    fault,
    fault_models,
    fstack,  # noqa: F401  (fixtures)
    shared_simulator,  # noqa: F401
    shared_stack,  # noqa: F401
    simulator,  # noqa: F401
    interaction,
    make_stack,
    upstream_calls,
)
from loadbear.providers.tokens import count_text

MID_STREAM = {"cut_mid_stream": "stream_cut", "malformed_chunk": "malformed", "inband_error": "upstream_error"}
# Before the first token, in a stream, each fault kind has its own error type.
STREAM_BEFORE = {**{k: v[0] for k, v in UPSTREAM_FAULTS.items()}, **MID_STREAM}
MINI_PIECES = ["Alpha", " one", " two", " three", " four", " five", " six", " seven."]


class SSE:
    def __init__(self, status: int, headers: httpx.Headers, datas: list[str]) -> None:
        self.status, self.headers, self.datas = status, headers, datas

    @property
    def done(self) -> bool:
        return bool(self.datas) and self.datas[-1] == "[DONE]"

    @property
    def chunks(self) -> list[dict]:
        return [json.loads(d) for d in self.datas if d != "[DONE]"]

    @property
    def content(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks
                       if c.get("choices"))

    @property
    def error(self) -> dict | None:
        last = self.chunks[-1] if self.chunks else {}
        return last.get("error")


def raw_stream(stack, model: str = "gpt-4o-mini", key: str | None = None, **extra: Any) -> SSE:
    """POST a streamed chat and parse the SSE body by hand: every event must be one ``data:`` line."""
    body = {"model": model, "messages": MESSAGES, "stream": True, **extra}
    with httpx.stream("POST", stack.url + "/v1/chat/completions", json=body, timeout=20,
                      headers={"Authorization": f"Bearer {key or stack.key}"}) as r:
        raw = r.read().decode()
        status, headers = r.status_code, r.headers
    if status != 200:
        return SSE(status, headers, [raw])
    assert headers["content-type"].startswith("text/event-stream")
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    datas = []
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
        datas.append(event[len("data: "):])
    return SSE(status, headers, datas)


def sdk_stream(stack, model: str = "gpt-4o-mini") -> tuple[list, Exception | None]:
    chunks, error = [], None
    try:
        for chunk in stack.openai().chat.completions.create(model=model, messages=MESSAGES, stream=True):
            chunks.append(chunk)
    except openai.APIError as exc:
        error = exc
    return chunks, error


def sdk_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- before the first token: invisible ---------------------------------------------------------


@pytest.mark.parametrize("kind", list(STREAM_BEFORE))
def test_stream_retry_before_first_token_is_one_clean_stream(fstack, simulator, kind):
    simulator.script([fault(kind, after_chunks=0)], model="gpt-4o-mini")
    sse = raw_stream(fstack)
    assert sse.status == 200 and sse.done and sse.error is None
    assert sse.content == MINI_REPLY
    assert {c["model"] for c in sse.chunks} == {"gpt-4o-mini"}
    assert {c["id"] for c in sse.chunks} == {sse.headers["x-loadbear-interaction-id"]}
    finals = [c["choices"][0]["finish_reason"] for c in sse.chunks if c["choices"][0]["finish_reason"]]
    assert finals == ["stop"]
    assert "x-loadbear-degraded" not in sse.headers
    row = interaction(fstack)
    assert (row["status"], row["attempt_count"], row["streamed"]) == ("ok", 2, 1)
    attempts = fstack.attempts(row["id"])
    assert [(a["status"], a["error_type"]) for a in attempts] == [("error", STREAM_BEFORE[kind]), ("ok", None)]
    assert attempts[0]["cost_micro_usd"] == 0 and attempts[0]["completion_tokens"] == 0
    assert [c.fault for c in upstream_calls(simulator)] == [kind, None]
    assert all(c.stream for c in upstream_calls(simulator))
    assert_ledger_matches(fstack, simulator)


@pytest.mark.parametrize("kind", ["rate_limit", "refused", "stall_first_token", "cut_mid_stream", "inband_error"])
def test_stream_failover_before_first_token_through_the_sdk(fstack, simulator, kind):
    simulator.script([fault(kind, after_chunks=0)] * 2, model="gpt-4o-mini")
    chunks, error = sdk_stream(fstack)
    assert error is None
    assert sdk_text(chunks) == HAIKU_REPLY
    assert {c.model for c in chunks} == {"claude-3-5-haiku-latest"}  # one model, one stream
    row = interaction(fstack)
    assert (row["status"], row["model"], row["attempt_count"]) == ("ok", "claude-3-5-haiku-latest", 3)
    assert_ledger_matches(fstack, simulator)


# -- after the first token: an explicit error event ----------------------------------------------


@pytest.mark.parametrize("kind", list(MID_STREAM))
def test_mid_stream_failure_ends_with_an_error_event_raw(fstack, simulator, kind):
    simulator.script([fault(kind, after_chunks=3)], model="gpt-4o-mini")
    sse = raw_stream(fstack)
    assert sse.status == 200
    assert not sse.done and "[DONE]" not in sse.datas
    assert sse.content == "".join(MINI_PIECES[:3])
    err = sse.error
    assert err is not None and set(err) == {"message", "type", "param", "code"}
    assert err["code"] == MID_STREAM[kind] and err["type"] == "upstream_error"
    # No finish chunk after content that never finished.
    assert all(c["choices"][0]["finish_reason"] is None for c in sse.chunks if c.get("choices"))
    row = interaction(fstack)
    assert (row["status"], row["attempt_count"], row["error_type"], row["model"]) == (
        "error", 1, MID_STREAM[kind], "gpt-4o-mini")
    [attempt] = fstack.attempts(row["id"])
    assert attempt["status"] == "error" and attempt["error_type"] == MID_STREAM[kind]
    # The failed attempt produced tokens: they are counted and cost money.
    assert attempt["completion_tokens"] == count_text("".join(MINI_PIECES[:3]))
    assert attempt["prompt_tokens"] > 0 and attempt["cost_micro_usd"] > 0
    assert row["cost_micro_usd"] == attempt["cost_micro_usd"]
    assert len(upstream_calls(simulator)) == 1  # committed: no retry, no failover
    assert_ledger_matches(fstack, simulator)


@pytest.mark.parametrize("kind", list(MID_STREAM))
def test_mid_stream_failure_raises_in_the_sdk(fstack, simulator, kind):
    simulator.script([fault(kind, after_chunks=2)], model="gpt-4o-mini")
    chunks, error = sdk_stream(fstack)
    assert isinstance(error, openai.APIError)
    assert error.body["code"] == MID_STREAM[kind]
    assert sdk_text(chunks) == "Alpha one"
    assert interaction(fstack)["status"] == "error"
    assert_ledger_matches(fstack, simulator)


def test_stalled_stream_after_first_token_is_an_idle_timeout(stack_factory, simulator):
    """A stream that stops sending is a failure after ``idle`` seconds, not a hang."""
    stack = make_stack(stack_factory, simulator, models=fault_models(simulator, **{"gpt-4o-mini": {
        "timeouts": {"connect": 1.0, "first_token": 1.0, "idle": 0.4, "total": 5.0}}}))
    simulator.configure(tokens_per_second=1.5)  # ~0.67 s between chunks > idle 0.4 s
    simulator.set_reply("Alpha one", model="gpt-4o-mini")
    fstack = stack
    sse = raw_stream(fstack)
    assert sse.content == "Alpha" and not sse.done
    assert sse.error["code"] == "idle_timeout"
    row = interaction(fstack)
    assert (row["status"], row["error_type"]) == ("error", "idle_timeout")
    assert_ledger_matches(fstack, simulator)


# -- degraded stream -----------------------------------------------------------------------------


def test_degraded_stream(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator, tenant={"fallback_overrides": NO_LOCAL})
    simulator.script([fault("server_error")] * 2, model="gpt-4o-mini")
    simulator.script([fault("stall_first_token")] * 2, model="claude-3-5-haiku-latest")
    sse = raw_stream(stack, stream_options={"include_usage": True})
    assert sse.status == 200 and sse.done
    assert sse.headers["x-loadbear-degraded"] == "true"
    assert sse.content == DEGRADED_TEXT
    final = [c for c in sse.chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["loadbear"]["degraded"] is True
    assert sse.chunks[-1]["usage"]["total_tokens"] == 0
    row = interaction(stack)
    assert (row["status"], row["attempt_count"], row["error_type"]) == ("degraded", 4, "first_token_timeout")
    assert_ledger_matches(stack, simulator)

    # The SDK sees a normal stream.
    simulator.script([fault("server_error")] * 4)
    chunks, error = sdk_stream(stack)
    assert error is None and sdk_text(chunks) == DEGRADED_TEXT


# -- continuation (tenant opt-in) ------------------------------------------------------------------


def test_continuation_after_mid_stream_failure(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator, tenant={"allow_continuation": True})
    simulator.script([fault("cut_mid_stream", after_chunks=3)], model="gpt-4o-mini")
    sse = raw_stream(stack, stream_options={"include_usage": True})
    assert sse.status == 200 and sse.done and sse.error is None
    assert sse.content == "Alpha one two" + HAIKU_REPLY
    finals = [c for c in sse.chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["loadbear"]["continued"] == 1
    row = interaction(stack)
    assert (row["status"], row["model"], row["attempt_count"], row["error_type"]) == (
        "ok", "claude-3-5-haiku-latest", 2, None)
    from test_faults import meta

    assert meta(row)["continuations"] == [{"from_model": "gpt-4o-mini", "error_type": "stream_cut",
                                           "after_chars": len("Alpha one two"), "to_model": "claude-3-5-haiku-latest"}]
    failed, ok = stack.attempts(row["id"])
    assert (failed["error_type"], failed["completion_tokens"] > 0, failed["cost_micro_usd"] > 0) == ("stream_cut", True, True)
    assert ok["status"] == "ok"
    # The continuing model got the partial answer as context.
    cont = upstream_calls(simulator)[1]
    assert cont.path == "/v1/messages"
    assert {"role": "assistant", "content": "Alpha one two"} in cont.body["messages"]
    assert cont.body["messages"][-1]["role"] == "user"
    assert_ledger_matches(stack, simulator)


def test_continuation_that_also_fails_ends_with_an_error_event(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator, tenant={"allow_continuation": True})
    simulator.script([fault("inband_error", after_chunks=2)], model="gpt-4o-mini")
    simulator.script([fault("unavailable")] * 2, model="claude-3-5-haiku-latest")
    chunks, error = sdk_stream(stack)
    assert isinstance(error, openai.APIError)
    assert sdk_text(chunks) == "Alpha one"
    row = interaction(stack)
    assert (row["status"], row["attempt_count"], row["error_type"]) == ("error", 3, "server_error")
    from test_faults import meta

    assert meta(row)["continuations"][0]["to_model"] is None
    # local cannot continue someone else's answer: it is not in the continuation chain
    assert [a["provider"] for a in stack.attempts(row["id"])] == ["openai", "anthropic", "anthropic"]
    assert_ledger_matches(stack, simulator)


def test_without_continuation_the_next_model_is_not_called(fstack, simulator):
    simulator.script([fault("cut_mid_stream", after_chunks=3)], model="gpt-4o-mini")
    sse = raw_stream(fstack)
    assert sse.error["code"] == "stream_cut"
    assert [c.model for c in upstream_calls(simulator)] == ["gpt-4o-mini"]


# -- client faults in a stream -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bad_request", "context_length"])
def test_stream_client_fault_is_a_plain_400(fstack, simulator, kind):
    simulator.script([fault(kind)], model="gpt-4o-mini")
    sse = raw_stream(fstack)
    assert sse.status == 400
    assert json.loads(sse.datas[0])["error"]["type"] == "invalid_request_error"
    simulator.script([fault(kind)], model="gpt-4o-mini")
    chunks, error = sdk_stream(fstack)
    assert isinstance(error, openai.BadRequestError) and error.status_code == 400 and not chunks
    assert len(upstream_calls(simulator)) == 2  # one per request: the chain was not burned
    assert [r["status"] for r in fstack.rows()] == ["error", "error"]
    assert_ledger_matches(fstack, simulator)


# -- a client that goes away ----------------------------------------------------------------------


def test_client_disconnect_mid_stream_is_cancelled_in_the_ledger(fstack, simulator):
    import time

    simulator.configure(tokens_per_second=20)
    simulator.set_reply(" ".join(["word"] * 40), model="gpt-4o-mini")
    with httpx.stream("POST", fstack.url + "/v1/chat/completions", timeout=10,
                      headers={"Authorization": f"Bearer {fstack.key}"},
                      json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}) as r:
        for line in r.iter_lines():
            if '"word' in line:
                break  # leave after the first content chunk
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rows = fstack.rows()
        if rows:
            break
        time.sleep(0.05)
    row = interaction(fstack)
    assert row["status"] == "cancelled"
    [attempt] = fstack.attempts(row["id"])
    assert attempt["status"] == "cancelled" and attempt["completion_tokens"] > 0
    assert_ledger_matches(fstack, simulator)
