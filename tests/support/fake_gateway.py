"""A fast fake gateway: a small real HTTP server on loopback that answers every chat completion at
once with a short streamed answer, except questions holding "[hold]", which wait until `release`
is set. It records when each question arrived. For tests about the bot's own queueing, shutdown
and recovery, where the model's speed would only add time."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GOOD = ('data: {"choices":[{"delta":{"content":"All fine."},"finish_reason":"stop"}],'
        '"model":"base"}\n\ndata: [DONE]\n\n').encode()


class FakeGateway:
    def __init__(self, port: int = 0) -> None:
        self.arrived: list[tuple[float, str]] = []  # (time.monotonic(), the question)
        self.cond = threading.Condition()
        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-gateway").start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def questions(self, word: str) -> list[str]:
        with self.cond:
            return [q for _t, q in self.arrived if word in q]

    def wait_arrived(self, word: str, count: int = 1, timeout: float = 30) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: sum(word in q for _t, q in self.arrived) >= count, timeout):
                raise AssertionError(f"{count} question(s) with {word!r} never reached the gateway")

    def respond(self, handler, question: str) -> None:
        """The answer to one request (`handler._send(status, content type, body)`); a subclass
        answers like a broken gateway."""
        if "[hold]" in question:
            self.release.wait()
        handler._send(200, "text/event-stream", GOOD)

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # /health, /v1/models: whatever is asked, "fine"
                self._send(200, "application/json", b'{"ok": true}')

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = body["messages"][-1]["content"] if body.get("messages") else ""
                with outer.cond:
                    outer.arrived.append((time.monotonic(), question))
                    outer.cond.notify_all()
                try:
                    outer.respond(self, question)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the bot gave up first

            def _send(self, status: int, ctype: str, body: bytes, length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

        return Handler
