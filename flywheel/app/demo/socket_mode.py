"""Slack's Socket Mode side, on loopback: the websocket server that `apps.connections.open`
points the bot at (the Slack double hands out its URL). It greets with `hello`, pushes
`events_api` / `interactive` / `slash_commands` envelopes, records each ack by `envelope_id` and
how long it took (Slack wants one within 3 s, else it redelivers with `retry_attempt` > 0), and
can ask the client to reconnect (`disconnect` / `refresh_requested`), as Slack does every few
hours. aiohttp serves the websocket: it is already a dependency and runs offline.

Message shapes follow api.slack.com/apis/socket-mode."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

ACK_DEADLINE_S = 3.0  # Slack redelivers an envelope not acked within 3 seconds


class EnvelopeNotAcked(AssertionError):
    """No ack for an envelope within the deadline (Slack would redeliver it)."""


@dataclass
class Envelope:
    """One envelope pushed to the client and, once it came, its ack."""

    envelope_id: str
    type: str
    payload: dict
    sent_at: float = field(default_factory=time.monotonic)
    acked_after_s: float | None = None
    ack: dict | None = None  # the client's whole ack message (`payload` when it answered with one)


class SocketModeServer:
    """Start it, give `url()` to `apps.connections.open`, then `send(...)` envelopes."""

    def __init__(self, app_id: str) -> None:
        self.app_id = app_id
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="socket-mode", daemon=True)
        self._cond = threading.Condition()
        self._sockets: list[web.WebSocketResponse] = []  # open connections, newest last
        self.connections = 0  # websockets opened since start (a reconnect adds one)
        self.envelopes: dict[str, Envelope] = {}
        self.unknown: list[dict] = []  # messages from the client that were not acks
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> SocketModeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/link/", self._connection)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def url(self) -> str:
        """A fresh connection URL, as `apps.connections.open` returns (one ticket per call)."""
        return f"ws://127.0.0.1:{self.port}/link/?ticket={uuid.uuid4()}&app_id={self.app_id}"

    # -- the websocket -----------------------------------------------------------------------
    async def _connection(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        with self._cond:
            self._sockets.append(ws)
            self.connections += 1
            self._cond.notify_all()
        await ws.send_str(json.dumps({
            "type": "hello", "num_connections": len(self._sockets),
            "debug_info": {"host": "applink-local", "build_number": 1, "approximate_connection_time": 18060},
            "connection_info": {"app_id": self.app_id}}))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._received(msg.data)
        finally:
            with self._cond:
                if ws in self._sockets:
                    self._sockets.remove(ws)
                self._cond.notify_all()
        return ws

    def _received(self, raw: str) -> None:
        try:
            message = json.loads(raw)
        except json.JSONDecodeError:
            message = {"raw": raw}
        with self._cond:
            envelope = self.envelopes.get(message.get("envelope_id", ""))
            if envelope is None:
                self.unknown.append(message)
            elif envelope.ack is None:
                envelope.ack, envelope.acked_after_s = message, time.monotonic() - envelope.sent_at
            self._cond.notify_all()

    def _push(self, message: dict) -> None:
        with self._cond:
            if not self._sockets:
                raise ConnectionError("no Socket Mode client is connected")
            ws = self._sockets[-1]  # Slack sends on one of the open connections; the newest here
        asyncio.run_coroutine_threadsafe(ws.send_str(json.dumps(message)), self._loop).result(timeout=5)

    # -- what tests do -----------------------------------------------------------------------
    def wait_connected(self, count: int = 1, timeout: float = 30.0) -> None:
        """Until `count` connections have been opened in all and exactly one is open now: after a
        refresh the client has then moved to its new connection and closed the old one (before
        that, an envelope on the new one could arrive while the client still finishes its handshake)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.connections >= count and len(self._sockets) == 1, timeout):
                raise AssertionError(f"{self.connections} Socket Mode connection(s) opened, {len(self._sockets)} "
                                     f"open; wanted {count} opened and one open")

    def send(self, type_: str, payload: dict, *, retry_attempt: int = 0, retry_reason: str = "",
             envelope_id: str | None = None) -> Envelope:
        """Push one envelope (`events_api`, `interactive` or `slash_commands`)."""
        envelope = Envelope(envelope_id or str(uuid.uuid4()), type_, payload)
        with self._cond:
            self.envelopes[envelope.envelope_id] = envelope
        self._push({"envelope_id": envelope.envelope_id, "type": type_, "payload": payload,
                    "accepts_response_payload": type_ != "events_api",
                    "retry_attempt": retry_attempt, "retry_reason": retry_reason})
        return envelope

    def wait_ack(self, envelope: Envelope, timeout: float = ACK_DEADLINE_S) -> Envelope:
        with self._cond:
            if not self._cond.wait_for(lambda: envelope.ack is not None, timeout):
                raise EnvelopeNotAcked(f"envelope {envelope.envelope_id} ({envelope.type}) not acked within "
                                       f"{timeout} s")
        return envelope

    def refresh(self) -> None:
        """Ask the client to reconnect, as Slack does before it recycles a connection."""
        self._push({"type": "disconnect", "reason": "refresh_requested",
                    "debug_info": {"host": "applink-local"}})
