"""The bot over Socket Mode, the path `make run` / `flywheel up` take: it opens a real websocket
to the Slack double's Socket Mode server (found through `apps.connections.open` with the app
token), acks every envelope by its id within Slack's 3 s, answers, stores feedback, runs
commands, reconnects when Slack asks it to, and answers a redelivered envelope once."""
from __future__ import annotations

import httpx
import pytest

from store.conversations import get_message
from store.db import session_scope
from store.feedback import feedback_for_message
from flywheel.app.demo.slack_double import BOT_USER_ID
from flywheel.app.demo.socket_mode import ACK_DEADLINE_S
from tests.support.bot_harness import BotServer, store_and_gateway, wait_answer
from tests.support.metrics import metric_value
from tests.support.waiting import wait_until

USER, OTHER = "UALICE01", "UBOB0001"


@pytest.fixture(scope="module")
def bot(tiny_model_dir, tmp_path_factory):
    with store_and_gateway(tiny_model_dir, tmp_path_factory.mktemp("socket"), "socket-test") as gateway:
        bot = BotServer(gateway_url=gateway.url, socket_mode=True, reports_enabled=False).start()
        bot.double.socket_mode.wait_connected(1)
        yield bot
        bot.stop()


def posts_in(bot: BotServer, channel: str) -> int:
    return len([c for c in bot.double.calls_to("chat.postMessage") if c.args.get("channel") == channel])


def acked_in_time(envelope) -> None:
    assert envelope.acked_after_s is not None and envelope.acked_after_s < ACK_DEADLINE_S, envelope


def test_the_bot_connects_with_the_app_token_and_serves_no_http_events(bot):
    opened = bot.double.calls_to("apps.connections.open")
    assert opened and opened[0].token == bot.double.app_token and opened[0].response["ok"]
    assert bot.double.socket_mode.connections >= 1
    assert httpx.get(f"{bot.url}/healthz", timeout=5).json()["mode"] == "socket"
    assert httpx.post(f"{bot.url}/slack/events", content=b"{}", timeout=5).status_code == 404


def test_a_mention_gets_one_threaded_answer(bot):
    channel = "CSOCKET01"
    q_ts, envelope = bot.sender.mention("What does the Flywheel bot do?", channel=channel)
    acked_in_time(envelope)
    a_ts, final = wait_answer(bot, channel, q_ts)
    assert "suggest_correction" in str(final.args["blocks"])
    with session_scope() as s:
        assert get_message(s, channel, q_ts).author == USER and get_message(s, channel, a_ts).text
    assert posts_in(bot, channel) == 1


def test_a_reaction_is_stored(bot):
    channel = "CSOCKET02"
    q_ts, _ = bot.sender.mention("Where is the printer?", channel=channel)
    a_ts, _ = wait_answer(bot, channel, q_ts)
    acked_in_time(bot.sender.reaction("+1", channel=channel, ts=a_ts, user=OTHER))

    def vote():
        with session_scope() as s:
            answer = get_message(s, channel, a_ts)
            return [(f.user, f.value) for f in feedback_for_message(s, answer.id)]
    wait_until(lambda: vote() == [(OTHER, "up")], 30, "the reaction to be stored")


def test_a_slash_command_answers(bot):
    envelope = bot.sender.command("status", user=OTHER)
    acked_in_time(envelope)
    rid = bot.sender.last_response_id
    reply = bot.double.wait_for("response", lambda c: c.args["response_id"] == rid, timeout=60)[0].args
    assert "*Production:*" in reply["text"] and reply["response_type"] == "ephemeral"


def test_a_refresh_reconnects_and_a_redelivered_envelope_is_answered_once(bot):
    server = bot.double.socket_mode
    before = server.connections
    server.refresh()  # Slack: "disconnect", reason refresh_requested
    server.wait_connected(before + 1)
    assert len(bot.double.calls_to("apps.connections.open")) >= before + 1  # a fresh URL for it

    channel = "CSOCKET03"
    ts = bot.sender.next_ts()
    event = {"type": "app_mention", "user": USER, "text": f"<@{BOT_USER_ID}> once please", "ts": ts,
             "channel": channel, "event_ts": ts}
    duplicates = f"{bot.url}/metrics"
    seen = metric_value(duplicates, "flywheel_bot_duplicate_events_total", {})
    first = bot.sender.event(event, event_id="EvSOCKET0001")
    again = bot.sender.event(event, event_id="EvSOCKET0001", retry_num=1)  # Slack thought the ack was lost
    acked_in_time(first)
    acked_in_time(again)
    wait_answer(bot, channel, ts)
    # the bot saw the redelivery and dropped it (its duplicates counter moved), so nothing more comes
    wait_until(lambda: metric_value(duplicates, "flywheel_bot_duplicate_events_total", {}) >= seen + 1, 30)
    assert posts_in(bot, channel) == 1
    with session_scope() as s:
        assert get_message(s, channel, ts) is not None
