"""SSEResponse: batching of ready chunks, disconnect cancellation, and the ledger outcome."""

import asyncio, pytest
from loadbear.api.responses import SSEResponse

class FakeCall:
    def __init__(self): self.finished = []
    def finish(self, status):
        if not self.finished: self.finished.append(status)

class FakeStream:
    def __init__(self, script):
        self.script = script; self.headers = {}; self.call = FakeCall(); self.log = []
    async def body(self):
        status = "cancelled"
        try:
            for item in self.script:
                if isinstance(item, float):
                    await asyncio.sleep(item)
                else:
                    yield item
            status = "ok"
        except asyncio.CancelledError:
            self.log.append("cancelled-in-body"); raise
        finally:
            await asyncio.sleep(0)  # a finally that awaits
            self.log.append("finally")
            self.call.finish(status)
    async def abort(self):
        self.call.finish("cancelled")

async def never():
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}

def run(script, fail_on=None, cancel_after=None):
    st = FakeStream(script); sent = []
    async def send(msg):
        if msg["type"] == "http.response.body":
            if fail_on is not None and len(sent) == fail_on:
                raise OSError("gone")
        sent.append(msg)
    async def main():
        r = SSEResponse(st)
        await r(dict(type="http"), never, send)
    asyncio.run(main())
    return st, sent

def test_coalesces_ready_chunks():
    st, sent = run([b"a", b"b", 0.01, b"c", b"d"])
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert bodies == [b"ab", b"cd", b""], bodies
    assert sent[-1]["more_body"] is False
    assert st.call.finished == ["ok"] and st.log == ["finally"]

def test_send_failure_while_waiting_cancels_the_stream():
    st, sent = run([b"a", 0.05, b"b"], fail_on=1)
    assert "cancelled-in-body" in st.log and "finally" in st.log
    assert st.call.finished == ["cancelled"]

def test_empty_stream():
    st, sent = run([])
    assert [m.get("body") for m in sent if m["type"] == "http.response.body"] == [b""]

def test_every_chunk_waits():
    st, sent = run([0.001, b"a", 0.001, b"b", 0.001])
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert bodies == [b"a", b"b", b""], bodies

def test_disconnect_via_watcher():
    st = FakeStream([b"a", 1.0, b"b"]); sent = []
    async def main():
        ev = asyncio.Event()
        async def receive():
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}
        async def send(msg): sent.append(msg)
        await SSEResponse(st)(dict(type="http"), receive, send)
        return asyncio.current_task().cancelling()
    c = asyncio.run(main())
    assert c == 0
    assert st.call.finished == ["cancelled"] and "cancelled-in-body" in st.log

def test_watcher_cancels_during_send_while_stream_waits():
    st = FakeStream([b"a", 1.0, b"b"]); sent = []
    async def main():
        async def receive():
            await asyncio.sleep(0.02)
            return {"type": "http.disconnect"}
        async def send(msg):
            if msg["type"] == "http.response.body":
                await asyncio.sleep(0.5)  # a slow client: the disconnect lands during this send
            sent.append(msg)
        await SSEResponse(st)(dict(type="http"), receive, send)
        return asyncio.current_task().cancelling()
    c = asyncio.run(main())
    assert c == 0
    assert st.call.finished == ["cancelled"] and "cancelled-in-body" in st.log and "finally" in st.log
