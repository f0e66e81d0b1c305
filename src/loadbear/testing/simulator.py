"""An HTTP stand-in for OpenAI and Anthropic that injects faults on demand.

Tests, demos and benchmarks talk to it instead of a real provider: it speaks the Chat
Completions, Messages, Embeddings and Models wire formats (streaming included), counts tokens
with the real tokenizer, and fails in the ways real upstreams fail — by a seeded rate or by a
script — so every failure path of the gateway can be exercised offline and reproducibly.

    with UpstreamSimulator(latency_ms=(20, 50)) as sim:
        client = openai.OpenAI(base_url=sim.url + "/v1", api_key="x")
        sim.script([Fault("rate_limit", retry_after=0.1), None])

Run standalone with ``python -m loadbear.testing.simulator --port 8100``; a simulator in
another process is driven through the ``/_sim/*`` control endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import signal
import socket
import threading
from typing import Any, Awaitable, Callable, Iterable, Sequence

import orjson
from aiohttp import web

from .simulator_faults import (
    DEFAULT_RATE_FAULTS,
    FAULT_KINDS,
    STATUS_FAULTS,
    Fault,
    FaultPlan,
    format_seconds,
    plain_error,
    validate_kinds,
)
from .simulator_http import (
    JSON_TYPE,
    SSE_HEADERS,
    Exchange,
    ctl_error,
    drop,
    json_response,
    pacer,
    read_json,
    validate,
)
from .simulator_state import Ledger, RequestRecord, SimulatorConfig
from .simulator_wire import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    AnthropicStream,
    OpenAIStream,
    Reply,
    ReplySource,
    anthropic_message,
    build_reply,
    count_prompt_tokens,
    default_reply,
    embedding_inputs,
    embedding_token_count,
    embeddings_body,
    models_body,
    openai_completion,
    prompt_digest,
    prompt_texts,
    tokenizer,
)

__all__ = [
    "DEFAULT_RATE_FAULTS",
    "FAULT_KINDS",
    "Fault",
    "RequestRecord",
    "SimulatorConfig",
    "UpstreamSimulator",
    "main",
    "serve_forever",
]


_MAX_BODY_BYTES = 64 * 1024 * 1024


class UpstreamSimulator:
    """A fake OpenAI + Anthropic upstream on 127.0.0.1, served from a background thread.

    ``faults`` lists the kinds drawn when ``fault_rate > 0``; None means DEFAULT_RATE_FAULTS
    (every kind except ``stall_first_token``, ``bad_request`` and ``context_length``).
    Latency (uniform in ``latency_ms``) precedes the response headers of every model call
    except ``refused``; ``tokens_per_second`` paces stream chunks and, for non-stream calls,
    adds the generation time before the body.
    """

    def __init__(
        self,
        latency_ms: tuple[float, float] | float = (0, 0),
        tokens_per_second: float | None = None,
        fault_rate: float = 0.0,
        faults: Iterable[str] | None = None,
        seed: int = 0,
        reply_words: int = 20,
        retry_after: float = 1.0,
        stall_s: float = 60.0,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        max_records: int = 100_000,
    ) -> None:
        self._config = SimulatorConfig(
            latency_ms=latency_ms,  # type: ignore[arg-type]  # normalized in __post_init__
            tokens_per_second=tokens_per_second,
            fault_rate=fault_rate,
            faults=None if faults is None else tuple(faults),
            seed=seed,
            reply_words=reply_words,
            retry_after=retry_after,
            stall_s=stall_s,
        )
        self._host, self._requested_port = host, port
        self._port: int | None = None
        self._plan = FaultPlan(seed)
        self._ledger = Ledger(max_records)
        self._replies: dict[str | None, ReplySource] = {}
        self._ids = itertools.count(1)
        self._routes: dict[tuple[str, str], Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("POST", "/v1/messages"): self._messages,
            ("POST", "/v1/messages/count_tokens"): self._count_tokens,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/v1/models"): self._models,
            ("GET", "/_sim/health"): self._ctl_health,
            ("GET", "/_sim/stats"): self._ctl_stats,
            ("GET", "/_sim/requests"): self._ctl_requests,
            ("POST", "/_sim/script"): self._ctl_script,
            ("POST", "/_sim/reset"): self._ctl_reset,
            ("POST", "/_sim/config"): self._ctl_config,
            ("POST", "/_sim/reply"): self._ctl_reply,
        }
        self._refused_url: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "UpstreamSimulator":
        """Serve from a daemon thread with its own event loop; returns once listening."""
        if self._thread is not None:
            return self
        tokenizer()  # load once up front so the first request is not a second late
        ready = threading.Event()
        failure: list[BaseException] = []
        self._stopping = False
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready, failure), name="upstream-simulator", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout=30):
            raise RuntimeError("the upstream simulator did not start listening within 30 s")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop serving; in-flight handlers (stalls, long latencies) are cancelled at once."""
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None or loop is None or event is None:
            return
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:
            pass  # the loop already ended (its thread died): nothing left to stop
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> "UpstreamSimulator":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _thread_main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            # Runner also cancels leftover connection tasks and closes the loop on the way out.
            with asyncio.Runner() as runner:
                runner.run(self._serve(ready.set))
        except BaseException as exc:  # surfaced to start() when it happens before listening
            if not ready.is_set():
                failure.append(exc)
                ready.set()
            else:
                raise

    async def _serve(self, on_ready: Callable[[], None], handle_signals: bool = False) -> None:
        """Listen, call ``on_ready``, run until ``_stop_event``, then tear down quickly."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        loop = self._loop

        def make_request(*args: Any) -> web.BaseRequest:
            # aiohttp caps bodies at 1 MiB by default; real providers take far larger prompts.
            return web.BaseRequest(*args, loop, client_max_size=_MAX_BODY_BYTES)

        server = web.Server(
            self._dispatch, request_factory=make_request, handler_cancellation=True, access_log=None
        )
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._requested_port, reuse_address=True, backlog=1024)
            await site.start()
            self._port = runner.addresses[0][1]
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._loop.add_signal_handler(sig, self._stop_event.set)
            on_ready()
            await self._stop_event.wait()
        finally:
            self._stopping = True
            await self._cancel_in_flight()
            await runner.cleanup()

    async def _cancel_in_flight(self) -> None:
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the simulator is not started; call start() first")
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def refused_url(self) -> str:
        """A base URL where nothing listens: bound once to reserve a free port, then closed."""
        if self._refused_url is None:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                self._refused_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self._refused_url

    # --- control API --------------------------------------------------------------------------

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    def configure(self, **changes: Any) -> SimulatorConfig:
        """Change tunables while running; a new ``seed`` also restarts the RNG sequence."""
        if "faults" in changes and changes["faults"] is not None:
            changes["faults"] = tuple(changes["faults"])
        self._config = dataclasses.replace(self._config, **changes)
        if "seed" in changes:
            self._plan.reseed(self._config.seed)
        return self._config

    def script(self, faults: Sequence[Fault | str | dict[str, Any] | None], model: str | None = None) -> None:
        """The next requests (only those for ``model`` if given) get these outcomes in order;
        None is a normal reply. Replaces any earlier script for the same ``model``."""
        self._plan.set_script(faults, model)

    def set_reply(self, reply: ReplySource | None, model: str | None = None) -> None:
        """Fixed reply text, or a callable ``(request_json) -> str``; None restores the default."""
        if reply is None:
            self._replies.pop(model, None)
        else:
            self._replies[model] = reply

    @property
    def requests(self) -> list[RequestRecord]:
        return self._ledger.records()

    def stats(self) -> dict[str, Any]:
        stats = self._ledger.stats()
        stats["script_pending"] = self._plan.pending()
        return stats

    def reset(self) -> None:
        """Clear script, records, counters and replies, and restart the RNG from the seed, so
        the same requests after a reset meet the same faults and latencies again."""
        self._plan.clear()
        self._plan.reseed(self._config.seed)
        self._ledger.clear()
        self._replies.clear()
        self._ids = itertools.count(1)

    # --- dispatch -----------------------------------------------------------------------------

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            known = any(path == request.path for _, path in self._routes)
            status, err_type = (405, "method_not_allowed") if known else (404, "not_found_error")
            message = f"{request.method} {request.path} is not served by the simulator"
            body = plain_error(status, err_type, message, anthropic=request.path.startswith("/v1/messages"))
            return json_response(status, body)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await handler(request)  # type: ignore[arg-type]
        finally:
            self._tasks.discard(task)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._model_call(request, anthropic=False, embeddings=False)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._model_call(request, anthropic=True, embeddings=False)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._model_call(request, anthropic=False, embeddings=True)

    async def _model_call(self, request: web.Request, *, anthropic: bool, embeddings: bool) -> web.StreamResponse:
        record = self._ledger.open(request.path, {k.lower(): v for k, v in request.headers.items()})
        ex = Exchange(request, record, anthropic, self._config, next(self._ids))
        try:
            body = await read_json(request)
            problem = validate(body, anthropic=anthropic, embeddings=embeddings)
            if body is not None:
                record.body = body
                record.model = body["model"] if isinstance(body.get("model"), str) else None
                record.stream = bool(body.get("stream")) and not embeddings
            self._ledger.count_model(record.model)
            if problem is not None:
                return self._respond_error(ex, 400, plain_error(400, "invalid_request_error", problem, anthropic=anthropic))
            assert body is not None
            return await self._run_call(ex, body, embeddings)
        except asyncio.CancelledError:
            record.client_disconnected = not self._stopping
            raise
        except ConnectionError:
            record.client_disconnected = True
            return web.Response()  # the peer is gone; aiohttp drops this quietly
        finally:
            self._ledger.close(record)

    async def _run_call(self, ex: Exchange, body: dict[str, Any], embeddings: bool) -> web.StreamResponse:
        cfg, record = ex.cfg, ex.record
        ex.model = record.model or ""
        fault, latency, record.scripted = self._plan.draw(record.model, cfg.fault_rate, cfg.rate_kinds, cfg.latency_ms)
        ex.fault = fault
        record.latency_ms = latency * 1000.0
        if fault is not None:
            record.fault = fault.kind
            self._ledger.count_fault(fault.kind)
        kind = fault.kind if fault is not None else None
        if kind == "refused":
            drop(ex.request, reset=True)
            return web.Response()
        if latency > 0:
            await asyncio.sleep(latency)
        if kind == "no_headers":
            await ex.request.read()
            drop(ex.request, reset=False)
            return web.Response()
        if kind in STATUS_FAULTS:
            return self._status_fault(ex)
        if embeddings:
            return await self._send_body(ex, self._embedding_payload(ex, body))
        reply = self._make_reply(body, ex.model, cfg)
        record.prompt_tokens, record.completion_tokens = reply.prompt_tokens, reply.completion_tokens
        if record.stream:
            return await self._stream(ex, reply, body)
        if cfg.tokens_per_second:
            await asyncio.sleep(reply.completion_tokens / cfg.tokens_per_second)
        if ex.anthropic:
            payload = anthropic_message(reply, rid=ex.rid, model=ex.model)
        else:
            payload = openai_completion(reply, rid=ex.rid, model=ex.model, created=ex.created)
        return await self._send_body(ex, payload)

    # --- answers ------------------------------------------------------------------------------

    def _make_reply(self, body: dict[str, Any], model: str, cfg: SimulatorConfig) -> Reply:
        texts = prompt_texts(body)
        prompt_tokens = count_prompt_tokens(body, texts)
        source = self._replies.get(model, self._replies.get(None))
        if source is None:
            text = default_reply(model, prompt_digest(texts), cfg.seed, cfg.reply_words)
        elif callable(source):
            text = str(source(body))
        else:
            text = source
        return build_reply(text, body, prompt_tokens)

    def _embedding_payload(self, ex: Exchange, body: dict[str, Any]) -> bytes:
        raw = body["input"]
        texts = embedding_inputs(raw) or []
        ex.record.prompt_tokens = embedding_token_count(raw, texts)
        dimensions = body.get("dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
        encoding = "base64" if body.get("encoding_format") == "base64" else "float"
        return embeddings_body(
            texts, ex.record.prompt_tokens, model=ex.model, dimensions=dimensions, encoding=encoding
        )

    async def _send_body(self, ex: Exchange, payload: bytes) -> web.StreamResponse:
        """A complete JSON body, or the non-stream variant of a mid-response fault."""
        kind = ex.fault.kind if ex.fault is not None else None
        if kind == "stall_first_token":
            await asyncio.sleep(ex.stall_s)
        elif kind == "malformed_chunk":
            payload = b"{this is not json"
        elif kind == "inband_error":
            payload = orjson.dumps(ex.error_body("inband_error", ex.fault.message if ex.fault else None))
        elif kind == "cut_mid_stream":
            # Promise the whole body, deliver half, hang up: the client sees a short read.
            response = web.StreamResponse(status=200, headers={"Content-Type": JSON_TYPE, **ex.id_headers()})
            response.content_length = len(payload)
            ex.record.status = 200
            await response.prepare(ex.request)
            await response.write(payload[: len(payload) // 2])
            drop(ex.request, reset=False)
            return response
        ex.record.status = 200
        return web.Response(body=payload, status=200, content_type=JSON_TYPE, headers=ex.id_headers())

    def _status_fault(self, ex: Exchange) -> web.Response:
        fault = ex.fault
        assert fault is not None
        status = fault.status or STATUS_FAULTS[fault.kind]
        headers = {}
        if fault.kind == "rate_limit":
            headers["Retry-After"] = format_seconds(ex.retry_after)
            headers["retry-after-ms"] = str(int(round(ex.retry_after * 1000)))
        return self._respond_error(ex, status, ex.error_body(fault.kind, fault.message), headers)

    def _respond_error(
        self, ex: Exchange, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> web.Response:
        ex.record.status = status
        all_headers = {**ex.id_headers(), **(headers or {})}
        return json_response(status, body, all_headers)

    async def _stream(self, ex: Exchange, reply: Reply, body: dict[str, Any]) -> web.StreamResponse:
        """SSE frames: head, one delta per word, tail; mid-stream faults fire after
        ``after_chunks`` deltas. Every frame is written (and so flushed) on its own."""
        fault = ex.fault
        kind = fault.kind if fault is not None else None
        frames: OpenAIStream | AnthropicStream
        if ex.anthropic:
            frames = AnthropicStream(reply, rid=ex.rid, model=ex.model)
        else:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            frames = OpenAIStream(reply, rid=ex.rid, model=ex.model, created=ex.created, include_usage=include_usage)
        response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **ex.id_headers()})
        ex.record.status = 200
        await response.prepare(ex.request)
        if kind == "stall_first_token":
            await asyncio.sleep(ex.stall_s)
        await response.write(frames.head())
        cut_after = fault.after_chunks if kind in ("cut_mid_stream", "malformed_chunk", "inband_error") else None
        pace = pacer(ex.cfg.tokens_per_second, reply)
        for index, piece in enumerate(reply.pieces):
            if cut_after is not None and index >= cut_after:
                break
            if pace is not None:
                await pace(index)
            await response.write(frames.delta(piece))
        if kind == "cut_mid_stream":
            drop(ex.request, reset=False)  # no finish frame, no [DONE], no terminating chunk
            return response
        if kind == "malformed_chunk":
            await response.write(frames.malformed_frame())
            response.force_close()
            return response
        if kind == "inband_error":
            assert fault is not None
            await response.write(frames.error_frame(ex.error_body("inband_error", fault.message, inband=True)))
            response.force_close()
            return response
        await response.write(frames.tail())
        await response.write_eof()
        return response

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if body is None or not isinstance(body.get("messages"), list):
            return json_response(400, plain_error(400, "invalid_request_error", "messages: Field required", anthropic=True))
        return json_response(200, {"input_tokens": count_prompt_tokens(body, prompt_texts(body))})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=models_body(self._ledger.models()), content_type=JSON_TYPE)

    # --- remote control -----------------------------------------------------------------------

    async def _ctl_health(self, request: web.Request) -> web.StreamResponse:
        return json_response(200, {"ok": True, "url": self.url})

    async def _ctl_stats(self, request: web.Request) -> web.StreamResponse:
        return json_response(200, self.stats())

    async def _ctl_requests(self, request: web.Request) -> web.StreamResponse:
        full = request.query.get("full") in ("1", "true")
        return json_response(200, {"requests": [r.to_json(full) for r in self.requests]})

    async def _ctl_script(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if body is None or not isinstance(body.get("faults"), list):
            return ctl_error('expected {"faults": [...], "model": null}')
        try:
            self.script(body["faults"], body.get("model"))
        except (TypeError, ValueError) as exc:
            return ctl_error(str(exc))
        return json_response(200, {"ok": True, "scripted": len(body["faults"]), "pending": self._plan.pending()})

    async def _ctl_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return json_response(200, {"ok": True})

    async def _ctl_config(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        allowed = {f.name for f in dataclasses.fields(SimulatorConfig)}
        if body is None or not set(body) <= allowed:
            return ctl_error(f"expected a JSON object with keys among {sorted(allowed)}")
        try:
            config = self.configure(**body)
        except (TypeError, ValueError) as exc:
            return ctl_error(str(exc))
        return json_response(200, {"ok": True, "config": config.to_json()})

    async def _ctl_reply(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if body is None or not (body.get("text") is None or isinstance(body.get("text"), str)):
            return ctl_error('expected {"text": "..." | null, "model": null}')
        self.set_reply(body.get("text"), body.get("model"))
        return json_response(200, {"ok": True})


# --- standalone ------------------------------------------------------------------------------


def serve_forever(host: str = "127.0.0.1", port: int = 8100, **options: Any) -> None:
    """Serve in the calling thread until SIGINT/SIGTERM; prints the URL once listening."""
    sim = UpstreamSimulator(port=port, host=host, **options)
    tokenizer()

    def announce() -> None:
        print(f"loadbear upstream simulator listening on {sim.url}", flush=True)

    in_main_thread = threading.current_thread() is threading.main_thread()
    try:
        asyncio.run(sim._serve(announce, handle_signals=in_main_thread))
    except KeyboardInterrupt:
        pass


def _latency_arg(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    try:
        return float(low), float(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX milliseconds, got {text!r}") from None


def _faults_arg(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    try:
        validate_kinds(kinds)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return kinds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadbear.testing.simulator",
        description="Fake OpenAI/Anthropic upstream with fault injection.",
    )
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--latency-ms", type=_latency_arg, default=(0.0, 0.0), metavar="MIN:MAX")
    parser.add_argument("--tokens-per-second", type=float, default=None, metavar="N")
    parser.add_argument("--fault-rate", type=float, default=0.0, metavar="R")
    parser.add_argument("--faults", type=_faults_arg, default=None, metavar="KIND,...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reply-words", type=int, default=20)
    parser.add_argument("--retry-after", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--stall-s", type=float, default=60.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    serve_forever(
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        tokens_per_second=args.tokens_per_second,
        fault_rate=args.fault_rate,
        faults=args.faults,
        seed=args.seed,
        reply_words=args.reply_words,
        retry_after=args.retry_after,
        stall_s=args.stall_s,
    )


if __name__ == "__main__":
    main()
