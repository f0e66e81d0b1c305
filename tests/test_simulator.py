"""The upstream simulator against the official SDKs, raw sockets and aiohttp.

The SDKs are the referee for wire-format fidelity: if they parse a reply or raise the right
exception class for a fault, our own provider code will meet the same bytes in production.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import time
from typing import Any, Iterator

import aiohttp
import anthropic
import openai
import pytest
import quicktok

from loadbear.testing import FAULT_KINDS, Fault, SimulatorConfig, UpstreamSimulator
from loadbear.testing.simulator_faults import DEFAULT_RATE_FAULTS

ENC = quicktok.get_encoding("o200k_base")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a gateway?"}]
ANTHROPIC_MESSAGES = [{"role": "user", "content": "What is a gateway?"}]


@pytest.fixture
def sim() -> Iterator[UpstreamSimulator]:
    with UpstreamSimulator() as simulator:
        yield simulator


def oai(sim: UpstreamSimulator, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, **kwargs)


def ant(sim: UpstreamSimulator) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=sim.url, api_key="x", max_retries=0)


def raw_request(path: str, body: dict[str, Any], host: str = "127.0.0.1") -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# --- OpenAI wire format ----------------------------------------------------------------------


def test_openai_completion_matches_the_sdk_and_counts_tokens_with_the_tokenizer(sim: UpstreamSimulator) -> None:
    reply = oai(sim).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    text = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "gpt-4o-mini" and isinstance(reply.created, int)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    assert text.startswith("Simulated answer from gpt-4o-mini:") and len(text.split()) == 20
    framing = sum(3 + len(ENC.encode(m["role"])) for m in MESSAGES) + 3
    assert reply.usage.prompt_tokens == framing + sum(len(ENC.encode(m["content"])) for m in MESSAGES)
    assert reply.usage.completion_tokens == len(ENC.encode(text))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    # Deterministic per request and seed, different for another prompt.
    again = oai(sim).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    other = oai(sim).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert again.choices[0].message.content == text != other.choices[0].message.content


def test_openai_stream_has_role_chunk_one_chunk_per_word_finish_and_usage(sim: UpstreamSimulator) -> None:
    client = oai(sim)
    full = client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )

    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert len(content) == 20 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(content) == full and content[1].startswith(" ")
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ENC.encode(full))
    assert all(c.usage is None for c in chunks[:-1])

    plain = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert len(plain) == 22 and plain[-1].choices[0].finish_reason == "stop"  # no usage chunk unasked


async def test_openai_stream_raw_frames_end_with_done_and_are_flushed_one_by_one() -> None:
    with UpstreamSimulator(tokens_per_second=400.0) as sim:
        body = {"model": "m", "messages": MESSAGES, "stream": True}
        arrivals: list[float] = []
        async with aiohttp.ClientSession() as session:
            async with session.post(sim.url + "/v1/chat/completions", json=body) as resp:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                frames = []
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        frames.append(line[6:].strip())
                        arrivals.append(time.monotonic())
    assert frames[-1] == b"[DONE]" and len(frames) == 23
    # Paced at 400 tok/s the ~25-token reply spreads over ~60 ms: frames arrive apart, not in one burst.
    assert arrivals[-1] - arrivals[0] > 0.03


def test_max_tokens_cuts_with_length_and_stop_sequences_cut_with_stop(sim: UpstreamSimulator) -> None:
    client = oai(sim)
    cut = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 5
    assert len(ENC.encode(cut.choices[0].message.content)) == 5

    stopped = client.chat.completions.create(model="m", messages=MESSAGES, stop=[" from"])
    assert stopped.choices[0].message.content == "Simulated answer"
    assert stopped.choices[0].finish_reason == "stop"


def test_set_reply_text_callable_and_per_model(sim: UpstreamSimulator) -> None:
    client = oai(sim)
    sim.set_reply("Exactly this text.")
    sim.set_reply(lambda request: f"echo {request['messages'][-1]['content']}", model="echo-model")

    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content == "Exactly this text."
    echoed = client.chat.completions.create(model="echo-model", messages=MESSAGES)
    assert echoed.choices[0].message.content == "echo What is a gateway?"
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert [c.choices[0].delta.content for c in chunks[1:-1]] == ["Exactly", " this", " text."]

    sim.reset()
    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content.startswith("Simulated")


def test_reply_words_sets_the_length() -> None:
    with UpstreamSimulator(reply_words=7) as sim:
        text = oai(sim).chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
    assert len(text.split()) == 7


# --- Anthropic wire format -------------------------------------------------------------------


def test_anthropic_message_and_stream_parse_in_the_sdk(sim: UpstreamSimulator) -> None:
    client = ant(sim)
    message = client.messages.create(
        model="claude-haiku-4-5", max_tokens=200, system="Be brief.", messages=ANTHROPIC_MESSAGES
    )
    text = message.content[0].text
    assert message.type == "message" and message.role == "assistant" and message.stop_reason == "end_turn"
    assert message.stop_sequence is None and len(text.split()) == 20
    assert message.usage.output_tokens == len(ENC.encode(text))
    assert message.usage.input_tokens > len(ENC.encode("Be brief.What is a gateway?"))
    assert message.usage.cache_read_input_tokens == 0 and message.usage.cache_creation_input_tokens == 0

    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=200, system="Be brief.", messages=ANTHROPIC_MESSAGES
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text
    assert final.usage.input_tokens == message.usage.input_tokens
    assert final.usage.output_tokens == message.usage.output_tokens

    short = client.messages.create(model="claude-haiku-4-5", max_tokens=3, messages=ANTHROPIC_MESSAGES)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3
    counted = client.messages.count_tokens(model="claude-haiku-4-5", system="Be brief.", messages=ANTHROPIC_MESSAGES)
    assert counted.input_tokens == message.usage.input_tokens


def test_anthropic_stream_emits_the_documented_event_sequence(sim: UpstreamSimulator) -> None:
    events = list(
        ant(sim).messages.create(model="claude", max_tokens=100, messages=ANTHROPIC_MESSAGES, stream=True)
    )
    names = [e.type for e in events]
    assert names == (
        ["message_start", "content_block_start"]
        + ["content_block_delta"] * 20
        + ["content_block_stop", "message_delta", "message_stop"]
    )
    assert events[0].message.usage.input_tokens > 0
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens > 20


def test_anthropic_stop_sequences(sim: UpstreamSimulator) -> None:
    message = ant(sim).messages.create(
        model="claude", max_tokens=100, messages=ANTHROPIC_MESSAGES, stop_sequences=[" from"]
    )
    assert message.content[0].text == "Simulated answer"
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == " from"


# --- errors through the SDKs -----------------------------------------------------------------


def test_openai_sdk_maps_status_faults(sim: UpstreamSimulator) -> None:
    client = oai(sim)
    sim.script(
        [
            Fault("rate_limit", retry_after=0.25),
            Fault("server_error"),
            Fault("unavailable"),
            Fault("bad_request"),
            Fault("context_length"),
        ]
    )
    with pytest.raises(openai.RateLimitError) as rate:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert rate.value.status_code == 429 and rate.value.response.headers["retry-after"] == "0.25"
    assert rate.value.response.headers["retry-after-ms"] == "250" and rate.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError) as server:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert server.value.status_code == 500 and server.value.type == "server_error"
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert unavailable.value.status_code == 503
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert bad.value.code == "invalid_value" and bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert too_long.value.code == "context_length_exceeded"
    # The script is used up: back to normal replies.
    assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].finish_reason == "stop"


def test_default_retry_after_is_one_second(sim: UpstreamSimulator) -> None:
    sim.script(["rate_limit"])
    with pytest.raises(openai.RateLimitError) as rate:
        oai(sim).chat.completions.create(model="m", messages=MESSAGES)
    assert rate.value.response.headers["retry-after"] == "1"


def test_openai_inband_error_after_partial_content(sim: UpstreamSimulator) -> None:
    sim.script([Fault("inband_error", after_chunks=2, message="boom")])
    received: list[str] = []
    with pytest.raises(openai.APIError) as err:
        for chunk in oai(sim).chat.completions.create(model="m", messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "Simulated", " answer"]
    assert err.value.message == "boom" and err.value.body["type"] == "server_error"


def test_openai_malformed_chunk_breaks_json_parsing(sim: UpstreamSimulator) -> None:
    sim.script([Fault("malformed_chunk", after_chunks=1), "malformed_chunk"])
    received: list[Any] = []
    with pytest.raises(json.JSONDecodeError):
        for chunk in oai(sim).chat.completions.create(model="m", messages=MESSAGES, stream=True):
            received.append(chunk)
    assert len(received) == 2  # role chunk + one content chunk, then garbage
    with pytest.raises(json.JSONDecodeError):
        oai(sim).chat.completions.create(model="m", messages=MESSAGES)


def test_openai_sdk_sees_dropped_connections_as_connection_errors(sim: UpstreamSimulator) -> None:
    sim.script(["refused", "no_headers", "cut_mid_stream"])
    for _ in range(3):
        with pytest.raises(openai.APIConnectionError):
            oai(sim).chat.completions.create(model="m", messages=MESSAGES)
    refused = openai.OpenAI(base_url=sim.refused_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        refused.chat.completions.create(model="m", messages=MESSAGES)
    assert [r.status for r in sim.requests] == [None, None, 200]


def test_anthropic_sdk_maps_errors(sim: UpstreamSimulator) -> None:
    client = ant(sim)
    sim.script(["rate_limit", "unavailable", Fault("unavailable", status=529), "server_error", "context_length"])
    with pytest.raises(anthropic.RateLimitError) as rate:
        client.messages.create(model="claude", max_tokens=50, messages=ANTHROPIC_MESSAGES)
    assert rate.value.response.headers["retry-after"] == "1"
    assert rate.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(anthropic.ServiceUnavailableError) as unavailable:
        client.messages.create(model="claude", max_tokens=50, messages=ANTHROPIC_MESSAGES)
    assert unavailable.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.OverloadedError):
        client.messages.create(model="claude", max_tokens=50, messages=ANTHROPIC_MESSAGES)
    with pytest.raises(anthropic.InternalServerError) as server:
        client.messages.create(model="claude", max_tokens=50, messages=ANTHROPIC_MESSAGES)
    assert server.value.status_code == 500 and server.value.body["error"]["type"] == "api_error"
    with pytest.raises(anthropic.BadRequestError) as too_long:
        client.messages.create(model="claude", max_tokens=50, messages=ANTHROPIC_MESSAGES)
    assert too_long.value.body["error"]["type"] == "invalid_request_error"
    assert "prompt is too long" in too_long.value.body["error"]["message"]


def test_anthropic_inband_error_event_after_partial_text(sim: UpstreamSimulator) -> None:
    sim.script([Fault("inband_error", after_chunks=3)])
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as err:
        with ant(sim).messages.stream(model="claude", max_tokens=50, messages=ANTHROPIC_MESSAGES) as stream:
            for text in stream.text_stream:
                received.append(text)
    assert received == ["Simulated", " answer", " from"]
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "overloaded_error"


async def test_anthropic_malformed_chunk_is_a_named_event() -> None:
    with UpstreamSimulator() as sim:
        sim.script([Fault("malformed_chunk", after_chunks=0)])
        body = {"model": "claude", "max_tokens": 50, "messages": ANTHROPIC_MESSAGES, "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(sim.url + "/v1/messages", json=body) as resp:
                text = (await resp.read()).decode()
    assert text.endswith("event: content_block_delta\ndata: {this is not json\n\n")
    assert "message_start" in text and "message_stop" not in text


# --- faults on the socket level --------------------------------------------------------------


def test_refused_resets_without_sending_bytes_and_refused_url_refuses(sim: UpstreamSimulator) -> None:
    sim.script(["refused"])
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as sock:
        sock.sendall(raw_request("/v1/chat/completions", {"model": "m", "messages": MESSAGES}))
        try:
            received = read_until_closed(sock)
        except ConnectionResetError:
            received = b""
    assert received == b""
    host, port = sim.refused_url.removeprefix("http://").split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5)


def test_no_headers_reads_the_request_then_closes_silently(sim: UpstreamSimulator) -> None:
    sim.script(["no_headers"])
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as sock:
        sock.sendall(raw_request("/v1/chat/completions", {"model": "m", "messages": MESSAGES}))
        assert read_until_closed(sock) == b""
    record = sim.requests[-1]
    assert record.fault == "no_headers" and record.status is None and record.body["model"] == "m"


def test_keep_alive_serves_several_requests_on_one_connection(sim: UpstreamSimulator) -> None:
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as sock:
        for _ in range(3):
            sock.sendall(raw_request("/v1/chat/completions", {"model": "m", "messages": MESSAGES}))
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            headers, _, rest = head.partition(b"\r\n\r\n")
            assert headers.startswith(b"HTTP/1.1 200")
            length_line = next(h for h in headers.split(b"\r\n") if h.lower().startswith(b"content-length"))
            length = int(length_line.split(b":")[1])
            while len(rest) < length:
                rest += sock.recv(65536)
            assert json.loads(rest)["object"] == "chat.completion"
    assert sim.stats()["total"] == 3


async def test_cut_mid_stream_stops_after_n_chunks_without_done() -> None:
    with UpstreamSimulator() as sim:
        sim.script([Fault("cut_mid_stream", after_chunks=2), "cut_mid_stream"])
        body = {"model": "m", "messages": MESSAGES, "stream": True}
        frames: list[bytes] = []
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.post(sim.url + "/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    async for line in resp.content:
                        if line.startswith(b"data: "):
                            frames.append(line)
            with pytest.raises(aiohttp.ClientPayloadError):  # non-stream: short body
                async with session.post(sim.url + "/v1/chat/completions", json={**body, "stream": False}) as resp:
                    assert resp.status == 200
                    await resp.read()
    assert len(frames) == 3 and not any(b"[DONE]" in f or b"finish_reason\":\"stop" in f for f in frames)


async def test_stall_first_token_sends_headers_then_stalls() -> None:
    with UpstreamSimulator(stall_s=0.5) as sim:
        sim.script(["stall_first_token", Fault("stall_first_token", stall_s=5), Fault("stall_first_token", stall_s=30)])
        body = {"model": "m", "messages": MESSAGES, "stream": True}
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.post(sim.url + "/v1/chat/completions", json=body) as resp:
                headers_after = time.monotonic() - started
                first = await resp.content.readline()
                first_after = time.monotonic() - started
                rest = await resp.read()
            assert resp.status == 200 and headers_after < 0.4 and first_after >= 0.48
            assert first.startswith(b"data: ") and rest.rstrip().endswith(b"[DONE]")

            # Non-stream: nothing at all arrives before the stall ends, so a short timeout fires.
            with pytest.raises(asyncio.TimeoutError):
                timeout = aiohttp.ClientTimeout(total=0.15)
                async with session.post(sim.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=timeout):
                    pass

        # A 30 s stall must not hold up stop().
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(session.post(sim.url + "/v1/chat/completions", json=body))
            await asyncio.sleep(0.1)
            stopped_at = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, sim.stop)
            assert time.monotonic() - stopped_at < 2.0
            with pytest.raises(aiohttp.ClientPayloadError):
                async with await request as resp:
                    await resp.read()
    records = sim.requests
    assert records[1].client_disconnected and not records[2].client_disconnected


# --- script, rates, seeds, latency -----------------------------------------------------------


def test_script_runs_in_order_then_rates_apply_and_model_scripts_are_separate(sim: UpstreamSimulator) -> None:
    client = oai(sim)

    def status(model: str) -> int:
        try:
            client.chat.completions.create(model=model, messages=MESSAGES)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    sim.script([Fault("rate_limit", retry_after=0.1), None, Fault("server_error")])
    sim.script(["unavailable"], model="model-b")
    assert [status("model-b"), status("a"), status("a"), status("a"), status("a")] == [503, 429, 200, 500, 200]
    assert [r.scripted for r in sim.requests] == [True, True, True, True, False]
    stats = sim.stats()
    assert stats["by_fault"]["rate_limit"] == 1 and stats["by_fault"]["unavailable"] == 1
    assert stats["by_model"] == {"model-b": 1, "a": 4} and stats["by_status"]["200"] == 2
    assert stats["by_path"] == {"/v1/chat/completions": 5} and stats["total"] == 5


async def _fault_sequence(seed: int, n: int = 40) -> tuple[list[str | None], list[float]]:
    """Faults and sampled latencies met by ``n`` identical requests."""
    with UpstreamSimulator(seed=seed, fault_rate=0.5, faults=["rate_limit", "server_error"], latency_ms=(0, 4)) as sim:
        async with aiohttp.ClientSession() as session:
            for _ in range(n):
                async with session.post(sim.url + "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}) as r:
                    await r.read()
        records = sim.requests
    return [r.fault for r in records], [r.latency_ms for r in records]


async def test_rate_faults_and_latency_are_reproducible_by_seed() -> None:
    faults_a, latencies_a = await _fault_sequence(seed=7)
    faults_b, latencies_b = await _fault_sequence(seed=7)
    faults_c, latencies_c = await _fault_sequence(seed=8)
    assert faults_a == faults_b != faults_c
    assert latencies_a == latencies_b != latencies_c
    assert 8 < sum(f is not None for f in faults_a) < 32 and set(faults_a) == {None, "rate_limit", "server_error"}
    assert all(0 <= ms <= 4 for ms in latencies_a) and len(set(latencies_a)) > 30


def test_rate_fault_defaults_leave_out_stalls_and_client_errors() -> None:
    assert set(DEFAULT_RATE_FAULTS) == set(FAULT_KINDS) - {"stall_first_token", "bad_request", "context_length"}
    assert SimulatorConfig().rate_kinds == DEFAULT_RATE_FAULTS
    with pytest.raises(ValueError):
        Fault("explode")
    with pytest.raises(ValueError):
        UpstreamSimulator(faults=["nope"])


def test_latency_precedes_the_response() -> None:
    with UpstreamSimulator(latency_ms=(150, 150)) as sim:
        started = time.monotonic()
        oai(sim).chat.completions.create(model="m", messages=MESSAGES)
        assert time.monotonic() - started >= 0.15


def test_reset_restarts_the_seeded_sequence(sim: UpstreamSimulator) -> None:
    sim.configure(fault_rate=0.5, faults=["server_error"], seed=3)
    client = oai(sim)

    def outcomes() -> list[str | None]:
        for _ in range(12):
            try:
                client.chat.completions.create(model="m", messages=MESSAGES)
            except openai.InternalServerError:
                pass
        return [r.fault for r in sim.requests]

    first = outcomes()
    sim.reset()
    assert sim.requests == [] and sim.stats()["total"] == 0
    assert outcomes() == first and "server_error" in first


# --- embeddings, models, validation ----------------------------------------------------------


def test_embeddings_are_deterministic_normalized_and_sized(sim: UpstreamSimulator) -> None:
    client = oai(sim)  # the SDK asks for base64 and decodes it
    texts = ["the cat sat on the mat", "the cat sat on a mat", "quarterly revenue forecast"]
    result = client.embeddings.create(model="text-embedding-3-small", input=texts)
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-5 for v in vectors)
    assert result.usage.prompt_tokens == sum(len(ENC.encode(t)) for t in texts) == result.usage.total_tokens

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    assert cosine(vectors[0], vectors[1]) > 0.5 > cosine(vectors[0], vectors[2])
    again = client.embeddings.create(model="text-embedding-3-small", input=texts[0], dimensions=64)
    assert len(again.data[0].embedding) == 64
    floats = client.embeddings.create(model="e", input=texts[0], encoding_format="float").data[0].embedding
    assert all(abs(x - y) < 1e-6 for x, y in zip(floats, vectors[0]))


def test_models_list_parses_in_both_sdks(sim: UpstreamSimulator) -> None:
    oai(sim).chat.completions.create(model="custom-model", messages=MESSAGES)
    openai_ids = [m.id for m in oai(sim).models.list().data]
    assert "gpt-4o-mini" in openai_ids and "custom-model" in openai_ids
    anthropic_ids = [m.id for m in ant(sim).models.list().data]
    assert "claude-haiku-4-5" in anthropic_ids


def test_invalid_requests_get_provider_shaped_400s(sim: UpstreamSimulator) -> None:
    with pytest.raises(openai.BadRequestError) as no_messages:
        oai(sim).chat.completions.create(model="m", messages=[])
    assert no_messages.value.type == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as no_max_tokens:
        ant(sim).messages.create(model="claude", messages=ANTHROPIC_MESSAGES, max_tokens=0)
    assert no_max_tokens.value.body["error"]["type"] == "invalid_request_error"


# --- remote control and the CLI --------------------------------------------------------------


async def test_remote_control_endpoints(sim: UpstreamSimulator) -> None:
    base = sim.url
    chat = {"model": "m", "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/_sim/script", json={"faults": [{"kind": "server_error"}, None], "model": None}) as r:
            assert r.status == 200 and (await r.json())["scripted"] == 2
        statuses = []
        for _ in range(2):
            async with session.post(base + "/v1/chat/completions", json=chat) as r:
                statuses.append(r.status)
        assert statuses == [500, 200]

        async with session.post(base + "/_sim/config", json={"fault_rate": 1.0, "faults": ["rate_limit"], "latency_ms": [0, 1]}) as r:
            assert (await r.json())["config"]["fault_rate"] == 1.0
        async with session.post(base + "/v1/chat/completions", json=chat) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "1"

        async with session.get(base + "/_sim/stats") as r:
            stats = await r.json()
        assert stats["total"] == 3 and stats["by_fault"]["server_error"] == 1 and stats["by_fault"]["rate_limit"] == 1
        async with session.get(base + "/_sim/requests") as r:
            assert [x["status"] for x in (await r.json())["requests"]] == [500, 200, 429]

        async with session.post(base + "/_sim/reset") as r:
            assert r.status == 200
        async with session.get(base + "/_sim/stats") as r:
            assert (await r.json())["total"] == 0
        async with session.post(base + "/_sim/script", json={"faults": [{"kind": "bogus"}]}) as r:
            assert r.status == 400 and "bogus" in (await r.json())["error"]
        async with session.post(base + "/_sim/config", json={"fault_rate": 3}) as r:
            assert r.status == 400


def test_cli_serves_and_prints_its_url() -> None:
    port = int(UpstreamSimulator().refused_url.rsplit(":", 1)[1])  # a port nothing listens on
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadbear.testing.simulator", "--port", str(port), "--latency-ms", "1:2",
         "--fault-rate", "1", "--faults", "server_error", "--seed", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip().endswith(f"http://127.0.0.1:{port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=MESSAGES)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "Traceback" not in stderr and "Warning" not in stderr
