"""Slack's AI-app surfaces through the real bot: the assistant view's greeting and suggested
prompts (the team's most asked questions, public channels only), "is thinking…" and a thread
title, answers streamed with chat.startStream / appendStream / stopStream with the feedback
buttons on the final part, and the fallback to placeholder + chat.update where a workspace
refuses streaming or a stream dies."""
from __future__ import annotations

import itertools
import json

import pytest

from flywheel.app.demo.slack_double import BOT_USER_ID, SlackDouble
from store.conversations import get_message, record_message
from store.db import session_scope
from tests.support.bot_harness import BotServer, store_and_gateway, wait_answer

USER = "UALICE01"
PRIVATE = "CSECRET01"
_TS = itertools.count(1)  # every recorded question its own ts (a repeated ts would overwrite one)


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    with store_and_gateway(tiny_model_dir, tmp_path_factory.mktemp("assistant"), "assistant-test") as gateway:
        double = SlackDouble(streaming=True, private_channels={PRIVATE}).start()
        bot = BotServer(gateway_url=gateway.url, double=double, reports_enabled=False).start()
        yield {"bot": bot, "gateway": gateway, "double": double}
        bot.stop()
        double.stop()


def _asked(channel: str, text: str, times: int) -> None:
    with session_scope() as s:
        for _ in range(times):
            ts = f"1700000000.{next(_TS):06d}"
            record_message(s, channel=channel, ts=ts, thread_ts=ts, role="user",
                           text=f"<@{BOT_USER_ID}> {text}", author=USER)


def test_a_new_assistant_thread_gets_a_greeting_and_the_most_asked_public_questions(env):
    bot, double = env["bot"], env["double"]
    _asked("CPUBLIC01", "Where do I file expenses?", 3)
    _asked("CPUBLIC02", "where do I file expenses", 1)  # the same question, worded a little differently
    _asked("CPUBLIC01", "When is the all-hands?", 2)
    _asked(PRIVATE, "When is the secret launch?", 9)  # asked most, but in a private channel
    thread_ts, resp = bot.sender.assistant_thread_started(user=USER, channel="DASSIST01")
    assert resp.status_code == 200
    prompts = double.wait_for("assistant.threads.setSuggestedPrompts",
                              lambda c: c.args.get("thread_ts") == thread_ts)[0].args
    raw = prompts["prompts"]
    messages = [p["message"] for p in (json.loads(raw) if isinstance(raw, str) else raw)]
    # tests run in any order: the other test's questions may be in the store too
    ours = [m for m in messages if m in ("Where do I file expenses?", "When is the all-hands?")]
    assert ours == ["Where do I file expenses?", "When is the all-hands?"]
    assert not any("secret" in m for m in messages)
    greeting = double.wait_for("chat.postMessage", lambda c: c.args.get("thread_ts") == thread_ts)[0]
    assert greeting.args["channel"] == "DASSIST01" and "Ask me anything" in greeting.args["text"]


def test_opening_the_agent_view_suggests_the_most_asked_public_questions(env):
    """Agent messaging (manifest agent_view): no assistant_thread_started; app_home_opened with the
    Messages tab sets the DM's prompts, without a thread (Slack drops a call that names one)."""
    bot, double = env["bot"], env["double"]
    _asked("CPUBLIC03", "How do I book a meeting room?", 4)
    _asked(PRIVATE, "What is the acquisition code name?", 9)
    assert bot.sender.home_opened(user=USER, tab="messages", channel="DAGENT001").status_code == 200
    call = double.wait_for("assistant.threads.setSuggestedPrompts",
                           lambda c: c.args.get("channel_id") == "DAGENT001")[0]
    assert call.response["ok"] and not call.args.get("thread_ts")
    raw = call.args["prompts"]
    messages = [p["message"] for p in (json.loads(raw) if isinstance(raw, str) else raw)]
    assert "How do I book a meeting room?" in messages and not any("acquisition" in m for m in messages)


def test_an_assistant_question_shows_thinking_gets_a_title_and_streams_its_answer(env):
    bot, double = env["bot"], env["double"]
    channel, root = "DASSIST02", bot.sender.next_ts()
    ts, resp = bot.sender.message("What is our refund policy?", channel=channel, channel_type="im",
                                  thread_ts=root)
    assert resp.status_code == 200
    stop = double.wait_for("chat.stopStream", lambda c: c.args.get("channel") == channel, timeout=60)[0]
    status = double.wait_for("assistant.threads.setStatus", lambda c: c.args.get("thread_ts") == root)[0]
    assert status.args["status"] == "is thinking…"
    titles = double.wait_for("assistant.threads.setTitle", lambda c: c.args.get("thread_ts") == root)
    assert [t.args["title"] for t in titles] == ["What is our refund policy?"]
    start = next(c for c in double.calls_to("chat.startStream") if c.args.get("channel") == channel)
    assert start.args["thread_ts"] == root and start.response["ok"]
    answer_ts = start.response["ts"]
    footer = json.dumps(stop.args.get("blocks"))
    assert "feedback_buttons" in footer and "suggest_correction" in footer  # buttons with the final part
    with session_scope() as s:
        stored = get_message(s, channel, answer_ts)
    shown = double.message(channel, answer_ts)
    assert stored.text and shown["text"].strip() == stored.text.strip().replace("&", "&amp;").replace(
        "<", "&lt;").replace(">", "&gt;")
    assert not shown["streaming"]
    assert not [c for c in double.calls_to("chat.update") if c.args.get("ts") == answer_ts]

    # a second question in the same thread: thinking again, but the title stays
    bot.sender.message("And for digital goods?", channel=channel, channel_type="im", thread_ts=root)
    double.wait_for("chat.stopStream", lambda c: c.args.get("channel") == channel, count=2, timeout=60)
    assert len(double.wait_for("assistant.threads.setStatus", lambda c: c.args.get("thread_ts") == root,
                               count=2)) == 2
    assert len([c for c in double.calls_to("assistant.threads.setTitle") if c.args.get("thread_ts") == root]) == 1


def test_a_threaded_answer_in_a_channel_streams_to_its_asker(env):
    bot, double = env["bot"], env["double"]
    channel = "CSTREAM01"
    q_ts, _ = bot.sender.mention("How do I reset my password?", channel=channel, user=USER)
    double.wait_for("chat.stopStream", lambda c: c.args.get("channel") == channel, timeout=60)
    start = next(c for c in double.calls_to("chat.startStream") if c.args.get("channel") == channel)
    assert (start.args["thread_ts"], start.args["recipient_user_id"]) == (q_ts, USER)
    assert start.args["recipient_team_id"]
    assert not double.calls_to("assistant.threads.setStatus") or all(
        c.args.get("channel_id") != channel for c in double.calls_to("assistant.threads.setStatus"))


def test_a_stream_that_dies_is_finished_with_chat_update(env):
    bot, double = env["bot"], env["double"]
    channel = "CSTREAM02"
    double.fail_next("chat.stopStream", status=200, error="message_not_in_streaming_state", times=2)
    q_ts, _ = bot.sender.mention("What is the office address?", channel=channel)
    start = double.wait_for("chat.startStream", lambda c: c.args.get("channel") == channel, timeout=60)[0]
    answer_ts = start.response["ts"]
    final = double.wait_for("chat.update", lambda c: c.args.get("ts") == answer_ts, timeout=60)[-1]
    assert "suggest_correction" in json.dumps(final.args["blocks"])
    with session_scope() as s:
        assert get_message(s, channel, answer_ts).text


def test_a_workspace_without_streaming_gets_placeholders_and_is_not_asked_again(env):
    with SlackDouble(streaming=False) as double, BotServer(gateway_url=env["gateway"].url, double=double,
                                                           reports_enabled=False) as bot:
        channel = "CNOSTREAM"
        for text in ("First question here?", "Second question here?"):
            q_ts, resp = bot.sender.mention(text, channel=channel)
            assert resp.status_code == 200
            _ts, final = wait_answer(bot, channel, q_ts)
            assert "suggest_correction" in json.dumps(final.args["blocks"])
        refused = double.calls_to("chat.startStream")
        assert len(refused) == 1 and refused[0].response["error"] == "feature_not_enabled"


def test_a_streamed_reply_appends_only_new_text_and_ends_with_the_footer():
    from slack_sdk import WebClient

    from bot import blocks
    from bot.replies import StreamedReply

    with SlackDouble(streaming=True) as double:
        client = WebClient(token=double.bot_token, base_url=double.api_url)
        ts = client.chat_startStream(channel="CUNIT0001", thread_ts="1.000001", recipient_user_id=USER,
                                     recipient_team_id="T0000001")["ts"]
        reply = StreamedReply(client, "CUNIT0001", ts)
        for so_far in (" Fish", " Fish & ch", " Fish & chips ", " Fish & chips "):  # the model's stream
            reply.progress(so_far)
        shown = blocks.answer_blocks("Fish & chips <3", model_version="v1", latency_ms=10, style="feedback_buttons")
        assert reply.finish("Fish & chips <3", shown) and not reply.finish("late", shown)
        appended = [c.args["markdown_text"] for c in double.calls_to("chat.appendStream")]
        assert appended == ["Fish", " &amp; ch", "ips"]  # only what is new, escaped, never re-sent
        stop = double.calls_to("chat.stopStream")
        assert len(stop) == 1 and stop[0].args["markdown_text"] == " &lt;3"
        assert [b["type"] for b in stop[0].args["blocks"]] == ["context", "context_actions", "actions"]
        assert double.message("CUNIT0001", ts)["text"] == "Fish &amp; chips &lt;3"
