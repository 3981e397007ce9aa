"""What the team unsays is forgotten (issue 25, point 2): through the real bot (uvicorn, the
local Slack double, a real gateway with the tiny model, a real SQLite store), a question deleted
in Slack leaves the store with its answer, votes, correction, derived examples and memory item
before the next snapshot, and the audit names the version already trained on it; an edited
question re-teaches its answer's memory item, or sends the correction back to review when the
editor's changes need one; `/flywheel forget @user` removes a person's messages and feedback
(admins only, audited with counts); `/flywheel memory` lists, searches and removes memory items;
FLYWHEEL_RETENTION_DAYS purges old conversations nobody taught from at start-up; memory items
are redacted like training data. The store's part runs on SQLite and PostgreSQL at the end."""
from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from flywheel.app.demo.slack_double import BOT_USER_ID, SlackDouble
from flywheel.prompt import normalize
from store.audit import list_audit
from store.conversations import get_message, record_message
from store.db import session_scope
from store.examples import list_examples, upsert_example
from store.feedback import feedback_for_message, upsert_vote
from store.forget import forget_message, purge_untaught
from store.memory import memory_item, memory_items_by_key, upsert_memory_item
from store.models import Conversation, Feedback, MemoryItem, Message, ReviewState, Role, utcnow
from store.review import decide_review
from store.versions import register_version
from tests.support.bot_harness import (
    ADMIN_CHANNEL,
    ADMIN_USER,
    BotServer,
    command_reply,
    store_and_gateway,
    suggest_correction,
    wait_answer,
)
from tests.support.waiting import wait_until
from trainer.dataset import build_snapshot
from trainer.settings import TrainerSettings

PUBLIC = "CFORGET01"
BOB = "UBOB0025"
CAROL = "UCAROL025"  # the seeded old conversations are hers: forgetting Bob leaves them alone
OLD_UNTAUGHT, OLD_TAUGHT, RECENT = "COLDQUIET", "COLDTAUGHT", "CRECENT01"


def _conversation(s, channel: str, days_ago: float, *, voted: bool) -> None:
    """A question and its answer, `days_ago` old; `voted`: someone 👍'd the answer."""
    at = utcnow() - timedelta(days=days_ago)
    conv = Conversation(channel=channel, thread_ts="1000.000100", created_at=at)
    s.add(conv)
    s.flush()
    question = Message(conversation_id=conv.id, channel=channel, ts="1000.000100", role=Role.user,
                       author=CAROL, text=f"an old question in {channel}", created_at=at)
    answer = Message(conversation_id=conv.id, channel=channel, ts="1000.000200", role=Role.assistant,
                     author=BOT_USER_ID, text=f"an old answer in {channel}", created_at=at)
    s.add_all([question, answer])
    s.commit()
    if voted:
        upsert_vote(s, message_id=answer.id, user=CAROL, kind="reaction", value="up")


@pytest.fixture(scope="module")
def bot(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forgetting")
    with store_and_gateway(tiny_model_dir, tmp, "forgetting-test") as gateway:
        with session_scope() as s:  # there before the bot starts: its start-up sweep purges
            _conversation(s, OLD_UNTAUGHT, 40, voted=False)
            _conversation(s, OLD_TAUGHT, 40, voted=True)
            _conversation(s, RECENT, 2, voted=False)
        double = SlackDouble().start()
        server = BotServer(gateway_url=gateway.url, double=double, reports_enabled=False,
                           retention_days=30).start()
        try:
            yield server
        finally:
            server.stop()
            double.stop()


def ask(bot: BotServer, question: str, user: str = ADMIN_USER) -> tuple[str, str]:
    """A mention in the public channel; (the question's ts, the answer's ts)."""
    ts, _ = bot.sender.mention(question, user=user, channel=PUBLIC)
    answer_ts, _ = wait_answer(bot, PUBLIC, ts)
    return ts, answer_ts


def teach(bot: BotServer, question: str, gold: str, asker: str = ADMIN_USER) -> tuple[str, str]:
    """`asker` asks, an admin corrects (counted at once); (question ts, answer ts)."""
    ts, answer_ts = ask(bot, question, asker)
    assert "I use it from now on" in suggest_correction(bot, PUBLIC, answer_ts, gold, ADMIN_USER)
    return ts, answer_ts


def snapshot(tmp: Path) -> tuple[str, int]:
    """Everything a training snapshot built now holds, and its id."""
    with session_scope() as s:
        snap = build_snapshot(s, TrainerSettings(data_dir=tmp / "data", runs_dir=tmp / "runs",
                                                 adapters_dir=tmp / "adapters", augment=False))
    rows = [row for split in snap.dataset.values() for row in split]
    return json.dumps(rows, ensure_ascii=False), snap.row.id


def train_on(snapshot_id: int) -> str:
    """A version registered as trained on that snapshot (the adapter itself does not matter here)."""
    with session_scope() as s:
        return register_version(s, adapter_path="/nowhere", adapter_sha256="0" * 64, base_model="tiny",
                                gate_passed=True, gate_reasons=[], dataset_snapshot_id=snapshot_id).name


def command(bot: BotServer, text: str, user: str = ADMIN_USER) -> str:
    return command_reply(bot, text, user=user, channel=PUBLIC)


def edit(bot: BotServer, ts: str, old: str, new: str, user: str) -> None:
    bot.sender.event({"type": "message", "subtype": "message_changed", "hidden": True, "channel": PUBLIC,
                      "channel_type": "channel", "ts": bot.sender.next_ts(), "event_ts": bot.sender.next_ts(),
                      "message": {"type": "message", "user": user, "text": new, "ts": ts,
                                  "edited": {"user": user, "ts": bot.sender.next_ts()}},
                      "previous_message": {"type": "message", "user": user, "text": old, "ts": ts}})


def stored_text(ts: str) -> str | None:
    with session_scope() as s:
        msg = get_message(s, PUBLIC, ts)
        return msg.text if msg else None


# -- a message deleted in Slack ---------------------------------------------------------------------
def test_a_deleted_question_is_forgotten_before_the_next_snapshot(bot, tmp_path):
    question, gold = "What is the door code of the server room?", "The server room door code is 4417."
    q_ts, answer_ts = teach(bot, question, gold)
    before, snap_id = snapshot(tmp_path / "before")
    assert gold in before and question in before
    version = train_on(snap_id)
    with session_scope() as s:
        answer_id = get_message(s, PUBLIC, answer_ts).id
        assert memory_item(s, f"message:{answer_id}").answer == gold

    bot.sender.event({"type": "message", "subtype": "message_deleted", "hidden": True, "channel": PUBLIC,
                      "channel_type": "channel", "ts": bot.sender.next_ts(), "deleted_ts": q_ts,
                      "event_ts": bot.sender.next_ts(),
                      "previous_message": {"type": "message", "user": ADMIN_USER, "ts": q_ts,
                                           "text": f"<@{BOT_USER_ID}> {question}"}})
    wait_until(lambda: stored_text(q_ts) is None, 30, "the deleted question to leave the store")
    with session_scope() as s:
        assert get_message(s, PUBLIC, answer_ts) is None  # the answer quoting it went with it
        assert not feedback_for_message(s, answer_id, include_retracted=True)
        assert not [e for e in list_examples(s, status=None) if gold in (e.answer or "")]
        [item] = memory_items_by_key(s, [f"message:{answer_id}"])  # a tombstone: ids only
        assert (item.active, item.question, item.answer, item.vector) == (False, "", "", b"")
        [event] = list_audit(s, action="message.forget")
    after, _ = snapshot(tmp_path / "after")
    assert gold not in after and question not in after
    assert event.target == f"message {PUBLIC}/{q_ts}" and event.detail["messages"] == 1
    assert event.detail["answers"] == 1 and event.detail["memory_items"] == 1
    assert event.detail["versions"] == [version] and snap_id in event.detail["snapshots"]
    # the next asker is not answered from a forgotten memory item
    _, bob_ts = ask(bot, question, BOB)
    assert stored_text(bob_ts) != gold


# -- a message edited in Slack ----------------------------------------------------------------------
def test_an_edited_question_teaches_its_correction_under_the_new_words(bot, tmp_path):
    old, new = "Where is the ski trip this year?", "Where is the winter offsite this year?"
    gold = "The winter offsite is in Chamonix, 12 to 15 February."
    q_ts, answer_ts = teach(bot, old, gold)
    assert old in snapshot(tmp_path / "before")[0]
    # the bot's own chat.update is no edit (Bolt drops it, and so would the bot)
    bot.sender.event({"type": "message", "subtype": "message_changed", "hidden": True, "channel": PUBLIC,
                      "ts": bot.sender.next_ts(), "message": {"type": "message", "user": BOT_USER_ID,
                                                              "bot_id": "BFLYWHEEL", "text": "streamed", "ts": answer_ts}},
                     event_id="EvBOTEDIT0001")
    bot.wait_dispatched("EvBOTEDIT0001")
    time.sleep(0.5)
    assert stored_text(answer_ts) != "streamed"

    edit(bot, q_ts, f"<@{BOT_USER_ID}> {old}", f"<@{BOT_USER_ID}> {new}", ADMIN_USER)
    wait_until(lambda: stored_text(q_ts) == f"<@{BOT_USER_ID}> {new}", 30, "the edit to be stored")

    def retaught():
        with session_scope() as s:
            item = memory_item(s, f"message:{get_message(s, PUBLIC, answer_ts).id}")
            return item is not None and item.question == normalize(new) and item.answer == gold
    wait_until(retaught, 30, "the memory item to be keyed by the new question")
    text, _ = snapshot(tmp_path / "after")
    assert new in text and gold in text and old not in text
    with session_scope() as s:
        assert list_audit(s, action="message.edit")[0].target == f"message {PUBLIC}/{q_ts}"


def test_an_edited_question_sends_its_correction_back_to_review(bot, tmp_path):
    old, new = "Who signs off travel expenses?", "Who signs off conference tickets?"
    gold = "Travel expenses are signed off by Priya in finance."
    q_ts, answer_ts = teach(bot, old, gold, asker=BOB)  # Bob is neither admin nor reviewer
    with session_scope() as s:
        answer_id = get_message(s, PUBLIC, answer_ts).id
        assert memory_item(s, f"message:{answer_id}") is not None
    posted = len(bot.double.calls_to("chat.postMessage"))
    edit(bot, q_ts, f"<@{BOT_USER_ID}> {old}", f"<@{BOT_USER_ID}> {new}", BOB)

    def back_in_review():
        with session_scope() as s:
            [row] = [f for f in feedback_for_message(s, answer_id) if f.kind == "correction"]
            return row.review == ReviewState.pending and memory_item(s, f"message:{answer_id}") is None
    wait_until(back_in_review, 30, "the correction to wait for a review again")
    bot.double.wait_for("chat.postMessage", lambda c: c.args.get("channel") == ADMIN_CHANNEL
                        and "waits for review" in (c.args.get("text") or ""), count=1)
    assert len(bot.double.calls_to("chat.postMessage")) > posted
    assert gold not in snapshot(tmp_path / "pending")[0]  # a pending correction teaches nothing
    with session_scope() as s:
        assert any(e.detail["reason"] == "question edited" for e in list_audit(s, action="correction.reopen"))


# -- /flywheel forget @user -------------------------------------------------------------------------
def test_forget_a_person(bot, tmp_path):
    bob_q, bob_gold = "What is Bob's home address?", "Bob lives at 12 Larch Lane, Upper Tolworth."
    admin_q = "What time does the canteen open?"
    bobs_fix = "The canteen opens at 7:30, says Bob."
    teach(bot, bob_q, bob_gold, asker=BOB)
    _, admin_answer = ask(bot, admin_q)
    suggest_correction(bot, PUBLIC, admin_answer, bobs_fix, BOB)  # waits for review
    bot.sender.reaction("+1", channel=PUBLIC, ts=admin_answer, user=BOB)
    with session_scope() as s:
        admin_answer_id = get_message(s, PUBLIC, admin_answer).id
    wait_until(lambda: {f.kind for f in _feedback_of(BOB)} >= {"reaction", "correction"}, 30)
    with session_scope() as s:  # Bob's 👍 waits for review like his correction; an admin approves the 👍
        decide_review(s, next(f.id for f in _feedback_of(BOB) if f.kind == "reaction"), actor=ADMIN_USER,
                      approve=True)
    before, snap_id = snapshot(tmp_path / "before")
    assert bob_q in before and admin_q in before
    version = train_on(snap_id)

    assert "Only Flywheel admins" in command(bot, f"forget <@{BOB}|bob>", user=BOB)
    assert "usage: /flywheel forget @user" in command(bot, "forget bob")
    assert "nothing of <@UNOBODY01> is stored" in command(bot, "forget <@UNOBODY01|nobody>")
    said = command(bot, f"forget <@{BOB}|bob>")
    assert said.startswith(f":wastebasket: Forgot <@{BOB}>") and f"`{version}`" in said, said
    with session_scope() as s:
        assert not s.exec(select(Message).where(Message.author == BOB)).all()
        assert not _feedback_of(BOB)
        assert get_message(s, PUBLIC, admin_answer) is not None  # the admin's question and its answer stay
        assert not s.exec(select(MemoryItem).where(MemoryItem.answer == bob_gold)).all()
        [event] = list_audit(s, action="user.forget")
        refused = list_audit(s, action="command.forget")
    assert event.actor == ADMIN_USER and event.target == BOB
    # at least what this test made (the module's store may hold Bob's messages from other tests too)
    assert event.detail["messages"] >= 1 and event.detail["feedback"] >= 2 and event.detail["memory_items"] >= 1
    assert version in event.detail["versions"]
    assert {(e.actor, e.outcome) for e in refused} >= {(BOB, "refused"), (ADMIN_USER, "error")}
    after, _ = snapshot(tmp_path / "after")
    assert bob_q not in after and bob_gold not in after and bobs_fix not in after
    with session_scope() as s:  # Bob's 👍 was the only vote: the admin's answer is no target any more
        assert not [e for e in list_examples(s, status=None) if e.message_id == admin_answer_id]


def _feedback_of(user: str) -> list[Feedback]:
    with session_scope() as s:
        return list(s.exec(select(Feedback).where(Feedback.user == user)).all())


# -- /flywheel memory -------------------------------------------------------------------------------
def test_admins_list_search_and_remove_memory_items(bot):
    question, gold = "What is the guest wifi called?", "The guest wifi is Meadowlark-Guest."
    _, answer_ts = teach(bot, question, gold)
    with session_scope() as s:
        item = memory_item(s, f"message:{get_message(s, PUBLIC, answer_ts).id}")
    listed = command(bot, "memory")
    assert f"`{item.id}`" in listed and "Meadowlark-Guest" in listed
    assert "Meadowlark-Guest" in command(bot, "memory search meadowlark")
    assert "No memory item contains" in command(bot, "memory search zebra-crossing-xyz")
    assert "Only Flywheel admins" in command(bot, "memory", user=BOB)
    assert "no active memory item 999999" in command(bot, "memory remove 999999")
    assert "usage: /flywheel memory remove ID" in command(bot, "memory remove wifi")
    assert f"removed memory item {item.id}" in command(bot, f"memory remove {item.id}")
    with session_scope() as s:
        assert memory_item(s, item.key) is None
        [event] = list_audit(s, action="memory.remove")
    assert event.actor == ADMIN_USER and event.target == f"memory {item.id}"
    assert "Meadowlark-Guest" not in command(bot, "memory")
    _, bob_ts = ask(bot, question, BOB)
    assert stored_text(bob_ts) != gold


# -- memory items are redacted like training data ---------------------------------------------------
def test_memory_items_are_redacted(bot):
    question = "How do I reach the on-call engineer?"
    gold = "Mail oncall.lead@example.com; the pager password is hunter2hunter."
    _, answer_ts = teach(bot, question, gold)
    with session_scope() as s:
        item = memory_item(s, f"message:{get_message(s, PUBLIC, answer_ts).id}")
    assert "oncall.lead@example.com" not in item.answer and "[EMAIL]" in item.answer
    assert "hunter2hunter" not in item.answer and "[SECRET]" in item.answer


# -- FLYWHEEL_RETENTION_DAYS ------------------------------------------------------------------------
def test_retention_purges_old_conversations_nobody_taught_from(bot):
    def channels() -> set[str]:
        with session_scope() as s:
            return set(s.exec(select(Conversation.channel)).all())
    wait_until(lambda: OLD_UNTAUGHT not in channels(), 30, "the start-up retention sweep")
    assert {OLD_TAUGHT, RECENT} <= channels()
    with session_scope() as s:
        [event] = list_audit(s, action="retention.purge")
        assert not s.exec(select(Message).where(Message.channel == OLD_UNTAUGHT)).all()
    assert event.detail["messages"] == 1 and event.detail["answers"] == 1 and event.detail["conversations"] == 1


# -- the store's part, on SQLite and PostgreSQL -------------------------------------------------------
def test_the_store_forgets_on_both_databases(session):
    q = record_message(session, channel="CSTORE001", ts="1.000001", thread_ts=None, role=Role.user,
                       text="what is the vpn key?", author=BOB)
    a = record_message(session, channel="CSTORE001", ts="1.000002", thread_ts="1.000001", role=Role.assistant,
                       text="It is in the vault.", author=BOT_USER_ID)
    upsert_vote(session, message_id=a.id, user=ADMIN_USER, kind="correction", value="correction",
                correction="The VPN key is in 1Password.", is_admin=True, review=ReviewState.approved)
    upsert_example(session, messages=[{"role": "user", "content": q.text}], answer="The VPN key is in 1Password.",
                   source="correction", message_id=a.id)
    upsert_memory_item(session, key=f"message:{a.id}", question=q.text, answer="The VPN key is in 1Password.",
                       source="correction", author=ADMIN_USER, channel="CSTORE001", visible_in=None,
                       vector=b"\0" * 16)
    gone = forget_message(session, "CSTORE001", "1.000001", actor=BOB)
    assert (gone.messages, gone.answers, gone.feedback, gone.examples, gone.memory_items) == (1, 1, 1, 1, 1)
    assert gone.conversations == 1 and not list_examples(session, status=None)
    assert forget_message(session, "CSTORE001", "1.000001", actor=BOB) is None
    _conversation(session, "CSTOREOLD", 10, voted=False)
    _conversation(session, "CSTOREKEEP", 10, voted=True)
    assert purge_untaught(session, before=utcnow() - timedelta(days=30)).conversations == 0
    purged = purge_untaught(session, before=utcnow() - timedelta(days=5))
    assert (purged.conversations, purged.messages, purged.answers) == (1, 1, 1)
    assert set(session.exec(select(Conversation.channel)).all()) == {"CSTOREKEEP"}
