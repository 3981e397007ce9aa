"""Fair and bounded answering (issue 25, point 5), through the real bot (uvicorn, the local Slack
double, a SQLite store) and a fast fake gateway that answers at once unless a question says
"[hold]": one person's flood is refused politely beyond their share and does not hold up anyone
else; a question waiting for a worker shows "Thinking…" at once and gets its deadline's apology
on time; a shutdown lets answers in flight finish (or apologise); a placeholder a crash left
behind becomes an apology when the bot starts."""
from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from slack_sdk.web import WebClient

from bot import blocks
from flywheel.app.demo.slack_double import SlackDouble
from store.db import session_scope
from store.migrate import upgrade
from store.models import SlackEventReceipt, utcnow
from store.placeholders import KIND, Placeholder, close_placeholder, placeholders_before
from tests.support.bot_harness import BotServer
from tests.support.fake_gateway import FakeGateway
from tests.support.waiting import wait_until

SORRY = ":warning: Sorry"
BUSY = "too many"


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('fair') / 'flywheel.db'}"
    upgrade(url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        mp.setenv("FLYWHEEL_MEMORY", "0")
        yield url


@pytest.fixture
def gateway():
    gw = FakeGateway()
    yield gw
    gw.stop()


def bot_on(gateway: FakeGateway, double: SlackDouble | None = None, **settings) -> BotServer:
    return BotServer(gateway_url=gateway.url, double=double, reports_enabled=False, **settings)


def shown(double: SlackDouble, channel: str) -> list[str]:
    """What the bot's messages in `channel` say now, oldest first."""
    with double.state.lock:
        msgs = [m for (ch, _ts), m in double.state.messages.items() if ch == channel and m.get("bot_id")]
    return [m["text"] for m in sorted(msgs, key=lambda m: float(m["ts"]))]


def dm(bot: BotServer, user: str, text: str) -> str:
    ts, resp = bot.sender.message(text, user=user, channel=f"D{user}", channel_type="im")
    assert resp.status_code == 200
    return ts


def test_a_flood_is_refused_beyond_its_share_and_does_not_hold_up_anyone_else(gateway):
    """Two answer workers; one person may have one answer written and two waiting. Their six
    questions: one at the gateway, two waiting, three told at once to try again. Someone else's
    question meanwhile takes the other worker and is answered while the flood is still held."""
    with bot_on(gateway, listener_threads=2, answer_user_running=1, answer_user_queue=2) as bot:
        for n in range(6):
            dm(bot, "UFLOOD01", f"[hold] flood {n}")
        wait_until(lambda: sum(BUSY in t for t in shown(bot.double, "DUFLOOD01")) == 3,
                   what="three refusals for the flood")
        gateway.wait_arrived("flood")
        dm(bot, "UOTHER01", "a question of my own")
        wait_until(lambda: "All fine." in shown(bot.double, "DUOTHER01"), what="the other person's answer")
        assert len(gateway.questions("flood")) == 1  # the flood still holds one worker, no more
        gateway.release.set()
        wait_until(lambda: shown(bot.double, "DUFLOOD01").count("All fine.") == 3, what="the flood's answers")
        assert all(t.startswith(SORRY) or t == "All fine." for t in shown(bot.double, "DUFLOOD01"))


def test_a_waiting_question_shows_thinking_at_once_and_its_deadline_counts_from_arrival(gateway):
    """One worker, held by someone else's question: the next question gets its placeholder at
    once, and its deadline's apology four seconds after it arrived, not four seconds after a
    worker took it (the first question's own deadline frees the worker only then)."""
    with bot_on(gateway, listener_threads=1, answer_deadline_s=4) as bot:
        dm(bot, "UFIRST01", "[hold] slow one")
        gateway.wait_arrived("slow one")
        dm(bot, "UNEXT001", "[hold] next one")
        wait_until(lambda: shown(bot.double, "DUNEXT001") == [blocks.THINKING], timeout=2,
                   what="the placeholder while no worker is free")
        wait_until(lambda: "too long" in "".join(shown(bot.double, "DUNEXT001")), timeout=6,
                   what="the deadline's apology, counted from the question's arrival")
        gateway.release.set()


def test_shutdown_lets_answers_in_flight_finish_then_apologises_for_the_rest(gateway):
    """At shutdown an answer held at the gateway finishes if it can within the drain; one that
    cannot becomes an apology. Nothing is left "Thinking…", and the gateway client is not closed
    under an answer."""
    with SlackDouble() as double:
        bot = bot_on(gateway, double, answer_drain_s=5).start()
        dm(bot, "UDRAIN01", "[hold] finish me")
        gateway.wait_arrived("finish me")
        timer = threading.Timer(1.0, gateway.release.set)
        timer.start()
        bot.stop()  # what SIGTERM does: uvicorn stops, then the lifespan's drain
        assert shown(double, "DUDRAIN01") == ["All fine."]

        gateway.release.clear()
        bot = bot_on(gateway, double, answer_drain_s=1).start()
        dm(bot, "UDRAIN02", "[hold] never answered")
        gateway.wait_arrived("never answered")
        bot.stop()
        (text,) = shown(double, "DUDRAIN02")
        assert text.startswith(SORRY) and "restarted" in text
        with session_scope() as s:
            assert not placeholders_before(s, utcnow() + timedelta(days=1))


def test_a_placeholder_left_by_a_crash_becomes_an_apology_at_start_up(gateway):
    """A bot killed while answering leaves its placeholder and the store's row for it; the next
    bot's start-up sweep turns the message into an apology and the row goes."""
    with SlackDouble() as double:
        posted = WebClient(token=double.bot_token, base_url=double.api_url).chat_postMessage(
            channel="DCRASH001", text=blocks.THINKING)
        young = Placeholder("DLIVE0001", "1700000000.000001", "dm")  # another replica's, being written
        with session_scope() as s:  # as the killed bot recorded it, two minutes ago
            s.add(SlackEventReceipt(event_id=f"{KIND}:DCRASH001:{posted['ts']}:dm", kind=KIND,
                                    received_at=utcnow() - timedelta(minutes=2)))
            s.add(SlackEventReceipt(event_id=f"{KIND}:DLIVE0001:{young.ts}:dm", kind=KIND))
            s.commit()
        with bot_on(gateway, double, answer_deadline_s=30):
            wait_until(lambda: shown(double, "DCRASH001")[0].startswith(SORRY), what="the sweep's apology")
        with session_scope() as s:
            assert placeholders_before(s, utcnow() + timedelta(days=1)) == [young]  # not past its deadline
            close_placeholder(s, young)
            assert s.get(SlackEventReceipt, f"{KIND}:DCRASH001:{posted['ts']}:dm") is None
        assert "stopped" in json.dumps(double.message("DCRASH001", posted["ts"]))


def test_each_answer_in_a_busy_dm_is_to_its_own_question(gateway):
    """Questions stored on arrival and answered later: two asked in one DM while the only worker
    is busy are each answered to themselves (the context ends at the question), not both to
    the newer one, and no request reaches the gateway without a question."""
    with bot_on(gateway, listener_threads=1) as bot:
        dm(bot, "UFIRST02", "[hold] slow one")
        gateway.wait_arrived("slow one")
        dm(bot, "UTWICE01", "question one")
        dm(bot, "UTWICE01", "question two")
        gateway.release.set()
        wait_until(lambda: shown(bot.double, "DUTWICE01").count("All fine.") == 2, what="both answers")
        assert sorted(gateway.questions("question")) == ["question one", "question two"]
        assert "" not in gateway.questions("")
