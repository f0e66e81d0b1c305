"""A TCP relay in front of PostgreSQL that counts round trips, for tests and benchmarks.

A round trip is each time the client sends after the server said it is ready for a query (or
first), however many messages the client pipelines before it waits. Point a database URL at
``127.0.0.1:<relay.port>`` and read ``take()`` around the code under test.
"""

from __future__ import annotations

import socket
import threading

# The server's ReadyForQuery message ('Z', length 5): it answers a Sync or a simple query, so the
# client waited for it; results of pipelined statements before the Sync are no wait.
_READY = b"Z\x00\x00\x00\x05"


class PgRoundTripCounter:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.trips = 0
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def take(self) -> int:
        """Round trips since the last ``take()``."""
        with self._lock:
            n, self.trips = self.trips, 0
        return n

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for s in (client, server):
                # Without it, the relay's own batching of small writes would add latency.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state: dict = {"last": "s"}
            for src, dst, side in ((client, server, "c"), (server, client, "s")):
                threading.Thread(target=self._pump, args=(src, dst, state, side), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, side: str) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if side == "c" and state["last"] != "c":
                        self.trips += 1
                        state["last"] = "c"
                    elif side == "s":
                        # The message may straddle two reads: look at the end of the last one too.
                        seen = state.get("tail", b"") + data
                        state["tail"] = seen[-(len(_READY) - 1):]
                        if _READY in seen:
                            state["last"] = "s"
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
