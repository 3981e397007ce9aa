"""What people say in private stays private (issue 25, point 1): through the real bot (uvicorn,
the local Slack double, a real gateway with the tiny model, a real SQLite store), a correction in
a DM, a 👍 in a private channel, "Add to training data" in a DM and a correction in a Slack
Connect channel never reach a dataset snapshot (so no adapter's training rows and no export,
which are written from it) or another person's answer; the same in a public channel does. An
admin's `/flywheel share #channel` opts a private channel in (audited); a channel made private
takes its teaching back from the next snapshot and from everyone else's memory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.channels import ChannelVisibility, visibility_from_info
from flywheel.app.demo.slack_double import SlackDouble
from store.audit import list_audit
from store.channels import get_channel, record_channel_visibility, training_scope
from store.conversations import get_message
from store.db import session_scope
from store.examples import list_examples
from store.memory import memory_item
from store.models import Visibility
from tests.support.bot_harness import ADMIN_USER, BotServer, store_and_gateway, suggest_correction, wait_answer
from tests.support.waiting import wait_until
from trainer.dataset import build_snapshot
from trainer.settings import TrainerSettings

PUBLIC, PRIVATE, EXTERNAL, LATER_PRIVATE = "CPUBLIC77", "CPRIVATE7", "CCONNECT7", "CTURNING7"
DM = "DPRIVACY7"
BOB = "UBOB0007"


@pytest.fixture(scope="module")
def bot(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("privacy")
    with store_and_gateway(tiny_model_dir, tmp, "privacy-test") as gateway:
        double = SlackDouble(private_channels={PRIVATE}, external_channels={EXTERNAL}).start()
        server = BotServer(gateway_url=gateway.url, double=double, reports_enabled=False).start()
        try:
            yield server
        finally:
            server.stop()
            double.stop()


def ask(bot: BotServer, channel: str, question: str, user: str = ADMIN_USER) -> str:
    """A question (a mention, or a DM) and the bot's answer; returns the answer's ts."""
    ts = bot.sender.next_ts()
    if channel.startswith("D"):
        before = len([c for c in bot.double.calls_to("chat.postMessage")
                      if c.args.get("channel") == channel and not c.args.get("thread_ts") and (c.response or {}).get("ok")])
        bot.sender.event({"type": "message", "user": user, "text": question, "ts": ts, "channel": channel,
                          "channel_type": "im"})
        answer_ts, _ = wait_answer(bot, channel, None, after=before)
        return answer_ts
    bot.sender.mention(f"<@UFLYWHEEL> {question}", user=user, channel=channel, ts=ts)
    answer_ts, _ = wait_answer(bot, channel, ts)
    return answer_ts


def teach(bot: BotServer, channel: str, question: str, gold: str) -> None:
    """An admin corrects the bot's answer (admins' corrections count at once, no review)."""
    answer_ts = ask(bot, channel, question)
    thanks = suggest_correction(bot, channel, answer_ts, gold, ADMIN_USER)
    assert "I use it from now on" in thanks, thanks


def snapshot_text(tmp: Path) -> str:
    """Everything a snapshot holds, as the trainer, the exports and the reports read it."""
    with session_scope() as s:
        snap = build_snapshot(s, TrainerSettings(data_dir=tmp / "data", runs_dir=tmp / "runs",
                                                 adapters_dir=tmp / "adapters", augment=False))
    rows = [row for split in snap.dataset.values() for row in split]
    rows += [json.loads(line) for p in Path(snap.row.path).rglob("*.jsonl")
             for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return "\n".join(_strings(rows))  # the texts themselves: a quote in an answer is not JSON-escaped


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in _strings(v)] if isinstance(value, list) else []


def test_private_teaching_never_trains_the_shared_model(bot, tmp_path):
    public_gold = "The all-hands meeting is on Thursdays at 16:00 in the atrium."
    dm_gold = "Your salary band is L5, 81,000 to 94,000 a year."
    private_gold = "The reorg of the platform team is announced on March 3."
    connect_gold = "Our partner discount for Aldermoor is 22 percent."
    dm_shortcut_q = "What is the wifi password in the CEO's office?"

    teach(bot, PUBLIC, "When is the all-hands meeting?", public_gold)
    teach(bot, DM, "What is my salary band?", dm_gold)
    teach(bot, EXTERNAL, "What discount does Aldermoor get?", connect_gold)
    # a 👍 (an admin's, so it counts at once) on an answer in a private channel
    private_ts = ask(bot, PRIVATE, "When is the platform reorg announced?")
    with session_scope() as s:
        private_answer = get_message(s, PRIVATE, private_ts).text
    bot.sender.reaction("+1", channel=PRIVATE, ts=private_ts, user=ADMIN_USER)
    # "Add to training data" on an answer in a DM
    dm_ts = ask(bot, DM, dm_shortcut_q)
    bot.sender.message_shortcut(callback_id="add_to_training", channel=DM, message_ts=dm_ts, user=ADMIN_USER)
    with session_scope() as s:
        dm_answer = get_message(s, DM, dm_ts)

    def recorded() -> bool:
        with session_scope() as s:
            return all(get_channel(s, c) is not None for c in (PUBLIC, PRIVATE, EXTERNAL, DM))
    wait_until(recorded, 30)
    with session_scope() as s:
        assert get_channel(s, PUBLIC).visibility == Visibility.public
        assert get_channel(s, PRIVATE).visibility == Visibility.private
        assert get_channel(s, EXTERNAL).visibility == Visibility.external
        assert get_channel(s, DM).visibility == Visibility.direct

    def shortcut_and_vote_stored() -> bool:
        from store.feedback import feedback_for_message
        with session_scope() as s:
            kinds = {f.kind for f in feedback_for_message(s, dm_answer.id)}
            votes = {f.kind for f in feedback_for_message(s, get_message(s, PRIVATE, private_ts).id)}
        return "shortcut" in kinds and "reaction" in votes
    wait_until(shortcut_and_vote_stored, 30)

    text = snapshot_text(tmp_path / "first")
    assert public_gold in text  # the public channel's correction trains
    for secret in (dm_gold, connect_gold, dm_shortcut_q):
        assert secret not in text, secret
    assert private_answer not in text or private_answer in public_gold  # the 👍'd private answer stays out
    with session_scope() as s:  # each derived example says where it may be seen
        scopes = {e.answer or e.rejected_answer: e.visible_in for e in list_examples(s)}
    assert scopes[dm_gold] == DM and scopes[connect_gold] == EXTERNAL and scopes[public_gold] is None
    assert scopes[private_answer] == PRIVATE and scopes[dm_answer.text] == DM

    # Bob asks the Slack Connect question in the public channel: not answered from that channel's memory
    bob_ts = ask(bot, PUBLIC, "What discount does Aldermoor get?", user=BOB)
    with session_scope() as s:
        assert get_message(s, PUBLIC, bob_ts).text != connect_gold

    # An admin opts the private channel in: audited, and its 👍 trains from the next snapshot on
    refused = bot.sender.command(f"share <#{PRIVATE}|platform>", user=BOB, channel=PUBLIC)
    assert refused.status_code == 200
    bot.double.wait_for("response", lambda c: c.args["response_id"] == bot.sender.last_response_id)
    bot.sender.command(f"share <#{PRIVATE}|platform>", user=ADMIN_USER, channel=PUBLIC)
    said = bot.double.wait_for("response", lambda c: c.args["response_id"] == bot.sender.last_response_id)[0]
    assert "train the model everyone uses" in said.args["text"]
    with session_scope() as s:
        audit = {(e.actor, e.action, e.outcome) for e in list_audit(s) if "share" in e.action}
        assert get_channel(s, PRIVATE).shared_for_training
    assert (ADMIN_USER, "channel.share", "ok") in audit and (BOB, "command.share", "refused") in audit
    text = snapshot_text(tmp_path / "shared")
    assert private_answer in text and dm_gold not in text and connect_gold not in text


def test_a_channel_made_private_takes_its_teaching_back(bot, tmp_path):
    gold = "The hackathon prize is a week in the Lofoten cabin."
    teach(bot, LATER_PRIVATE, "What is the hackathon prize?", gold)
    assert gold in snapshot_text(tmp_path / "before")
    bot.double.private_channels.add(LATER_PRIVATE)
    bot.sender.event({"type": "message", "subtype": "channel_convert_to_private", "user": ADMIN_USER,
                      "text": "made this channel *private*.", "ts": bot.sender.next_ts(),
                      "channel": LATER_PRIVATE, "channel_type": "group"})

    def restricted() -> bool:
        with session_scope() as s:
            row = get_channel(s, LATER_PRIVATE)
            items = [memory_item(s, key) for key in (f"example:{e.id}" for e in list_examples(s))]
            return row.visibility == Visibility.private and all(i is None or i.answer != gold or i.visible_in
                                                                 for i in items)
    wait_until(restricted, 30)
    assert gold not in snapshot_text(tmp_path / "after")
    # and Bob, in the public channel, no longer gets it from the memory
    bob_ts = ask(bot, PUBLIC, "What is the hackathon prize?", user=BOB)
    with session_scope() as s:
        assert get_message(s, PUBLIC, bob_ts).text != gold


# -- the rule and the lookup, one by one ----------------------------------------------------------
def test_the_training_rule(session):
    assert training_scope(session, None) is None  # curated (imports): everyone
    assert training_scope(session, "CNEVERSEEN") == "CNEVERSEEN"  # unknown counts as private
    for visibility, trains in [(Visibility.public, True), (Visibility.private, False), (Visibility.direct, False),
                               (Visibility.external, False), (Visibility.unknown, False)]:
        record_channel_visibility(session, f"C{visibility.value.upper()}", visibility)
        assert (training_scope(session, f"C{visibility.value.upper()}") is None) == trains, visibility


def test_slack_connect_and_private_channels_are_not_public():
    assert visibility_from_info({"is_private": False}) == Visibility.public
    assert visibility_from_info({"is_ext_shared": True}) == Visibility.external
    assert visibility_from_info({"is_pending_ext_shared": True}) == Visibility.external
    assert visibility_from_info({"is_private": True}) == Visibility.private
    assert visibility_from_info({"is_mpim": True}) == Visibility.private
    assert visibility_from_info({"is_im": True}) == Visibility.direct


def test_the_visibility_cache_expires_and_follows_change_events(session, monkeypatch):
    asked = []

    class Client:
        def conversations_info(self, channel):
            asked.append(channel)
            return {"channel": {"is_private": len(asked) > 1}}

    clock = [1000.0]
    monkeypatch.setattr("bot.channels.time.monotonic", lambda: clock[0])
    vis = ChannelVisibility(ttl_s=60)
    assert vis.is_public(Client(), "CCACHE001") and vis.is_public(Client(), "CCACHE001")
    assert asked == ["CCACHE001"]  # cached
    clock[0] += 61  # expired: asked again, and now it is private
    assert not vis.is_public(Client(), "CCACHE001")
    assert get_channel(session, "CCACHE001").visibility == Visibility.private
    vis.changed(Client(), "CCACHE001")  # an event: asked at once
    assert len(asked) == 3
