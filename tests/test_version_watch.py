"""The live-version watch on simulated weeks: a team uses ft-0001 for a week, ft-0002 is promoted
and the team reacts to its answers. When ft-0002 is worse (voted down or corrected more often) the
admin channel gets one alert with a Rollback button once the configured number of answers is
reached; when it is better, never. The Rollback button rolls back only the version it names."""
from __future__ import annotations

import json

import numpy as np
import pytest
from slack_sdk import WebClient

from bot.admin import Admin
from bot.canary import Canary
from bot.settings import BotSettings
from bot.watch import VersionWatch, compare, describe
from flywheel.app.demo.slack_double import SlackDouble
from store.audit import list_audit
from store.conversations import record_message
from store.db import get_engine, session_scope
from store.feedback import upsert_vote
from store.memory import memory_item, upsert_memory_item
from store.models import SECTION_SOURCE
from store.versions import CANDIDATE, PRODUCTION, alias_target, move_alias, register_version

ADMIN, CHANNEL = "UADMIN01", "CADMIN001"
MIN_ANSWERS = 30


@pytest.fixture
def team(sqlite_url):
    with session_scope(get_engine(sqlite_url)) as s:
        for name in ("ft-0001", "ft-0002"):
            register_version(s, name=name, adapter_path=f"/adapters/{name}", adapter_sha256="0" * 64,
                             base_model="smollm2", gate_passed=True, gate_reasons=["passed"])
        move_alias(s, PRODUCTION, "ft-0001", actor=ADMIN)
    with SlackDouble() as slack:
        settings = BotSettings(slack_bot_token=slack.bot_token, slack_api_url=slack.api_url, admins=[ADMIN],
                               admin_channel=CHANNEL, watch_min_answers=MIN_ANSWERS)
        yield settings, slack, WebClient(token=slack.bot_token, base_url=slack.api_url)


_count = iter(range(1, 10**6))


def answer(version: str, *, bad: bool, good: bool = False, corrected: bool = False) -> None:
    """One answer by `version` in a public channel and what its asker did with it."""
    n = next(_count)
    with session_scope() as s:
        msg = record_message(s, channel="CTEAM0001", ts=f"1800000000.{n:06d}", thread_ts=f"1800000000.{n:06d}",
                             role="assistant", text=f"answer {n}", author="UBOT0001", model_version=version)
        if bad and corrected:
            upsert_vote(s, message_id=msg.id, user="UALICE01", kind="correction", value="correction",
                        correction="the right answer", review="pending")
        elif bad:
            upsert_vote(s, message_id=msg.id, user="UALICE01", kind="reaction", value="down")
        elif good:
            upsert_vote(s, message_id=msg.id, user="UALICE01", kind="button", value="up")


def week(version: str, n: int, bad_per_10: int, watch: VersionWatch | None = None) -> list[int]:
    """n answers, `bad_per_10` of every ten voted down (every third of those corrected instead);
    returns after which answers the watch posted an alert."""
    alerts = []
    for i in range(1, n + 1):
        bad = i % 10 < bad_per_10
        answer(version, bad=bad, good=not bad and i % 2 == 0, corrected=bad and i % 3 == 0)
        if watch is not None and watch.check():
            alerts.append(i)
    return alerts


def promote(version: str) -> None:
    with session_scope() as s:
        move_alias(s, PRODUCTION, version, actor=ADMIN)


def test_a_worse_version_triggers_one_rollback_proposal_at_the_configured_answer_count(team):
    settings, slack, client = team
    week("ft-0001", 60, bad_per_10=2)
    promote("ft-0002")
    watch = VersionWatch(settings, client)
    alerts = week("ft-0002", 60, bad_per_10=6, watch=watch)
    assert alerts == [MIN_ANSWERS]  # judged as soon as allowed, and told once
    posted = [c for c in slack.calls_to("chat.postMessage") if c.args["channel"] == CHANNEL]
    assert len(posted) == 1
    shown = json.dumps(posted[0].args["blocks"], ensure_ascii=False)
    assert "ft-0002" in shown and "watch_rollback" in shown and "60 answers" in shown
    c = compare()
    assert (c.new.version, c.new.answers, c.old.version, c.old.answers) == ("ft-0002", 60, "ft-0001", 60)
    assert c.new.bad == 36 and c.old.bad == 12 and c.p_worse > 0.99
    assert "P(`ft-0002` is worse) = *1.00*" in describe(c, MIN_ANSWERS)


def test_a_better_version_is_never_flagged(team):
    settings, slack, client = team
    week("ft-0001", 60, bad_per_10=3)
    promote("ft-0002")
    watch = VersionWatch(settings, client)
    assert week("ft-0002", 120, bad_per_10=1, watch=watch) == []
    assert compare().p_worse < 0.01
    assert not [c for c in slack.calls_to("chat.postMessage") if c.args["channel"] == CHANNEL]


def test_too_few_answers_are_not_judged_and_the_command_says_so(team):
    settings, slack, client = team
    week("ft-0001", 40, bad_per_10=1)
    promote("ft-0002")
    assert week("ft-0002", MIN_ANSWERS - 1, bad_per_10=9, watch=VersionWatch(settings, client)) == []
    text = Admin(settings, gateway=None, review=None, canary=Canary(settings)).run_command("UBOB0001", "watch").text
    assert f"judged after {MIN_ANSWERS} answers ({MIN_ANSWERS - 1} until now)" in text
    assert "`ft-0001`: 40 answers" in text


def test_the_rollback_button_rolls_back_only_the_version_it_names(team):
    settings, slack, client = team

    class Gateway:
        def request_sync(self):
            return "the gateway will pick it up within seconds"

    admin = Admin(settings, gateway=Gateway(), review=None, canary=Canary(settings))
    promote("ft-0002")
    assert "Only Flywheel admins" in admin.admin_action("UBOB0001", "rollback", "ft-0002",
                                                        lambda: admin.rollback("UBOB0001", expected="ft-0002")).text
    stale = admin.admin_action(ADMIN, "rollback", "ft-0001", lambda: admin.rollback(ADMIN, expected="ft-0001"))
    assert "production is `ft-0002` now, not `ft-0001`; nothing was changed" in stale.text
    with session_scope() as s:
        assert alias_target(s, PRODUCTION) == "ft-0002"
    done = admin.admin_action(ADMIN, "rollback", "ft-0002", lambda: admin.rollback(ADMIN, expected="ft-0002"))
    assert done.public and "rolled production back" in done.text
    with session_scope() as s:
        assert alias_target(s, PRODUCTION) == "ft-0001"


def test_the_rollback_button_compares_and_swaps_under_the_alias_lock(team, monkeypatch):
    """A promotion that lands between the click and the swap: the button names ft-0002, production
    is ft-0003 when the alias is moved, so nothing is rolled back (a check of the live version
    before taking the lock would have rolled ft-0003 back)."""
    import bot.admin
    from store.versions import rollback_target

    settings, _slack, _client = team

    class Gateway:
        def request_sync(self):
            return "synced"

    with session_scope() as s:
        register_version(s, name="ft-0003", adapter_path="/adapters/ft-0003", adapter_sha256="0" * 64,
                         base_model="smollm2", gate_passed=True, gate_reasons=["passed"])
    promote("ft-0002")

    def promoted_meanwhile(session):
        target = rollback_target(session)
        promote("ft-0003")  # another admin, in another transaction
        return target

    monkeypatch.setattr(bot.admin, "rollback_target", promoted_meanwhile)
    admin = Admin(settings, gateway=Gateway(), review=None, canary=Canary(settings))
    late = admin.admin_action(ADMIN, "rollback", "ft-0002", lambda: admin.rollback(ADMIN, expected="ft-0002"))
    assert "production is `ft-0003` now, not `ft-0002`; nothing was changed" in late.text and not late.public
    with session_scope() as s:
        assert alias_target(s, PRODUCTION) == "ft-0003"


def test_the_stop_canary_button_compares_and_swaps_under_the_alias_lock(team, monkeypatch):
    """A new canary started between the click and the swap: the button names ft-0001, the canary
    is ft-0002 when the alias is moved, so nothing is stopped (a check of the canary before
    taking the lock would have stopped ft-0002)."""
    import bot.admin

    settings, _slack, _client = team
    with session_scope() as s:
        move_alias(s, CANDIDATE, "ft-0001", actor=ADMIN, reason="canary")

    def started_meanwhile(session, alias, version, **kw):
        with session_scope() as other:  # another admin, in another transaction
            move_alias(other, CANDIDATE, "ft-0002", actor=ADMIN, reason="canary")
        return move_alias(session, alias, version, **kw)

    monkeypatch.setattr(bot.admin, "move_alias", started_meanwhile)
    admin = Admin(settings, gateway=None, review=None, canary=Canary(settings))
    late = admin.admin_action(ADMIN, "canary", "ft-0001", lambda: admin.stop_canary(ADMIN, expected="ft-0001"))
    assert "is `ft-0002` now, not `ft-0001`; nothing was changed" in late.text and not late.public
    with session_scope() as s:
        assert alias_target(s, CANDIDATE) == "ft-0002"
    monkeypatch.setattr(bot.admin, "move_alias", move_alias)  # nobody else now
    done = admin.admin_action(ADMIN, "canary", "ft-0002", lambda: admin.stop_canary(ADMIN, expected="ft-0002"))
    assert done.public and "stopped the canary of `ft-0002`" in done.text


def test_a_rollback_offers_to_retire_what_was_taught_while_the_version_was_live(team):
    """Issue 25.2: a rollback names the memory items taught since the rolled-back version went
    live and offers `/flywheel memory retire VERSION` (offered, not forced); retiring switches off
    exactly those (document sections and older items stay), audited."""
    settings, _slack, _client = team

    class Gateway:
        def request_sync(self):
            return "synced"

    def teach(key: str, source: str = "correction") -> None:
        with session_scope() as s:
            upsert_memory_item(s, key=key, question=f"q {key}", answer="a", source=source, author="UALICE01",
                               channel="CTEAM0001", visible_in=None, vector=np.ones(4, np.float32).tobytes())

    teach("message:1")  # before ft-0002
    promote("ft-0002")
    teach("message:2")
    teach("section:9:1", source=SECTION_SOURCE)
    admin = Admin(settings, gateway=Gateway(), review=None, canary=Canary(settings))
    rolled = admin.run_command(ADMIN, "rollback")
    assert "1 memory item(s) were taught while `ft-0002` was live" in rolled.text
    assert "/flywheel memory retire ft-0002" in rolled.text
    with session_scope() as s:
        assert all(memory_item(s, k) is not None for k in ("message:1", "message:2", "section:9:1"))  # not forced
    assert "was never in production" in admin.run_command(ADMIN, "memory retire ft-0042").text
    assert "Only Flywheel admins" in admin.run_command("UBOB0001", "memory retire ft-0002").text
    done = admin.run_command(ADMIN, "memory retire ft-0002")
    assert done.public and "switched off 1 memory item(s)" in done.text
    with session_scope() as s:
        assert memory_item(s, "message:2") is None
        assert memory_item(s, "message:1") is not None and memory_item(s, "section:9:1") is not None
        assert [e.action for e in list_audit(s) if e.action == "memory.retire"] == ["memory.retire"]
