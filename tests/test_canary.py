"""Canary releases through the real bot and gateway: with FLYWHEEL_CANARY_PERCENT=20 an admin puts
a gate-passed version on the canary; the same fifth of the people get it in every conversation
(never a switch mid-thread), the rest get production; answers say which version gave them; the
watch compares the two on the same days' traffic; stopping or promoting ends it, audited."""
from __future__ import annotations

import pytest

from bot.canary import in_canary
from bot.watch import compare
from flywheel.adapters import base_model_id
from gateway.settings import GatewaySettings
from store.audit import list_audit
from store.conversations import thread_messages
from store.db import session_scope
from store.migrate import upgrade
from store.versions import CANDIDATE, PRODUCTION, alias_target
from tests.support.adapters import make_adapter, promote, register
from tests.support.bot_harness import ADMIN_USER, BotServer, command_reply, wait_answer
from tests.support.gateway_server import GatewayServer


def test_a_20_percent_canary_takes_20_plus_minus_4_percent_of_1000_people():
    people = [f"U{i:08d}" for i in range(1000)]
    chosen = [u for u in people if in_canary(u, 20, "ft-0002")]
    assert 160 <= len(chosen) <= 240
    assert chosen == [u for u in people if in_canary(u, 20, "ft-0002")]  # sticky
    other = {u for u in people if in_canary(u, 20, "ft-0003")}
    assert set(chosen) != other  # each canary draws its own share
    assert not any(in_canary(u, 0, "ft-0002") for u in people)
    assert all(in_canary(u, 100, "ft-0002") for u in people)


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("canary")
    url = f"sqlite:///{tmp / 'flywheel.db'}"
    upgrade(url)
    adapters = tmp / "adapters"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        base = base_model_id(tiny_model_dir)
        for seed, name in ((1, "ft-0001"), (2, "ft-0002")):
            register(make_adapter(tiny_model_dir, adapters / name, seed=seed), name, base_model=base)
        promote("ft-0001")
        gateway = GatewayServer(GatewaySettings(base_model=tiny_model_dir, adapters_dir=adapters, sync_interval_s=1,
                                                max_new_tokens=6, replica_id="canary-test")).start()
        bot = BotServer(gateway_url=gateway.url, canary_percent=20, reports_enabled=False).start()
        yield bot
        bot.stop()
        gateway.stop()


def converse(bot: BotServer, user: str, channel: str) -> list[str]:
    """A question and a follow-up in its thread; the versions that answered them."""
    q_ts, _ = bot.sender.mention(f"What is the plan, {user}?", channel=channel, user=user)
    wait_answer(bot, channel, q_ts)
    bot.sender.message("And after that?", channel=channel, user=user, thread_ts=q_ts)
    wait_answer(bot, channel, q_ts, after=1)
    with session_scope() as s:
        return [m.model_version for m in thread_messages(s, channel, q_ts) if m.role == "assistant"]


def test_the_canary_answers_its_share_sticky_by_person_until_stopped(env):
    bot = env
    assert "Only Flywheel admins" in command_reply(bot, "canary ft-0002", user="UBOB0001")
    assert "started a canary" in command_reply(bot, "canary ft-0002")
    with session_scope() as s:
        assert alias_target(s, CANDIDATE) == "ft-0002" and alias_target(s, PRODUCTION) == "ft-0001"
    people = [f"UPER{i:04d}" for i in range(40)]
    inside = [u for u in people if in_canary(u, 20, "ft-0002")]
    assert inside and len(inside) < len(people)
    for i, user in enumerate(people[:24] + [u for u in inside if u not in people[:24]][:2]):
        versions = converse(bot, user, f"CCAN{i:05d}")
        expected = "ft-0002" if user in inside else "ft-0001"
        assert versions == [expected, expected], (user, versions)  # the same version all thread long
    c = compare()
    assert c.canary and c.new.version == "ft-0002" and c.old.version == "ft-0001"
    assert c.new.answers >= 4 and c.old.answers >= 4

    assert "stopped the canary" in command_reply(bot, "canary stop")
    assert converse(bot, inside[0], "CCANSTOP1") == ["ft-0001", "ft-0001"]
    with session_scope() as s:
        moves = [(e.detail["to"], e.detail["reason"]) for e in list_audit(s, action="alias.move", target=CANDIDATE)]
    assert moves == [(None, "canary stopped"), ("ft-0002", "canary")]
    assert "no canary is running" in command_reply(bot, "canary stop")
