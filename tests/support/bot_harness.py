"""The bot under test: its ASGI app served by uvicorn on loopback, its WebClient pointed at the
local Slack double, and a sender of signed Slack requests. Used by the bot tests and the bench."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
import time
from typing import Self

import httpx

from tests.support.net import listening_socket, port_of
from flywheel.app.demo.slack_double import SlackDouble, SlackSender, SocketModeSender

SIGNING_SECRET = "test-signing-secret-0123456789abcdef"
ADMIN_USER = "UADMIN001"
ADMIN_CHANNEL = "CADMIN001"


class BotServer:
    def __init__(self, *, gateway_url: str, double: SlackDouble | None = None, socket_mode: bool = False,
                 **overrides) -> None:
        """`socket_mode`: the bot connects to the double's Socket Mode server (as `flywheel up`
        does with SLACK_APP_TOKEN) and `sender` pushes envelopes there instead of HTTP requests."""
        import uvicorn

        from bot.server import create_asgi
        from bot.settings import BotSettings

        self.own_double = double is None
        self.double = double or SlackDouble().start()
        values = {"slack_bot_token": self.double.bot_token, "slack_signing_secret": SIGNING_SECRET,
                  "slack_api_url": self.double.api_url, "gateway_url": gateway_url, "admins": [ADMIN_USER],
                  "admin_channel": ADMIN_CHANNEL, "report_interval_s": 0.2, "stream_update_interval_s": 0.2,
                  "slack_retries": 2, "max_tokens": 12}
        if socket_mode:
            values["slack_app_token"] = self.double.app_token
        values.update(overrides)
        self.settings = BotSettings(**values)
        self.app = create_asgi(self.settings, socket_mode=socket_mode)
        self._dispatched: set[str] = set()
        self._dispatch_done = threading.Condition()
        self._watch_dispatch(self.app.state.bolt)
        self.sock = listening_socket()  # port 0: the kernel's pick, held from here on
        self.port = port_of(self.sock)
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"bot-{self.port}", daemon=True)
        self.sender = (SocketModeSender(self.double) if socket_mode
                       else SlackSender(f"{self.url}/slack/events", SIGNING_SECRET, double=self.double))

    def _watch_dispatch(self, bolt) -> None:
        """Note each event id once Bolt's dispatch of it returned. Bolt's own middleware (for
        instance the one that drops the bot's own messages) has then run to the end: a dropped
        event can do nothing more. Observation only: the real dispatch does the work."""
        dispatch = bolt.dispatch

        def watched(req):
            try:
                return dispatch(req)
            finally:
                event_id = (req.body or {}).get("event_id") if isinstance(req.body, dict) else None
                if event_id:
                    with self._dispatch_done:
                        self._dispatched.add(event_id)
                        self._dispatch_done.notify_all()

        bolt.dispatch = watched

    def wait_dispatched(self, event_id: str, timeout: float = 30.0) -> None:
        with self._dispatch_done:
            if not self._dispatch_done.wait_for(lambda: event_id in self._dispatched, timeout):
                raise AssertionError(f"event {event_id} not dispatched within {timeout}s")

    def start(self, timeout_s: float = 30.0) -> BotServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if not self.thread.is_alive():
                raise RuntimeError("bot server thread exited during startup")
            time.sleep(0.05)
        raise RuntimeError(f"bot not up after {timeout_s}s")

    def stop(self) -> None:
        self.sender.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        if self.own_double:
            self.double.stop()
        # Every payload this bot sent must be one Slack accepts (blocks, views, lengths).
        assert not self.double.refused, f"Slack would refuse: {self.double.refused}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def suggest_correction(bot: BotServer, channel: str, answer_ts: str, text: str, user: str) -> str:
    """Click "Suggest a better answer" under an answer, submit the modal, and return what the bot
    then tells the author (counted in that channel for that author only: other tests post too)."""

    def to_author(c) -> bool:
        return c.args.get("channel") == channel and c.args.get("user") == user

    before = len([c for c in bot.double.calls_to("chat.postEphemeral") if to_author(c)])
    bot.sender.block_action(action_id="suggest_correction", value="suggest", channel=channel,
                            message_ts=answer_ts, user=user)
    view = bot.double.wait_for("views.open", lambda c: answer_ts in json.dumps(c.args["view"]))[-1].args["view"]
    ok = bot.sender.view_submission(callback_id="correction_modal", private_metadata=view["private_metadata"],
                                    values={"correction": {"text": {"type": "plain_text_input", "value": text}}},
                                    user=user)
    assert ok.status_code == 200 and not ok.content
    return bot.double.wait_for("chat.postEphemeral", to_author, count=before + 1)[-1].args["text"]


def last_reply(bot: BotServer, timeout: float = 60.0) -> dict:
    """What the bot sent to the response_url of the request sent last."""
    rid = bot.sender.last_response_id
    return bot.double.wait_for("response", lambda c: c.args["response_id"] == rid, timeout=timeout)[0].args


def command_reply(bot: BotServer, text: str, *, user: str = ADMIN_USER, channel: str = "CGENERAL1") -> str:
    """A /flywheel command through the bot (acked at once) and the text it answers with."""
    assert bot.sender.command(text, user=user, channel=channel).status_code == 200
    return last_reply(bot)["text"]


def wait_answer(bot: BotServer, channel: str, thread_ts: str | None, *, after: int = 0, timeout: float = 60):
    """The placeholder the bot posted for a question, and the final update that filled it in."""
    def in_thread(c):
        return (c.args.get("channel") == channel and c.args.get("thread_ts") == thread_ts
                and (c.response or {}).get("ok"))
    placeholder = bot.double.wait_for("chat.postMessage", in_thread, count=after + 1, timeout=timeout)[after]
    ts = placeholder.response["ts"]
    final = bot.double.wait_for(
        "chat.update", lambda c: c.args.get("ts") == ts and "_writing…_" not in json.dumps(c.args.get("blocks"), ensure_ascii=False),
        timeout=timeout)[-1]
    return ts, final


@contextmanager
def store_and_gateway(tiny_model_dir, tmp, name: str, max_new_tokens: int = 8):
    """A fresh migrated SQLite store (FLYWHEEL_DATABASE_URL points at it meanwhile) and a real
    gateway serving the tiny model: what a module of bot tests starts once."""
    import pytest

    from gateway.settings import GatewaySettings
    from store.migrate import upgrade
    from tests.support.gateway_server import GatewayServer

    url = f"sqlite:///{tmp / 'flywheel.db'}"
    upgrade(url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        gateway = GatewayServer(GatewaySettings(base_model=tiny_model_dir, adapters_dir=tmp / "adapters",
                                                sync_interval_s=30, max_new_tokens=max_new_tokens,
                                                replica_id=name)).start()
        try:
            yield gateway
        finally:
            gateway.stop()
