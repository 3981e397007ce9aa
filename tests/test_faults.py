"""Fault injection over the whole loop: the bot, the gateway and the trainer daemon run for real
(PostgreSQL and the gateway each behind a TCP hop that is taken down), the database goes away for
10 s and then the gateway for 10 s while questions and votes arrive and a training run is due.
Afterwards every question got an answer or an apology, no vote was lost, the daemon still runs
and the next run succeeds."""
from __future__ import annotations

import json
import threading
import time

import pytest

from gateway.settings import GatewaySettings
from store.db import get_engine, session_scope
from store.migrate import upgrade
from store.models import Feedback
from store.runs import queue_run
from tests.support.bot_harness import BotServer
from tests.support.faults import TcpProxy
from tests.support.waiting import wait_until
from tests.support.gateway_server import GatewayServer
from tests.support.trainer_env import ended_run, import_facts, tiny_trainer_env

pytestmark = pytest.mark.postgres
OUTAGE_S = 10.0
THINKING = "_Thinking…_"


def bot_replies(bot: BotServer, channel: str, q_ts: str) -> list[dict]:
    return [m for m in bot.double.thread(channel, q_ts) if m.get("ts") != q_ts]


def settled(bot: BotServer, channel: str, q_ts: str) -> dict | None:
    """The bot's finished reply in the question's thread: an answer with buttons or an apology."""
    for m in bot_replies(bot, channel, q_ts):
        text, shown = m.get("text") or "", json.dumps(m.get("blocks") or [], ensure_ascii=False)
        if THINKING not in text and "_writing…_" not in shown and (text.strip() or "feedback" in shown):
            return m
    return None


def test_database_and_gateway_outages_lose_no_question_and_no_vote(pg_server, tiny_model_dir, tmp_path, monkeypatch):
    from trainer.settings import TrainerSettings
    from trainer.watch import watch

    real = pg_server.create_database()
    upgrade(real)
    db_hop = TcpProxy(pg_server.port)
    url = db_hop.url_for(real, pg_server.port)
    tiny_trainer_env(monkeypatch, database_url=url, model_dir=tiny_model_dir, work=tmp_path,
                     FLYWHEEL_WATCH_POLL_S="0.5", FLYWHEEL_WATCH_MAX_BACKOFF_S="1", FLYWHEEL_WATCH_MIN_NEW="100000",
                     FLYWHEEL_MEMORY="0")
    import_facts(url)
    gateway = GatewayServer(GatewaySettings(base_model=tiny_model_dir, adapters_dir=tmp_path / "adapters",
                                            max_new_tokens=6, replica_id="faults", sync_interval_s=1)).start()
    gw_hop = TcpProxy(gateway.port)
    bot = BotServer(gateway_url=f"http://127.0.0.1:{gw_hop.port}", gateway_connect_retry_s=20,
                    answer_deadline_s=90, feedback_retry_s=60, max_tokens=6).start()
    stop = threading.Event()
    daemon = threading.Thread(target=watch, args=(TrainerSettings(),), kwargs={"stop": stop}, daemon=True)
    daemon.start()
    asked: list[tuple[str, str]] = []
    votes: list[tuple[str, str, str]] = []  # (channel, answer ts, user)

    def ask(i: int) -> None:
        channel = f"CFAULT{i:03d}"
        q_ts, resp = bot.sender.mention(f"What is fact number {i % 6}?", channel=channel, user=f"UASK{i:04d}")
        assert resp.status_code == 200, resp.text
        asked.append((channel, q_ts))

    def vote_on_answered(keep: int = 0) -> None:
        """👍 on every answer (not apology) that has no vote yet, but the last `keep` of them."""
        for channel, q_ts in asked[:len(asked) - keep]:
            reply = settled(bot, channel, q_ts)
            if reply and "feedback" in json.dumps(reply.get("blocks") or []) and \
                    not any(v[1] == reply["ts"] for v in votes):
                user = f"UVOTE{len(votes):03d}"
                assert bot.sender.reaction("+1", channel=channel, ts=reply["ts"], user=user).status_code == 200
                votes.append((channel, reply["ts"], user))

    try:
        for i in range(3):
            ask(i)
        wait_until(lambda: all(settled(bot, c, t) for c, t in asked), timeout=180, what="the first answers")
        vote_on_answered(keep=1)  # the last one is voted on while the database is away
        with session_scope(get_engine(url)) as s:
            due_run = queue_run(s, queued_by="UADMIN01").id  # a run is due when the outages start

        db_hop.down()
        for i in range(3, 6):
            ask(i)
        vote_on_answered()  # answers finished just before the outage may be voted on now
        time.sleep(OUTAGE_S)  # the outage itself (nothing is asserted about this time)
        db_hop.up()

        gw_hop.down()
        for i in range(6, 9):
            ask(i)
        vote_on_answered()
        time.sleep(OUTAGE_S)
        gw_hop.up()

        wait_until(lambda: all(settled(bot, c, t) for c, t in asked), timeout=180,
                   what="every question answered or apologized to")
        vote_on_answered()
        assert not [m for c, t in asked for m in bot_replies(bot, c, t) if THINKING in (m.get("text") or "")]

        def stored_votes():
            with session_scope(get_engine(url)) as s:
                rows = s.query(Feedback).filter(Feedback.kind == "reaction").all()
                return {r.user for r in rows}
        wait_until(lambda: {u for _, _, u in votes} <= stored_votes(), timeout=180, what="every vote stored")
        assert votes, "no vote was given"

        assert daemon.is_alive()

        wait_until(lambda: ended_run(url, due_run), timeout=300, what="the due run ending")
        import_facts(url, [7])  # new data arrives, and an admin asks for a run
        with session_scope(get_engine(url)) as s:
            next_run = queue_run(s, queued_by="UADMIN01").id
        after = wait_until(lambda: ended_run(url, next_run), timeout=300, what="the next run ending")
        assert after.status == "succeeded" and after.model_version, after.error
        assert daemon.is_alive()
    finally:
        stop.set()
        daemon.join(60)
        bot.stop()
        gw_hop.close()
        gateway.stop()
        db_hop.close()
