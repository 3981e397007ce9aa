"""What Slack's limits would break, delivered through the real bot: an answer of more than 6,000
characters (streamed, and as placeholder + chat.update where a workspace refuses streaming) and a
`/flywheel versions` report over 30 versions with long gate reasons. The Slack double refuses what
Slack refuses (blocks, sections over 3,000 characters, appends over 12,000, text over 40,000), and
BotServer.stop fails the module on any refused payload. The long answer comes from the fast fake
gateway, streamed over two seconds (the tiny model took 40-80 s a run to write as much: what is
under test is the bot's delivery, not the model)."""
from __future__ import annotations

import json
import time

import pytest

from bot.slack_text import escape
from flywheel.adapters import base_model_id
from flywheel.app.demo.slack_double import SlackDouble
from store.conversations import get_message
from store.db import session_scope
from store.migrate import upgrade
from store.versions import register_version
from tests.support.bot_harness import ADMIN_USER, BotServer, wait_answer
from tests.support.fake_gateway import FakeGateway

LONG = 6_000
USER = "UALICE01"


class LongGateway(FakeGateway):
    """Streams a ~10,000-character answer with Slack's three special characters in it, in 60
    pieces over about two seconds, so the bot's message grows while it is written."""

    PIECE = "Lumenfold & <friends> make cargo bikes; each piece of this answer says so again.\n"

    def respond(self, handler, question: str) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        for n in range(60):
            chunk = {"choices": [{"delta": {"content": f"{n}. {self.PIECE * 2}"}}], "model": "base"}
            handler.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            handler.wfile.flush()
            time.sleep(0.035)
        handler.wfile.write(b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],"model":"base"}\n\n'
                            b"data: [DONE]\n\n")
        handler.wfile.flush()
        handler.close_connection = True


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('long') / 'flywheel.db'}"
    upgrade(url)
    gw = LongGateway()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        yield gw
    gw.stop()


def _stored(channel: str, ts: str) -> str:
    with session_scope() as s:
        return get_message(s, channel, ts).text


def _section_text(blocks) -> str:
    blocks = json.loads(blocks) if isinstance(blocks, str) else blocks
    return "".join(b["text"]["text"] for b in blocks if b.get("type") == "section")


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "chat.update"])
def test_an_answer_over_6000_characters_reaches_slack_whole(gateway, streaming):
    with SlackDouble(streaming=streaming) as double, BotServer(
            gateway_url=gateway.url, double=double, reports_enabled=False, max_tokens=1100, answer_deadline_s=600,
            stream_update_interval_s=0.5) as bot:
        channel = "CLONG0001"
        q_ts, resp = bot.sender.mention("Tell me everything about the company.", channel=channel)
        assert resp.status_code == 200
        if streaming:
            stop = double.wait_for("chat.stopStream", lambda c: c.args.get("channel") == channel, timeout=600)[0]
            assert stop.response["ok"], stop.response
            answer_ts = stop.args["ts"]
            shown = double.message(channel, answer_ts)["text"]
            assert len(double.calls_to("chat.appendStream")) >= 2  # it grew while it was written
            assert all(c.response["ok"] for c in double.calls_to("chat.appendStream"))
            assert not [c for c in double.calls_to("chat.update") if c.args.get("ts") == answer_ts]
        else:
            answer_ts, final = wait_answer(bot, channel, q_ts, timeout=600)
            assert final.response["ok"], final.response
            blocks = json.loads(final.args["blocks"]) if isinstance(final.args["blocks"], str) else final.args["blocks"]
            assert sum(b["type"] == "section" for b in blocks) >= 3  # split by rule, each ≤ 3,000
            assert "suggest_correction" in json.dumps(blocks)
            shown = _section_text(blocks)
        answer = _stored(channel, answer_ts)
        assert len(answer) >= LONG, f"the answer has only {len(answer)} characters"
        assert shown.strip() == escape(answer).strip()  # all of it, nothing cut, nothing doubled
        assert double.refused == []


def _register(n: int, base: str) -> list[str]:
    names = []
    with session_scope() as s:
        for i in range(1, n + 1):
            name = f"ft-{i:04d}"
            reasons = [f"recall token F1 0.{i:02d} < 0.50 on <paraphrases> & golden set; " + "x" * 300,
                       "golden pass rate 0.50 < 1.00"]
            register_version(s, name=name, adapter_path=f"/nowhere/{name}", adapter_sha256="0" * 64,
                             base_model=base, gate_passed=i % 3 == 0, gate_reasons=[] if i % 3 == 0 else reasons)
            names.append(name)
    return names


def test_a_report_of_31_versions_is_delivered_in_pages(gateway, tiny_model_dir):
    names = _register(31, base_model_id(tiny_model_dir))
    with BotServer(gateway_url=gateway.url, reports_enabled=False) as bot:
        double = bot.double
        for page, command in ((1, "versions"), (2, "versions 2")):
            before = len(double.calls_to("response"))
            resp = bot.sender.command(command, user=ADMIN_USER, channel="CLONG0002")
            assert resp.status_code == 200
            reply = double.wait_for("response", count=before + 1)[-1]
            assert reply.response is None or reply.response.get("ok", True), reply.response
            text = _section_text(reply.args["blocks"])
            if page == 1:
                assert [n for n in names if f"`{n}`" in text] == names[1:]  # the 30 newest
                assert "&lt;paraphrases&gt; &amp; golden" in text  # the gate's words, escaped
                assert "/flywheel versions 2" in text
                assert len(json.loads(reply.args["blocks"]) if isinstance(reply.args["blocks"], str)
                           else reply.args["blocks"]) >= 2  # more than one section's 3,000 characters
            else:
                assert "`ft-0001`" in text and "`ft-0002`" not in text and "31 of 31" in text
        resp = bot.sender.command("versions 3", user=ADMIN_USER, channel="CLONG0002")
        reply = double.wait_for("response", count=3)[-1]
        assert "past the last one" in reply.args["text"]
        assert double.refused == []
