"""Trust in the loop, the bot's side (issue 10, points 4, 5, 6, 10 and 11): App Home keeps DMs
and other people's figures private, logs never hold what people wrote, oversized and badly
signed requests are refused before anything reads them, and no fault after a question leaves
it unanswered: the database refusing writes, a gateway sending garbage or breaking off, an
answer past its deadline, every answer worker stuck, or the gateway restarting.

Real parts throughout: the bot served by uvicorn, the local Slack double, a real gateway with
the tiny model, a real SQLite store (made to refuse writes by holding its write lock, which
is what a busy or broken database looks like to the bot), and, for garbage, a small real HTTP
server that answers like a broken gateway."""
from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
import urllib.parse
from contextlib import contextmanager

import httpx
import pytest
from prometheus_client import REGISTRY

from bot.replays import request_key
from gateway.settings import GatewaySettings
from store.audit import list_audit
from store.conversations import get_message
from store.db import session_scope
from store.feedback import feedback_for_message
from store.migrate import upgrade
from store.versions import PRODUCTION, alias_target, move_alias
from tests.support.adapters import make_adapter, register
from tests.support.bot_harness import ADMIN_USER, BotServer
from tests.support.fake_gateway import GOOD, FakeGateway
from tests.support.gateway_server import GatewayServer
from flywheel.app.demo.slack_double import BOT_USER_ID, SlackDouble
from tests.support.waiting import wait_until

SECRET = "tangerine-7Q3Z-payroll-do-not-log"  # what people write: never in a log line
REVIEWER = "UREVIEW01"
PRIVATE = "CPRIVATE1"
APOLOGY = ":warning: Sorry"  # how every apology the bot shows begins
THINKING_MARKS = ("Thinking", "_writing…_")


# -- the setup ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    """One SQLite store (writers give up after 1 s of a held lock) and a real gateway."""
    tmp = tmp_path_factory.mktemp("trust")
    path = tmp / "flywheel.db"
    url = f"sqlite:///{path}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_SQLITE_BUSY_TIMEOUT_S", "1")  # before the first engine on this URL
        upgrade(url)
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        gateway = GatewayServer(GatewaySettings(
            base_model=tiny_model_dir, adapters_dir=tmp / "adapters", sync_interval_s=30, max_new_tokens=8,
            replica_id="trust-test")).start()
        try:
            yield {"db": path, "gateway": gateway, "tmp": tmp}
        finally:
            gateway.stop()


@pytest.fixture(scope="module")
def bot(env):
    """The bot on the real gateway, with a reviewer and one private channel."""
    double = SlackDouble(private_channels={PRIVATE}).start()
    server = BotServer(gateway_url=env["gateway"].url, double=double, reviewers=[REVIEWER],
                       reports_enabled=False).start()
    yield server
    server.stop()
    double.stop()


class BrokenGateway(FakeGateway):
    """The fake gateway (a real HTTP server on loopback) answering the way a broken gateway
    would, chosen by a word in the question: [garbage] a stream of JSON that is not chunks,
    [cut] a stream that breaks off, [notjson] a 200 whose body is not JSON, [hold] nothing
    until released, then a good answer."""

    def respond(self, handler, question: str) -> None:
        if "[garbage]" in question:
            handler._send(200, "text/event-stream", b"data: [1, 2, 3]\n\ndata: [DONE]\n\n")
        elif "[cut]" in question:  # promises more than it sends, then hangs up
            handler._send(200, "text/event-stream", b'data: {"choices":[{"delta":{"content":"All"}}]}\n\n',
                          length=10_000)
            handler.close_connection = True
        elif "[notjson]" in question:
            handler._send(200, "application/json", b"<html>upstream hiccup</html>")
        else:  # [hold] and anything else: wait for the test, then answer well
            self.release.wait()
            handler._send(200, "text/event-stream", GOOD)


@pytest.fixture(scope="module")
def broken(env):
    gw = BrokenGateway()
    yield gw
    gw.stop()


@contextmanager
def write_lock(db_path):
    """The store refuses writes: another connection holds SQLite's write lock (the bot's
    writers give up after the 1 s busy timeout set for this module)."""
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


class LogTap(logging.Handler):
    """Every standard-library log record (Bolt, uvicorn, httpx...), formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record) -> None:
        self.lines.append(self.format(record))

    @contextmanager
    def attached(self):
        loggers = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")]
        for lg in loggers:
            lg.addHandler(self)
        try:
            yield self
        finally:
            for lg in loggers:
                lg.removeHandler(self)


# -- helpers --------------------------------------------------------------------------------------
def final_update(bot: BotServer, channel: str, answer_ts: str, timeout: float = 60):
    """The update that left the placeholder: an answer or an apology, not progress."""
    def done(c):
        shown = json.dumps(c.args.get("blocks"), ensure_ascii=False) + str(c.args.get("text"))
        return c.args.get("ts") == answer_ts and not any(m in shown for m in THINKING_MARKS)
    return bot.double.wait_for("chat.update", lambda c: c.args.get("channel") == channel and done(c),
                               timeout=timeout)[-1]


def placeholder(bot: BotServer, channel: str, count: int = 1, timeout: float = 60):
    calls = bot.double.wait_for(
        "chat.postMessage", lambda c: c.args.get("channel") == channel and (c.response or {}).get("ok"),
        count=count, timeout=timeout)
    return calls[count - 1].response["ts"]


def ask(bot: BotServer, text: str, channel: str, **kw) -> tuple[str, str, object]:
    """Mention the bot; (question ts, answer ts, the final update)."""
    q_ts, resp = bot.sender.mention(text, channel=channel, **kw)
    assert resp.status_code == 200, resp.text
    a_ts = placeholder(bot, channel)
    return q_ts, a_ts, final_update(bot, channel, a_ts)


def ask_in_dm(bot: BotServer, text: str, user: str, channel: str) -> tuple[str, str, object]:
    q_ts, resp = bot.sender.message(text, user=user, channel=channel, channel_type="im")
    assert resp.status_code == 200, resp.text
    a_ts = placeholder(bot, channel)
    return q_ts, a_ts, final_update(bot, channel, a_ts)


def stored(channel: str, ts: str):
    with session_scope() as s:
        return get_message(s, channel, ts)


def home_of(bot: BotServer, user: str) -> str:
    before = len([c for c in bot.double.calls_to("views.publish") if c.args.get("user_id") == user])
    assert bot.sender.home_opened(user=user).status_code == 200
    view = bot.double.wait_for("views.publish", lambda c: c.args.get("user_id") == user,
                               count=before + 1)[-1].args["view"]
    return json.dumps(view, ensure_ascii=False)


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- 4. App Home privacy --------------------------------------------------------------------------
def test_home_shows_people_their_own_figures_and_never_quotes_a_dm(bot):
    """Amy asks in a DM, Cal in a public channel, Dee in a private one; Bob and Eve 👎 all three
    answers. Bob (no admin) sees his own figures and no one's questions; the admin and the
    reviewer see the worst answers, but only the public one is quoted."""
    _q, dm_a, _ = ask_in_dm(bot, "amethyst: when is my salary review?", user="UAMY0001", channel="DAMY00001")
    _q, pub_a, _ = ask(bot, "quokka: where is the coffee machine?", "CPUBLIC91", user="UCAL0001")
    _q, priv_a, _ = ask(bot, "heron: who is on the layoff list?", PRIVATE, user="UDEE0001")
    answers = [("DAMY00001", dm_a), ("CPUBLIC91", pub_a), (PRIVATE, priv_a)]
    for channel, ts in answers:
        for voter in ("UBOB0001", "UEVE0001"):
            bot.sender.reaction("-1", channel=channel, ts=ts, user=voter)

    def all_votes_in() -> bool:
        with session_scope() as s:
            return all(len(feedback_for_message(s, stored(ch, ts).id)) == 2 for ch, ts in answers)
    wait_until(all_votes_in, what="six 👎 stored")

    bob = home_of(bot, "UBOB0001")
    for private_word in ("amethyst", "quokka", "heron", "Most 👎"):
        assert private_word not in bob, private_word
    assert "Your questions*\\n0" in bob and "👎 3" in bob  # his own three votes, not the team's six

    for staff in (ADMIN_USER, REVIEWER):
        view = home_of(bot, staff)
        assert "Most 👎 answers" in view and "quokka" in view and "👎 6" in view
        assert "amethyst" not in view and "heron" not in view


# -- 6. the edge of the bot's HTTP ----------------------------------------------------------------
def test_oversized_unsigned_and_badly_timed_requests_are_refused_before_parsing(bot):
    sender = bot.sender
    ok = sender.event_body({"type": "app_mention", "user": "UALICE01", "text": f"<@{BOT_USER_ID}> hi",
                            "ts": sender.next_ts(), "channel": "CEDGE0001"})
    padded = ok[:-1] + ', "pad": "' + "x" * (1024 * 1024) + '"}'  # a signed, well-formed 1 MB event
    assert sender.post_raw(padded).status_code == 413

    # a declared 2 MB body of which nothing is sent: refused on its Content-Length alone
    # (a server that started reading would wait for the body and never answer)
    with socket.create_connection(("127.0.0.1", bot.port), timeout=30) as raw:
        raw.sendall(b"POST /slack/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2000000\r\n\r\n")
        assert raw.recv(64).startswith(b"HTTP/1.1 413")

    def chunks():  # no Content-Length: the body is counted while it is read
        for _ in range(20):
            yield b"y" * 65536
    chunked = sender.client.post(sender.url, content=chunks(), headers=sender.headers("x"))
    assert chunked.status_code == 413

    bad_clock = sender.post_raw(ok, extra={"X-Slack-Request-Timestamp": "abc"})
    assert bad_clock.status_code == 401  # was 500
    # an unsigned interactive payload that is not even JSON: refused, not parsed (was 500)
    unsigned = httpx.post(sender.url, content=b"payload=%7Bnot-json",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert unsigned.status_code == 401
    assert counter("flywheel_bot_rejected_requests_total", reason="too large") >= 2
    assert counter("flywheel_bot_rejected_requests_total", reason="bad timestamp") >= 1


# -- 5. logs never hold what people wrote ---------------------------------------------------------
def test_logs_never_hold_message_text_or_request_bodies(bot, env, capsys):
    """A question answered, a forged and an oversized request, and a question while the store
    refuses writes (its driver's error quotes the statement's parameters) all carry the
    secret; the bot's logs name channels, kinds and reasons, never the text."""
    tap = LogTap()
    with tap.attached():
        _q, a_ts, _ = ask(bot, f"what is {SECRET}?", "CLOGS0001")
        bot.sender.block_action(action_id="suggest_correction", value="suggest", channel="CLOGS0001",
                                message_ts=a_ts)
        modal = bot.double.wait_for("views.open", lambda c: "CLOGS0001" in json.dumps(c.args["view"]))[-1]
        forged = bot.sender.mention(f"forged {SECRET}", channel="CLOGS0002", secret="not-the-secret")[1]
        assert forged.status_code == 401
        assert bot.sender.post_raw(json.dumps({"x": SECRET * 40000})).status_code == 413
        with write_lock(env["db"]):
            bot.sender.message(f"while the store is down: {SECRET}", user="UALICE01", channel="DLOGS0003",
                               channel_type="im")
            sorry = bot.double.wait_for("chat.postMessage", lambda c: c.args.get("channel") == "DLOGS0003")[-1]
            refused = bot.sender.view_submission(  # a correction the store cannot take
                callback_id="correction_modal", private_metadata=modal.args["view"]["private_metadata"],
                values={"correction": {"text": {"type": "plain_text_input", "value": f"{SECRET} is 42"}}})
            assert "try again" in refused.text
        assert sorry.args["text"].startswith(APOLOGY)
    out = capsys.readouterr()
    logs = out.out + out.err + "\n".join(tap.lines)
    assert "answered" in logs and "CLOGS0001" in logs  # the tap heard the bot at all
    assert "request rejected" in logs and "bad signature" in logs and "too large" in logs
    assert "cannot store the question" in logs and "DLOGS0003" in logs
    assert "cannot store the correction" in logs and "OperationalError" in logs  # with its traceback
    assert SECRET not in logs


# -- 10. every failure after the placeholder ends in an apology ------------------------------------
@pytest.fixture(scope="module")
def shaky(broken):
    """The bot on the broken gateway."""
    with BotServer(gateway_url=broken.url, reports_enabled=False, gateway_connect_retry_s=0) as server:
        yield server


@pytest.mark.parametrize("fault", ["[garbage]", "[cut]"])
def test_a_gateway_sending_garbage_or_breaking_off_gets_an_apology(shaky, fault):
    channel = "CFAULT" + ("001" if fault == "[garbage]" else "002")
    _q, a_ts, final = ask(shaky, f"{fault} what now?", channel)
    assert final.args["text"].startswith(APOLOGY)
    assert stored(channel, a_ts).error  # the apology is in the thread's history, marked failed


def test_a_gateway_answering_not_json_gets_an_apology(broken):
    with BotServer(gateway_url=broken.url, reports_enabled=False, stream=False) as server:
        _q, a_ts, final = ask(server, "[notjson] hello?", "CFAULT003")
        assert final.args["text"].startswith(APOLOGY)


def test_the_store_refusing_the_answer_gets_an_apology(shaky, broken, env):
    """The question is stored and the model is asked; then the store refuses writes: the
    answer cannot be kept, so the placeholder says sorry instead of staying 'Thinking…'."""
    channel = "CFAULT004"
    broken.release.clear()
    q_ts, _ = shaky.sender.mention("[hold] the store goes away now", channel=channel)
    a_ts = placeholder(shaky, channel)
    broken.wait_arrived("the store goes away now")
    with write_lock(env["db"]):
        broken.release.set()
        final = final_update(shaky, channel, a_ts)
    assert final.args["text"].startswith(APOLOGY)
    assert stored(channel, q_ts) is not None
    # the model's answer is never kept; once the store is back the apology may be (as a failed answer)
    kept = stored(channel, a_ts)
    assert kept is None or (kept.error and kept.text.startswith(APOLOGY)), kept


def test_an_answer_past_its_deadline_gets_an_apology(broken):
    broken.release.clear()
    with BotServer(gateway_url=broken.url, reports_enabled=False, answer_deadline_s=2) as server:
        _q, a_ts, final = ask(server, "[hold] this takes forever", "CFAULT005")
        assert final.args["text"].startswith(APOLOGY) and "too long" in final.args["text"]
    broken.release.set()


def test_rollback_runs_while_every_answer_worker_is_stuck(broken, env, tiny_model_dir):
    """Two answer workers, both waiting on a gateway that does not answer: `/flywheel rollback`
    still runs at once (its own worker pool) and production moves back."""
    from flywheel.adapters import base_model_id

    adapter = make_adapter(tiny_model_dir, env["tmp"] / "adapters" / "ft-trust", seed=3)
    register(adapter, "ft-trust", base_model=base_model_id(tiny_model_dir))
    with session_scope() as s:
        move_alias(s, PRODUCTION, "ft-trust", actor=ADMIN_USER, reason="test setup")
    broken.release.clear()
    with BotServer(gateway_url=broken.url, reports_enabled=False, listener_threads=2) as server:
        for n in range(2):
            server.sender.mention(f"[hold] stuck {n}", channel=f"CSTUCK00{n}")
        broken.wait_arrived("stuck", count=2)  # both workers are inside a gateway call
        resp = server.sender.command("rollback", user=ADMIN_USER, channel="CADMIN001")
        assert resp.status_code == 200
        reply = server.double.wait_for(
            "response", lambda c: c.args["response_id"] == server.sender.last_response_id)[-1]
        assert "rolled production back" in reply.args["text"]
        with session_scope() as s:
            assert alias_target(s, PRODUCTION) is None
        broken.release.set()


# -- 11. a gateway restart is waited for --------------------------------------------------------
class HeldPortGateway:
    """The real gateway, served on a socket the test bound earlier (port 0) and held without
    listening: until it starts, connections to that port are refused."""

    def __init__(self, settings, sock: socket.socket) -> None:
        import uvicorn

        from gateway.app import create_app

        config = uvicorn.Config(create_app(settings), log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def start(self) -> HeldPortGateway:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_a_refused_gateway_is_retried_until_it_is_back(env, tiny_model_dir):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # held, not listening: a gateway that is restarting
    port = sock.getsockname()[1]
    retried = counter("flywheel_bot_gateway_retries_total", outcome="retried")
    with BotServer(gateway_url=f"http://127.0.0.1:{port}", reports_enabled=False,
                   gateway_connect_retry_s=600, answer_deadline_s=600) as server:
        q_ts, _ = server.sender.mention("are you back?", channel="CRESTART1")
        a_ts = placeholder(server, "CRESTART1")
        wait_until(lambda: counter("flywheel_bot_gateway_retries_total", outcome="retried") > retried,
                   what="the bot saw the gateway refuse and retried", timeout=60)
        gateway = HeldPortGateway(GatewaySettings(
            base_model=tiny_model_dir, adapters_dir=env["tmp"] / "adapters", sync_interval_s=30,
            max_new_tokens=8, replica_id="trust-restart"), sock).start()
        try:
            final = final_update(server, "CRESTART1", a_ts, timeout=300)
        finally:
            gateway.stop()
            sock.close()
    assert not final.args["text"].startswith(APOLOGY)
    answer = stored("CRESTART1", a_ts)
    assert answer.error is None and answer.model_version


def test_a_replayed_command_runs_once(bot):
    """A captured, signed `/flywheel share` sent again inside Slack's five-minute window is acked
    and not run again (issue 25.7): a replayed `/flywheel rollback` would roll back once more."""
    def shares() -> int:
        with session_scope() as s:
            return sum(e.action == "channel.share" for e in list_audit(s))

    sender = bot.sender
    body = urllib.parse.urlencode(sender.command_fields(f"share <#{PRIVATE}|platform>", user=ADMIN_USER))
    headers = sender.headers(body, content_type="application/x-www-form-urlencoded")
    before = shares()
    assert sender.client.post(sender.url, content=body.encode(), headers=headers).status_code == 200
    wait_until(lambda: shares() == before + 1, timeout=30)
    replay = sender.client.post(sender.url, content=body.encode(), headers=headers)
    assert replay.status_code == 200  # acked, so Slack (or whoever replays) sees nothing to retry
    sender.command(f"unshare <#{PRIVATE}|platform>", user=ADMIN_USER)  # a fresh request still runs
    with session_scope() as s:
        wait_until(lambda: any(e.action == "channel.unshare" for e in list_audit(s)), timeout=30)
    assert shares() == before + 1


def test_replay_keys_name_each_command_and_interaction_once():
    assert request_key({"type": "event_callback", "event_id": "Ev1"}, "{}") is None
    assert request_key({"type": "block_actions", "trigger_id": "1.2.abc"}, "x") == "trigger:1.2.abc"
    assert request_key({"command": "/flywheel", "trigger_id": "9.9.z"}, "x") == "trigger:9.9.z"
    assert request_key({"ssl_check": "1"}, "a") != request_key({"ssl_check": "1"}, "b")
