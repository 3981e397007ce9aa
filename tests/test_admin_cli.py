"""`flywheel versions | promote | rollback`: an admin without Slack. The CLI runs the bot's own
admin actions, so the store ends in the same state and the audit log holds the same events as
after `/flywheel promote` and `/flywheel rollback`, refusals included; only the actor differs."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bot.admin import Admin
from bot.canary import Canary
from bot.settings import BotSettings
from flywheel.app.cli import app
from flywheel.app.demo.slack_double import SlackDouble
from store.audit import list_audit
from store.conversations import record_message
from store.db import get_engine, session_scope
from store.feedback import upsert_vote
from store.memory import memory_item
from store.migrate import upgrade
from store.versions import PRODUCTION, alias_target, find_version, register_version

SLACK_ADMIN = "UADMIN001"


class QuietGateway:
    def request_sync(self) -> str:
        return "gateway synced"


def _seed() -> None:
    with session_scope() as s:
        for name, passed in (("ft-0001", True), ("ft-0002", True), ("ft-0003", False)):
            register_version(s, name=name, adapter_path=f"/adapters/{name}", adapter_sha256="0" * 64,
                             base_model="smollm2-135m-instruct", gate_passed=passed,
                             gate_reasons=[] if passed else ["recall F1 0.41 < production 0.52 + 0.01"])


@pytest.fixture
def two_stores(tmp_path, monkeypatch):
    """Two migrated, identically seeded stores; `use(i)` points FLYWHEEL_DATABASE_URL at one."""
    urls = []
    for i in range(2):
        url = f"sqlite:///{tmp_path / f'flywheel-{i}.db'}"
        upgrade(url)
        monkeypatch.setenv("FLYWHEEL_DATABASE_URL", url)
        _seed()
        urls.append(url)

    def use(i: int) -> None:
        monkeypatch.setenv("FLYWHEEL_DATABASE_URL", urls[i])

    monkeypatch.delenv("FLYWHEEL_GATEWAY_ADMIN_TOKEN", raising=False)
    yield use
    for url in urls:
        get_engine(url).dispose()


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _trail() -> list[tuple]:
    """The audit log, oldest first, without who and when (and without how the command was typed)."""
    with session_scope() as s:
        events = list(reversed(list_audit(s, limit=100)))
        return [(e.action, e.target, e.outcome, {k: v for k, v in e.detail.items() if k not in ("command", "via")})
                for e in events]


def _state() -> tuple:
    with session_scope() as s:
        return (alias_target(s, PRODUCTION),
                tuple(str(find_version(s, n).status) for n in ("ft-0001", "ft-0002", "ft-0003")))


def test_cli_and_slack_leave_the_same_audit_trail_and_state(two_stores):
    """The same sequence (promote, promote, refused promote, forced promote, rollback) through
    the Slack command on one store and through the CLI on the other."""
    two_stores(0)
    slack = Admin(BotSettings(admins=[SLACK_ADMIN]), gateway=QuietGateway(), review=None,
                  canary=Canary(BotSettings(admins=[SLACK_ADMIN])))
    for text in ("promote ft-0001", "promote ft-0002", "promote ft-0003", 'promote ft-0003 --force "hotfix"',
                 "rollback"):
        slack.run_command(SLACK_ADMIN, text)
    slack_trail, slack_state = _trail(), _state()
    with session_scope() as s:
        assert {e.actor for e in list_audit(s, limit=100)} == {SLACK_ADMIN}

    two_stores(1)
    codes = [_cli("promote", "ft-0001", "--as", "cli:alice")[0], _cli("promote", "ft-0002", "--as", "cli:alice")[0],
             _cli("promote", "ft-0003", "--as", "cli:alice")[0],
             _cli("promote", "ft-0003", "--force", "hotfix", "--as", "cli:alice")[0],
             _cli("rollback", "--as", "cli:alice")[0]]
    assert codes == [0, 0, 1, 0, 0]  # the gate-failed version is refused without --force
    assert _trail() == slack_trail
    assert _state() == slack_state == ("ft-0002", ("retired", "production", "retired"))
    with session_scope() as s:
        events = list_audit(s, limit=100)
    assert {e.actor for e in events} == {"cli:alice"}
    refused = next(e for e in events if e.action == "command.promote")
    assert refused.outcome == "error" and refused.detail["via"] == "cli"
    assert refused.detail["command"] == "promote ft-0003" and "evaluation gate" in refused.detail["error"]


def test_promote_says_what_happened_and_the_default_actor_is_the_login(two_stores):
    two_stores(0)
    code, out = _cli("promote", "ft-0002")
    assert code == 0, out
    assert "promoted `ft-0002` to production" in out and "previously `base model`" in out
    assert "not asked (FLYWHEEL_GATEWAY_ADMIN_TOKEN unset)" in out  # no gateway configured: replicas poll
    with session_scope() as s:
        (move,) = list_audit(s, action="alias.move")
    assert move.actor.startswith("cli:") and move.detail["to"] == "ft-0002"

    code, out = _cli("promote", "ft-0009")
    assert code == 1 and "ft-0009" in out


def test_rollback_with_expect_changes_nothing_when_another_version_is_live(two_stores):
    two_stores(0)
    assert _cli("promote", "ft-0001")[0] == 0
    assert _cli("promote", "ft-0002")[0] == 0
    code, out = _cli("rollback", "--expect", "ft-0001")
    assert code == 1 and "nothing was changed" in out
    assert _state()[0] == "ft-0002"
    code, out = _cli("rollback", "--expect", "ft-0002")
    assert code == 0 and "rolled production back from `ft-0002` to `ft-0001`" in out
    assert _state()[0] == "ft-0001"


def test_versions_lists_newest_first_with_production_marked(two_stores):
    two_stores(0)
    code, out = _cli("versions")
    assert code == 0 and "production: base model" in out
    assert _cli("promote", "ft-0001")[0] == 0
    code, out = _cli("versions", "--limit", "2")
    lines = out.splitlines()
    assert lines[0] == "production: ft-0001"
    assert [ln.split()[0] for ln in lines[2:4]] == ["ft-0003", "ft-0002"]
    assert "recall F1 0.41" in lines[2] and "(2 of 3; older ones: --page 2)" in out
    code, out = _cli("versions", "--limit", "2", "--page", "2")
    assert "ft-0001" in out and "← production" in out
    code, out = _cli("versions", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["name"] for r in rows] == ["ft-0003", "ft-0002", "ft-0001"]
    assert [r["production"] for r in rows] == [False, False, True] and rows[0]["gate_passed"] is False


def test_review_lists_and_decides_as_a_click_does(two_stores, monkeypatch):
    """`flywheel review` lists what waits; `review approve ID` decides through the bot's own review:
    audited with the CLI's actor, the correction taught to the memory, its author told in Slack."""
    two_stores(0)
    with session_scope() as s:
        record_message(s, channel="CTEAM0001", ts="1800000000.000001", thread_ts="1800000000.000001",
                       role="user", text="Where is the office?", author="UALICE01")
        answer = record_message(s, channel="CTEAM0001", ts="1800000000.000002", thread_ts="1800000000.000001",
                                role="assistant", text="In Paris.", author="UBOT0001", model_version="base")
        row = upsert_vote(s, message_id=answer.id, user="UALICE01", kind="correction", value="correction",
                          correction="In Tartu, Estonia.", review="pending")
    code, out = _cli("review")
    assert code == 0 and f"{row.id}\tcorrection\tby UALICE01" in out and "In Tartu, Estonia." in out
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    code, out = _cli("review", "approve", str(row.id))
    assert code == 2 and "SLACK_BOT_TOKEN" in out
    with SlackDouble() as slack:
        monkeypatch.setenv("SLACK_BOT_TOKEN", slack.bot_token)
        monkeypatch.setenv("SLACK_API_URL", slack.api_url)
        code, out = _cli("review", "approve", str(row.id), "--as", "cli:ops")
        assert code == 0 and "approved by cli:ops: UALICE01's correction" in out, out
        slack.wait_for("chat.postEphemeral", lambda c: c.args.get("user") == "UALICE01")
        code, out = _cli("review", "reject", str(row.id), "--as", "cli:ops")
        assert code == 1, out  # decided already
    with session_scope() as s:
        trail = {(e.actor, e.action, e.outcome) for e in list_audit(s) if e.action.startswith("correction.")}
        assert trail == {("cli:ops", "correction.approve", "ok"), ("cli:ops", "correction.reject", "error")}
        assert memory_item(s, f"message:{answer.id}").answer == "In Tartu, Estonia."
    assert _cli("review")[1].strip() == "Nothing waits for review."
