"""The Slack bot end to end: the real Bolt app served by uvicorn on loopback, driven with signed
Slack requests; its WebClient talks to the local Slack double; answers come from a real gateway
serving the tiny model; everything lands in a real (SQLite) store.

The bot and gateway are shared by the module (they take seconds to start); every test works in
channels of its own and asks its own questions, so the tests pass alone and in any order. That
the bot left something alone is proven by its ignored-events or duplicates counter moving (the
handler decided and returned), then checking that nothing was posted or stored."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from flywheel.adapters import base_model_id
from gateway.settings import GatewaySettings
from store.audit import list_audit
from store.conversations import count_messages, get_message, thread_messages
from store.db import session_scope
from store.examples import list_examples
from store.feedback import feedback_for_message
from store.migrate import upgrade
from store.models import Feedback, Role, RunStatus, SlackEventReceipt, VersionStatus
from store.runs import finish_run, get_run, list_runs, record_progress, start_run
from store.versions import PRODUCTION, alias_target, get_version, register_version
from tests.support.adapters import make_adapter, register
from tests.support.bot_harness import ADMIN_CHANNEL, ADMIN_USER, BotServer, suggest_correction, wait_answer
from tests.support.gateway_server import GatewayServer
from tests.support.metrics import metric_value
from tests.support.net import port_of, refusing_socket
from flywheel.app.demo.slack_double import BOT_USER_ID
from tests.support.waiting import wait_until

GATEWAY_ADMIN = "gateway-admin-token"
USER, OTHER, CAROL = "UALICE01", "UBOB0001", "UCAROL01"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request, tiny_model_dir, tmp_path_factory):
    """The whole setup once per store kind: SQLite file and a real PostgreSQL server."""
    tmp = tmp_path_factory.mktemp("bot")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'flywheel.db'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    upgrade(url)
    adapters = tmp / "adapters"
    make_adapter(tiny_model_dir, adapters / "ft-0001", seed=1)
    make_adapter(tiny_model_dir, adapters / "ft-0002", seed=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        base = base_model_id(tiny_model_dir)
        register(adapters / "ft-0001", "ft-0001", base_model=base)
        from flywheel.adapters import adapter_digest

        with session_scope() as s:  # a version the evaluation gate rejected
            register_version(s, name="ft-0002", adapter_path=str(adapters / "ft-0002"),
                             adapter_sha256=adapter_digest(adapters / "ft-0002"), base_model=base,
                             gate_passed=False, gate_reasons=["golden pass rate 0.50 < 1.00"])
        gateway = GatewayServer(GatewaySettings(
            base_model=tiny_model_dir, admin_token=GATEWAY_ADMIN, adapters_dir=adapters, sync_interval_s=30,
            max_new_tokens=8, replica_id="bot-test")).start()
        # Alice and Carol review corrections: theirs count at once (the review queue has its own tests).
        bot = BotServer(gateway_url=gateway.url, gateway_admin_token=GATEWAY_ADMIN,
                        reviewers=[USER, CAROL]).start()
        sent: list[dict] = []  # what the bot asked the gateway (its own outgoing requests)
        http = bot.app.state.bolt.flywheel["gateway"].http
        http.event_hooks["request"].append(
            lambda req: sent.append(json.loads(req.content)) if req.url.path.endswith("/chat/completions") else None)
        yield {"bot": bot, "gateway": gateway, "sent": sent, "tmp": tmp, "adapters": adapters}
        bot.stop()
        gateway.stop()


@pytest.fixture
def bot(env):
    return env["bot"]


class Counted:
    """A counter on the bot's /metrics page, read before an action; `wait(n)` blocks until it
    moved by n: the bot has handled (and here: deliberately dropped) what the test sent."""

    def __init__(self, bot: BotServer, name: str, **labels: str) -> None:
        self.url, self.name, self.labels = f"{bot.url}/metrics", name, labels
        self.before = self.now()

    def now(self) -> float:
        return metric_value(self.url, self.name, self.labels)

    def wait(self, n: int = 1, timeout: float = 30.0) -> None:
        wait_until(lambda: self.now() >= self.before + n, timeout, f"{self.name}{self.labels} to move by {n}")


def ignored(bot: BotServer, reason: str) -> Counted:
    return Counted(bot, "flywheel_bot_ignored_events_total", reason=reason)


def has_feedback_buttons(blocks) -> bool:
    raw = json.dumps(blocks)
    return "feedback_buttons" in raw and "suggest_correction" in raw


def posts_in(bot: BotServer, channel: str) -> int:
    """Messages the bot posted in one channel (other tests post elsewhere, at any time)."""
    return len([c for c in bot.double.calls_to("chat.postMessage") if c.args.get("channel") == channel])


def stored(channel: str, ts: str):
    with session_scope() as s:
        return get_message(s, channel, ts)


def votes(message_id: int, include_retracted: bool = False) -> list[Feedback]:
    with session_scope() as s:
        return feedback_for_message(s, message_id, include_retracted=include_retracted)


def production_label() -> str:
    with session_scope() as s:
        return alias_target(s, PRODUCTION) or "base"


def ask(bot: BotServer, text: str, channel: str, **kw):
    """Mention the bot; return (question ts, answer ts, final update call)."""
    q_ts, resp = bot.sender.mention(text, channel=channel, **kw)
    assert resp.status_code == 200, resp.text
    a_ts, final = wait_answer(bot, channel, kw.get("thread_ts") or q_ts)
    return q_ts, a_ts, final


# -- answering ------------------------------------------------------------------------------------
def test_mention_gets_a_threaded_answer_with_buttons_and_is_stored(bot):
    channel = "CANSWER01"
    q_ts, resp = bot.sender.mention("What does the Flywheel bot do?", channel=channel)
    assert resp.status_code == 200 and not resp.content  # acked (how fast: bench/bot/run.py)
    a_ts, final = wait_answer(bot, channel, q_ts)
    # this answer's placeholder (other tests' posts, e.g. reports in the admin channel, come and go)
    placeholder = next(c for c in bot.double.calls_to("chat.postMessage")
                       if c.args.get("channel") == channel and (c.response or {}).get("ts") == a_ts)
    assert placeholder.args["thread_ts"] == q_ts and "Thinking" in placeholder.args["text"]
    assert has_feedback_buttons(final.args["blocks"])
    question, answer = stored(channel, q_ts), stored(channel, a_ts)
    assert question.role == Role.user and question.author == USER and "Flywheel bot" in question.text
    assert answer.role == Role.assistant and answer.error is None and answer.text
    assert answer.model_version == production_label()
    assert answer.latency_ms and answer.latency_ms > 0
    assert final.args["text"] == answer.text[:3000]
    assert answer.conversation_id == question.conversation_id


def test_two_turn_thread_keeps_the_dialogue_context(bot, env):
    channel = "CTHREAD01"
    q1, a1, _ = ask(bot, "My name is Ada. Remember it.", channel)
    first_answer = stored(channel, a1).text
    env["sent"].clear()
    q2, resp = bot.sender.message("What is my name?", channel=channel, thread_ts=q1)
    assert resp.status_code == 200
    a2, _ = wait_answer(bot, channel, q1, after=1)
    request = env["sent"][-1]
    assert request["model"] == "production" and request["stream"] is True
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "user"]
    assert request["messages"][0]["content"] == "My name is Ada. Remember it."  # mention stripped
    assert request["messages"][1]["content"] == first_answer.strip()
    assert request["messages"][2]["content"] == "What is my name?"
    with session_scope() as s:
        thread = thread_messages(s, channel, q1)
    assert [m.ts for m in thread] == [q1, a1, q2, a2]
    # a message in a thread the bot is not part of gets no answer
    before = posts_in(bot, channel)
    not_ours = ignored(bot, "not_our_thread")
    other_root = bot.sender.next_ts()
    bot.sender.message("just chatting", channel=channel, thread_ts=other_root)
    not_ours.wait()
    assert posts_in(bot, channel) == before
    assert stored(channel, other_root) is None


def test_direct_messages_are_answered_at_top_level(bot):
    channel = "DDIRECT01"
    ts, resp = bot.sender.message("hello there", channel=channel, channel_type="im")
    assert resp.status_code == 200
    a_ts, final = wait_answer(bot, channel, None)
    assert has_feedback_buttons(final.args["blocks"])
    assert stored(channel, ts).role == Role.user and stored(channel, a_ts).role == Role.assistant


def test_gateway_down_gives_a_friendly_message_and_keeps_the_question(env):
    held = refusing_socket()  # bound, never listening: connections there are refused
    dead = f"http://127.0.0.1:{port_of(held)}"
    with held, BotServer(gateway_url=dead, reports_enabled=False, gateway_connect_retry_s=0) as down:
        channel = "CDOWN0001"
        q_ts, resp = down.sender.mention("Are you there?", channel=channel)
        assert resp.status_code == 200
        a_ts, final = wait_answer(down, channel, q_ts)
        assert "can't reach the model" in final.args["text"]
        assert not has_feedback_buttons(final.args["blocks"])
        assert stored(channel, q_ts).text.endswith("Are you there?")
        failed = stored(channel, a_ts)
        assert failed.error and "gateway" in failed.error and failed.model_version is None
        # feedback on an apology is ignored: it is not an answer
        not_an_answer = ignored(down, "not_an_answer")
        down.sender.reaction("+1", channel=channel, ts=a_ts)
        not_an_answer.wait()
        assert votes(failed.id) == []


def test_a_bare_mention_gets_a_hint_not_a_model_call(bot, env):
    channel = "CBARE0001"
    calls = len(env["sent"])
    q_ts, _ = bot.sender.mention(" ", channel=channel)
    hint = bot.double.wait_for("chat.postMessage", lambda c: c.args.get("channel") == channel)[-1]
    assert "Ask me something" in hint.args["text"] and hint.args["thread_ts"] == q_ts
    assert len(env["sent"]) == calls and stored(channel, q_ts).role == Role.user


def test_slack_rate_limits_are_retried_after_retry_after(bot):
    """The double refuses any call made before a 429's Retry-After has passed (as Slack does), so
    a second, successful call proves the bot waited as long as it was told."""
    channel = "CRATELIM1"
    bot.double.fail_next("chat.postMessage", status=429, error="ratelimited", retry_after=1)
    try:
        _, a_ts, _ = ask(bot, "Rate limits?", channel)
    finally:
        bot.double.clear_limits()
    posts = [c for c in bot.double.calls_to("chat.postMessage") if c.args.get("channel") == channel]
    assert len(posts) == 2 and posts[0].response["error"] == "ratelimited" and posts[1].response["ok"]
    assert stored(channel, a_ts).role == Role.assistant


def test_slack_rate_limit_retries_run_out(bot):
    """Limited on every try (the harness allows 2 retries): three calls, then the bot gives up;
    the question stays stored, no answer is."""
    channel = "CRATELIM2"
    gave_up = Counted(bot, "flywheel_bot_answers_total", outcome="slack_error")
    bot.double.fail_next("chat.postMessage", status=429, error="ratelimited", retry_after=1,
                         times=bot.settings.slack_retries + 1)
    try:
        q_ts, resp = bot.sender.mention("Still rate limited?", channel=channel)
        assert resp.status_code == 200
        gave_up.wait(timeout=60)
    finally:
        bot.double.clear_limits()  # the last 429's Retry-After would slow the next test's posts
    posts = [c for c in bot.double.calls_to("chat.postMessage") if c.args.get("channel") == channel]
    assert [c.response["error"] for c in posts] == ["ratelimited"] * (bot.settings.slack_retries + 1)
    with session_scope() as s:
        assert [m.role for m in thread_messages(s, channel, q_ts)] == [Role.user]


# -- security -------------------------------------------------------------------------------------
def test_forged_signature_and_stale_timestamp_are_rejected_and_nothing_is_stored(bot):
    channel = "CFORGED01"
    calls_before = len(bot.double.calls)
    with session_scope() as s:
        before, runs_before = count_messages(s), len(list_runs(s, limit=100))
    ts = bot.sender.next_ts()
    forged = bot.sender.message("forged", channel=channel, channel_type="im", ts=ts, secret="not-the-secret")[1]
    stale = bot.sender.message("stale", channel=channel, channel_type="im", ts=bot.sender.next_ts(),
                               timestamp=int(time.time()) - 6 * 60)[1]
    cmd = bot.sender.post_raw("command=%2Fflywheel&text=train&user_id=" + ADMIN_USER,
                              content_type="application/x-www-form-urlencoded", secret="nope")
    unsigned = httpx.post(bot.sender.url, json={"type": "event_callback", "event": {}})
    # Refused before anything was dispatched: the 401 itself is the proof nothing runs later.
    assert [r.status_code for r in (forged, stale, cmd, unsigned)] == [401, 401, 401, 401]
    with session_scope() as s:
        assert count_messages(s) == before and len(list_runs(s, limit=100)) == runs_before
    assert len(bot.double.calls) == calls_before
    assert stored(channel, ts) is None


def test_the_same_event_delivered_three_times_is_answered_once(bot):
    channel = "CRETRY001"
    ts = bot.sender.next_ts()
    event = {"type": "app_mention", "user": USER, "text": f"<@{BOT_USER_ID}> once please", "ts": ts,
             "channel": channel, "event_ts": ts}
    duplicates = Counted(bot, "flywheel_bot_duplicate_events_total")
    as_message = ignored(bot, "mention")
    responses = [bot.sender.event(event, event_id="EvRETRY0001", retry_num=n or None) for n in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    # the same message also arrives as a plain message event (channel subscriptions)
    bot.sender.event({**event, "type": "message", "channel_type": "channel"}, event_id="EvRETRY0002")
    wait_answer(bot, channel, ts)
    duplicates.wait(2)  # both retries were seen and dropped...
    as_message.wait()  # ...and so was the message-event copy
    posts = [c for c in bot.double.calls_to("chat.postMessage") if c.args.get("channel") == channel]
    assert len(posts) == 1
    with session_scope() as s:
        assert s.get(SlackEventReceipt, "EvRETRY0001") is not None
        assert len(thread_messages(s, channel, ts)) == 2


def test_messages_from_bots_and_ourselves_are_ignored(bot):
    channel = "DBOTS0001"
    before = posts_in(bot, channel)
    # an edit is never a question: bot/forgetting.py takes it (this one names no person, so it changes nothing)
    from_bots, edits = ignored(bot, "from_a_bot"), ignored(bot, "edit_not_a_person")
    ts1 = bot.sender.next_ts()
    bot.sender.event({"type": "message", "subtype": "bot_message", "bot_id": "BOTHER01", "text": "beep",
                      "ts": ts1, "channel": channel, "channel_type": "im"})
    ts2 = bot.sender.next_ts()  # our own message: Bolt's middleware drops it before any listener
    bot.sender.event({"type": "message", "user": BOT_USER_ID, "text": "my own words", "ts": ts2,
                      "channel": channel, "channel_type": "im"}, event_id="EvOWNWORDS01")
    ts3 = bot.sender.next_ts()
    bot.sender.event({"type": "message", "subtype": "message_changed", "user": USER, "ts": ts3,
                      "channel": channel, "channel_type": "im", "message": {"text": "edited"}})
    from_bots.wait()
    edits.wait()
    bot.wait_dispatched("EvOWNWORDS01")
    assert posts_in(bot, channel) == before
    assert all(stored(channel, t) is None for t in (ts1, ts2, ts3))


# -- feedback -------------------------------------------------------------------------------------
def answer_in(bot: BotServer, channel: str, question: str) -> dict:
    """An answer of the test's own (its channel, its question) to give feedback on."""
    q_ts, a_ts, _ = ask(bot, question, channel)
    return {"channel": channel, "q": q_ts, "a": a_ts, "id": stored(channel, a_ts).id}


def reply(bot: BotServer, timeout: float = 30.0) -> dict:
    """What the bot answered on the response_url of the request sent last."""
    rid = bot.sender.last_response_id
    return bot.double.wait_for("response", lambda c: c.args["response_id"] == rid, timeout=timeout)[0].args


def test_reactions_vote_change_and_removal_retracts(bot):
    answered = answer_in(bot, "CFBREACT1", "Where is the printer on the third floor?")
    ch, a, mid = answered["channel"], answered["a"], answered["id"]
    send = bot.sender.reaction
    assert send("thumbsup::skin-tone-3", channel=ch, ts=a, user=USER).status_code == 200
    assert send("-1", channel=ch, ts=a, user=OTHER).status_code == 200
    assert send("question", channel=ch, ts=a, user=OTHER).status_code == 200  # a label emoji
    assert send("tada", channel=ch, ts=a, user=OTHER).status_code == 200  # means nothing here
    _wait(lambda: len(votes(mid)) >= 3)
    live = {(v.user, v.kind): v.value for v in votes(mid)}
    assert live == {(USER, "reaction"): "up", (OTHER, "reaction"): "down", (OTHER, "label"): "unclear"}
    # Alice changes her mind: the latest vote wins; then she removes it: retracted, not lost
    send("-1", channel=ch, ts=a, user=USER)
    _wait(lambda: {(v.user, v.kind): v.value for v in votes(mid)}.get((USER, "reaction")) == "down")
    send("+1", channel=ch, ts=a, user=USER, removed=True)  # removing an emoji she no longer has: no-op
    send("-1", channel=ch, ts=a, user=USER, removed=True)
    _wait(lambda: (USER, "reaction") not in {(v.user, v.kind) for v in votes(mid)})
    row = next(v for v in votes(mid, include_retracted=True) if v.user == USER and v.kind == "reaction")
    assert row.retracted and row.value == "down" and [h["value"] for h in row.history] == ["up", "down"]
    # reactions on a person's message (not the bot's) are ignored
    not_an_answer = ignored(bot, "not_an_answer")
    send("+1", channel=ch, ts=answered["q"], user=OTHER, item_user=USER)
    not_an_answer.wait()
    assert votes(stored(ch, answered["q"]).id, include_retracted=True) == []


def _wait(predicate, timeout: float = 30.0) -> None:
    wait_until(predicate, timeout)


def test_feedback_buttons_record_votes(bot):
    answered = answer_in(bot, "CFBBUTTN1", "Who approves vacation requests?")
    ch, a, mid = answered["channel"], answered["a"], answered["id"]
    resp = bot.sender.block_action(action_id="answer_feedback", action_type="feedback_buttons", value="up",
                                   channel=ch, message_ts=a, user="UCAROL01")
    assert resp.status_code == 200
    _wait(lambda: any(v.kind == "button" and v.user == "UCAROL01" for v in votes(mid)))
    bot.sender.block_action(action_id="answer_feedback", action_type="feedback_buttons", value="down",
                            channel=ch, message_ts=a, user="UCAROL01")
    _wait(lambda: [v.value for v in votes(mid) if v.kind == "button"] == ["down"])
    bot.sender.block_action(action_id="vote_up", value="up", channel=ch, message_ts=a, user=ADMIN_USER)
    _wait(lambda: any(v.user == ADMIN_USER and v.kind == "button" and v.is_admin for v in votes(mid)))
    thanks = reply(bot)
    assert "Thanks" in thanks["text"] and thanks["response_type"] == "ephemeral"


def test_modal_correction_becomes_a_training_example(bot):
    from trainer.targets import derive_examples

    answered = answer_in(bot, "CFBMODAL1", "What is the refund policy?")
    ch, a, mid = answered["channel"], answered["a"], answered["id"]
    bot.sender.block_action(action_id="suggest_correction", value="suggest", channel=ch, message_ts=a)
    opened = bot.double.wait_for("views.open", lambda c: ch in json.dumps(c.args["view"]))[-1]
    view = opened.args["view"]
    assert view["callback_id"] == "correction_modal" and "refund policy" in json.dumps(view)
    meta = view["private_metadata"]
    # an empty correction keeps the modal open with the reason
    empty = bot.sender.view_submission(callback_id="correction_modal", private_metadata=meta,
                                       values={"correction": {"text": {"type": "plain_text_input", "value": "  "}}})
    assert empty.status_code == 200 and empty.json()["response_action"] == "errors"
    gold = "Refunds are possible within 30 days with the receipt."
    ok = bot.sender.view_submission(callback_id="correction_modal", private_metadata=meta,
                                    values={"correction": {"text": {"type": "plain_text_input", "value": gold}}})
    assert ok.status_code == 200 and not ok.content  # acked: the modal closes
    row = next(v for v in votes(mid) if v.kind == "correction")
    assert row.value == "correction" and row.correction == gold and row.user == USER
    bot.double.wait_for("chat.postEphemeral", lambda c: c.args.get("user") == USER and c.args.get("channel") == ch)
    # the trainer turns it into an example: the question as context, the correction as target
    with session_scope() as s:
        derive_examples(s, admins=frozenset({ADMIN_USER}))
        examples = [e for e in list_examples(s) if e.answer == gold]
    assert len(examples) == 1
    assert examples[0].messages[-1]["role"] == "user" and "refund policy" in examples[0].messages[-1]["content"]
    assert examples[0].rejected_answer == stored(ch, a).text


def test_message_shortcuts_include_and_golden(bot):
    answered = answer_in(bot, "CFBSHORT1", "How do I reset my VPN token?")
    ch, a, mid = answered["channel"], answered["a"], answered["id"]
    bot.sender.message_shortcut(callback_id="add_to_training", channel=ch, message_ts=a, user=OTHER)
    _wait(lambda: any(v.kind == "shortcut" and v.value == "include" for v in votes(mid)))
    bot.sender.message_shortcut(callback_id="mark_golden", channel=ch, message_ts=a, user=OTHER)
    assert "Only Flywheel admins" in reply(bot)["text"]
    assert not any(v.kind == "golden" for v in votes(mid))
    bot.sender.message_shortcut(callback_id="mark_golden", channel=ch, message_ts=a, user=ADMIN_USER)
    assert "Marked as a golden example" in reply(bot)["text"]
    assert any(v.kind == "golden" and v.is_admin for v in votes(mid))
    with session_scope() as s:
        audit = [e for e in list_audit(s, action="answer.golden") if e.target in (f"message {ch}/{a}", f"message {mid}")]
    assert {(e.actor, e.outcome) for e in audit} == {(OTHER, "refused"), (ADMIN_USER, "ok")}
    # a shortcut on a message that is not a bot answer explains itself and records nothing
    bot.sender.message_shortcut(callback_id="add_to_training", channel=ch, message_ts=answered["q"],
                                message_user=USER)
    assert "not one of them" in reply(bot)["text"]


# -- admin ----------------------------------------------------------------------------------------
def command(bot: BotServer, text: str, user: str, channel: str = "CGENERAL1") -> dict:
    """Run a slash command; the bot acks at once and answers through the response_url."""
    resp = bot.sender.command(text, user=user, channel=channel)
    assert resp.status_code == 200 and not resp.content  # acked empty; the answer comes later
    rid = bot.sender.last_response_id
    return bot.double.wait_for("response", lambda c: c.args["response_id"] == rid, timeout=60)[0].args


def test_non_admin_promote_is_refused_and_audited(bot):
    before = production_label()
    reply = command(bot, "promote ft-0001", user=OTHER)
    assert reply["response_type"] == "ephemeral" and "Only Flywheel admins" in reply["text"]
    assert production_label() == before
    with session_scope() as s:
        refusal = list_audit(s, action="command.promote")[0]
    assert (refusal.actor, refusal.outcome, refusal.target) == (OTHER, "refused", "ft-0001")
    for text in ("train", "rollback", "reject ft-0001"):
        assert "Only Flywheel admins" in command(bot, text, user=OTHER)["text"]


def test_admin_approve_moves_the_alias_and_the_gateway_serves_it(bot):
    reply = command(bot, "approve ft-0001", user=ADMIN_USER)
    assert reply["response_type"] == "in_channel" and "promoted `ft-0001`" in reply["text"], reply
    assert "gateway synced" in reply["text"]
    with session_scope() as s:
        assert alias_target(s, PRODUCTION) == "ft-0001"
        assert get_version(s, "ft-0001").status == VersionStatus.production
        move = list_audit(s, action="alias.move")[0]
    assert (move.actor, move.detail["to"]) == (ADMIN_USER, "ft-0001")
    # the next answer comes from the promoted version (the gateway swapped on /admin/sync)
    _, a_ts, final = ask(bot, "Who serves this?", "CPROMOTE1")
    assert stored("CPROMOTE1", a_ts).model_version == "ft-0001"
    assert "ft-0001" in json.dumps(final.args["blocks"])
    # a version the gate rejected needs --force with a reason
    refused = command(bot, "approve ft-0002", user=ADMIN_USER)
    assert refused["response_type"] == "ephemeral" and "did not pass the evaluation gate" in refused["text"]
    assert production_label() == "ft-0001"
    assert "needs a reason" in command(bot, "approve ft-0002 --force", user=ADMIN_USER)["text"]
    forced = command(bot, 'promote ft-0002 --force "hotfix for the demo"', user=ADMIN_USER)
    assert "forced" in forced["text"] and production_label() == "ft-0002"
    # rollback returns to the previous version; history shows the moves
    back = command(bot, "rollback", user=ADMIN_USER)
    assert "to `ft-0001`" in back["text"] and production_label() == "ft-0001"
    history = command(bot, "history", user=OTHER)["text"]
    assert "`ft-0002` → `ft-0001`" in history and "hotfix for the demo" in history
    with session_scope() as s:
        errors = [e for e in list_audit(s, action="command.approve") if e.outcome == "error"]
    assert errors and "did not pass" in errors[-1].detail["error"]


def _candidate(env, name: str, tiny_model_dir, run_id: int | None = None, **kw) -> None:
    with session_scope() as s:
        register_version(s, name=name, adapter_path=str(env["adapters"] / "ft-0001"), adapter_sha256="0" * 64,
                         base_model=base_model_id(tiny_model_dir), gate_passed=True,
                         gate_reasons=["all gates passed"], run_id=run_id, **kw)


def version_status(name: str) -> VersionStatus:
    with session_scope() as s:
        return get_version(s, name).status


def test_admin_rejects_a_candidate_by_command(bot, env, tiny_model_dir):
    _candidate(env, "ft-0004", tiny_model_dir)
    assert "Only Flywheel admins" in command(bot, "reject ft-0004", user=OTHER)["text"]
    assert version_status("ft-0004") == VersionStatus.candidate
    done = command(bot, "reject ft-0004", user=ADMIN_USER)
    assert done["response_type"] == "in_channel" and f"<@{ADMIN_USER}> rejected `ft-0004`" in done["text"]
    assert version_status("ft-0004") == VersionStatus.rejected
    with session_scope() as s:
        audit = [(e.actor, e.outcome) for e in list_audit(s, action="version.reject") if e.target == "ft-0004"]
    assert audit == [(ADMIN_USER, "ok")]


def test_admin_rejects_a_candidate_under_its_report(bot, env, tiny_model_dir):
    """The Reject button under a finished run's report: refused for others; for an admin the
    version is rejected and the report says so, its buttons gone."""
    with session_scope() as s:
        run_id = start_run(s, owner="test-trainer", hyperparams={"steps": 1}).id
    _candidate(env, "ft-0005", tiny_model_dir, run_id=run_id,
               report={"candidate": {"token_f1": 0.4, "golden_pass": 1.0}})
    with session_scope() as s:
        finish_run(s, run_id, RunStatus.succeeded, model_version="ft-0005")

    def report():
        for c in bot.double.calls:
            shown = json.dumps(c.args.get("blocks"))
            if c.method in ("chat.postMessage", "chat.update") and "report_reject" in shown and '"ft-0005"' in shown:
                return c
        return None

    shown = wait_until(report, 60, "the run report with its buttons")
    ts = shown.args.get("ts") or shown.response["ts"]
    message = {"type": "message", "ts": ts, "blocks": _maybe_json(shown.args["blocks"]), "user": BOT_USER_ID}
    bot.sender.block_action(action_id="report_reject", value="ft-0005", channel=ADMIN_CHANNEL, message_ts=ts,
                            user=OTHER, message=message)
    assert "Only Flywheel admins can `reject`" in reply(bot)["text"]
    assert version_status("ft-0005") == VersionStatus.candidate
    bot.sender.block_action(action_id="report_reject", value="ft-0005", channel=ADMIN_CHANNEL, message_ts=ts,
                            user=ADMIN_USER, message=message)
    updated = bot.double.wait_for(
        "chat.update", lambda c: c.args.get("ts") == ts and "rejected `ft-0005`" in json.dumps(c.args))[-1]
    assert "report_reject" not in json.dumps(updated.args["blocks"])
    assert version_status("ft-0005") == VersionStatus.rejected
    with session_scope() as s:
        kinds = {(e.actor, e.action, e.outcome) for e in list_audit(s) if e.target == "ft-0005"}
    assert {(OTHER, "command.reject", "refused"), (ADMIN_USER, "version.reject", "ok")} <= kinds


def _maybe_json(value):
    return json.loads(value) if isinstance(value, str) else value


def test_read_only_commands(bot):
    assert "`/flywheel` commands" in command(bot, "help", user=OTHER)["text"]
    assert "`/flywheel` commands" in command(bot, "", user=OTHER)["text"]
    status = command(bot, "status", user=OTHER)
    assert status["response_type"] == "ephemeral"
    assert "*Production:*" in status["text"] and "questions" in status["text"]
    versions = command(bot, "versions", user=OTHER)["text"]
    assert "`ft-0001`" in versions and "gate failed" in versions
    unknown = command(bot, "launch rockets", user=OTHER)["text"]
    assert "unknown command `launch`" in unknown
    assert "check the quotes" in command(bot, 'approve "ft-0001', user=ADMIN_USER)["text"]


# -- training reports -----------------------------------------------------------------------------
def _plot(path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.bar(["base", "candidate"], [0.2, 0.7])
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def test_train_queues_a_run_whose_report_is_one_updated_message_with_buttons(bot, env, tiny_model_dir):
    queued = command(bot, "train", user=ADMIN_USER)
    assert queued["response_type"] == "in_channel" and "queued training run" in queued["text"]
    run_id = int(queued["text"].split("queued training run #", 1)[1].split(".", 1)[0])
    with session_scope() as s:
        assert list_audit(s, action="run.queue")[0].target == f"run {run_id}"
        assert list_audit(s, action="run.queue")[0].actor == ADMIN_USER

    def in_admin(c) -> bool:  # this run's report in the admin channel
        return c.args.get("channel") == ADMIN_CHANNEL and f"Training run #{run_id}" in json.dumps(c.args)

    first = bot.double.wait_for("chat.postMessage", in_admin)[-1]
    report_ts = first.response["ts"]
    # the trainer claims the run and reports progress: the same message is updated
    with session_scope() as s:
        run = start_run(s, owner="test-trainer", hyperparams={"steps": 10})
        assert run.id == run_id
        record_progress(s, run_id, step=5, total_steps=10, point={"loss": 1.25})
    progress = bot.double.wait_for("chat.update",
                                   lambda c: c.args.get("ts") == report_ts and "50%" in json.dumps(c.args))[-1]
    plan = next(b for b in _maybe_json(progress.args["blocks"]) if b["type"] == "plan")  # Slack's task cards
    tasks = {t["task_id"]: t for t in plan["tasks"]}
    assert tasks["dataset"]["status"] == "in_progress" and tasks["register"]["status"] == "pending"
    assert "step 5/10" in json.dumps(tasks["train"]["details"])
    # it finishes and registers a candidate with a report and a plot
    with session_scope() as s:
        version = register_version(
            s, name="ft-0003", adapter_path=str(env["adapters"] / "ft-0001"), adapter_sha256="0" * 64,
            base_model=base_model_id(tiny_model_dir), gate_passed=True, gate_reasons=["all gates passed"],
            report={"candidate": {"token_f1": 0.71, "golden_pass": 1.0},
                    "production": {"token_f1": 0.52, "golden_pass": 1.0},
                    "base": {"token_f1": 0.17, "golden_pass": 0.5}},
            report_path=_plot(env["tmp"] / "ft-0003.png"), run_id=run_id,
            report_plot=(env["tmp"] / "ft-0003.png").read_bytes())
        finish_run(s, run_id, RunStatus.succeeded, model_version=version.name)
    final = bot.double.wait_for(
        "chat.update", lambda c: c.args.get("ts") == report_ts and "report_approve" in json.dumps(c.args))[-1]
    text = json.dumps(final.args["blocks"])
    assert "Gate passed" in text and "token_f1" in text and "0.710" in text and "candidate" in text
    done = bot.double.wait_for("files.completeUploadExternal", lambda c: c.args.get("thread_ts") == report_ts)[-1]
    assert done.response["ok"] and done.args["channel_id"] == ADMIN_CHANNEL and done.args["thread_ts"] == report_ts
    assert [c for c in bot.double.calls_to("upload")][-1].args["bytes"] > 100
    _wait(lambda: get_run_reported(run_id))
    posts = [c for c in bot.double.calls_to("chat.postMessage") if in_admin(c) and not c.args.get("thread_ts")]
    assert len(posts) == 1  # progress updated one message (the report is up to date: no post pending)
    # Approve under the report: refused for a non-admin, done for an admin
    message = {"type": "message", "ts": report_ts, "blocks": final.args["blocks"], "user": BOT_USER_ID}
    bot.sender.block_action(action_id="report_approve", value="ft-0003", channel=ADMIN_CHANNEL,
                            message_ts=report_ts, user=OTHER, message=message)
    assert "Only Flywheel admins can `approve`" in reply(bot)["text"]
    assert production_label() != "ft-0003"
    bot.sender.block_action(action_id="report_approve", value="ft-0003", channel=ADMIN_CHANNEL,
                            message_ts=report_ts, user=ADMIN_USER, message=message)
    updated = bot.double.wait_for(
        "chat.update", lambda c: c.args.get("ts") == report_ts and "promoted `ft-0003`" in json.dumps(c.args))[-1]
    assert "report_approve" not in json.dumps(updated.args["blocks"])
    assert production_label() == "ft-0003"
    with session_scope() as s:
        kinds = {(e.actor, e.action, e.outcome) for e in list_audit(s)}
    assert (OTHER, "command.approve", "refused") in kinds and (ADMIN_USER, "alias.move", "ok") in kinds
    command(bot, "rollback", user=ADMIN_USER)


def get_run_reported(run_id: int) -> bool:
    with session_scope() as s:
        return get_run(s, run_id).reported_at is not None


# -- App Home -------------------------------------------------------------------------------------
def test_app_home_shows_production_runs_counts_and_worst_answers(bot):
    answered = answer_in(bot, "CHOME0001", "What is the travel budget per trip?")
    bot.sender.reaction("-1", channel=answered["channel"], ts=answered["a"], user="UDAVE001")
    _wait(lambda: any(v.user == "UDAVE001" for v in votes(answered["id"])))
    with session_scope() as s:  # a run of its own to show (a queued run another test may claim: finish it)
        run = start_run(s, owner="test-trainer", hyperparams={"steps": 1})
        finish_run(s, run.id, RunStatus.cancelled, error="nothing to learn")
    published = len([c for c in bot.double.calls_to("views.publish") if c.args.get("user_id") == ADMIN_USER])
    assert bot.sender.home_opened(user=ADMIN_USER).status_code == 200
    view = bot.double.wait_for("views.publish", lambda c: c.args.get("user_id") == ADMIN_USER,
                               count=published + 1)[-1].args["view"]
    text = json.dumps(view, ensure_ascii=False)
    assert view["type"] == "home"
    assert f"`{production_label()}`" in text and "Questions" in text and "Most 👎 answers" in text
    with session_scope() as s:
        runs = list_runs(s, limit=3)
    assert runs and runs[0].id == run.id and all(f"#{r.id} " in text for r in runs)
    assert "travel budget" in text  # the 👎 answer's question
    assert "You are a Flywheel admin" in text


# -- correction memory ----------------------------------------------------------------------------
def correct_answer(bot: BotServer, channel: str, answer_ts: str, text: str, user: str = USER) -> None:
    """Suggest a better answer through the modal and wait until the bot says it will use it."""
    thanks = suggest_correction(bot, channel, answer_ts, text, user)
    assert "I use it from now on" in thanks, thanks


def test_a_correction_answers_a_paraphrase_right_away_with_its_source(bot):
    """No training, no approval: the next person asking in other words gets the corrected answer,
    and the answer says where it came from."""
    gold = "Expense reports are due on the 5th working day of each month, in Ledgerly."
    _q, a_ts, first = ask(bot, "When are expense reports due at Lumenfold?", "CMEMORY01")
    assert stored("CMEMORY01", a_ts).text != gold
    correct_answer(bot, "CMEMORY01", a_ts, gold)
    _q, a2, final = ask(bot, "by when do I have to hand in my expense report at lumenfold", "CMEMORY02",
                        user=OTHER)
    answer = stored("CMEMORY02", a2)
    assert answer.text == gold and answer.model_version == "memory"
    shown = json.dumps(final.args["blocks"])
    assert f"Answered from a correction by <@{USER}>" in shown and has_feedback_buttons(final.args["blocks"])


def test_a_correction_made_in_a_dm_never_reaches_anyone_else(bot, env):
    gold = "Your parking spot is P-17 on level -2, next to the bike room."
    carol, dm = CAROL, "DCAROL001"
    q_ts = bot.sender.next_ts()
    bot.sender.event({"type": "message", "user": carol, "text": "Where is my parking spot at Lumenfold?",
                      "ts": q_ts, "channel": dm, "channel_type": "im"})
    a_ts, _ = wait_answer(bot, dm, None)
    correct_answer(bot, dm, a_ts, gold, user=carol)
    # Bob asks the very same question in a public channel: the model answers, not Carol's DM
    sent_before = len(env["sent"])
    _q, a2, final = ask(bot, "Where is my parking spot at Lumenfold?", "CPUBLIC01", user=OTHER)
    answer = stored("CPUBLIC01", a2)
    assert answer.model_version != "memory" and gold not in answer.text
    assert all(gold not in json.dumps(req) for req in env["sent"][sent_before:])  # not even as a note
    assert f"<@{carol}>" not in json.dumps(final.args["blocks"])  # nothing of Carol's cited either
    # Carol, in her DM, gets her own correction back
    q3 = bot.sender.next_ts()
    bot.sender.event({"type": "message", "user": carol, "text": "where's my parking spot at lumenfold?",
                      "ts": q3, "channel": dm, "channel_type": "im"})
    a3, _ = wait_answer(bot, dm, None, after=1)
    assert stored(dm, a3).text == gold
