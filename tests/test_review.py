"""Who decides what the model learns: a non-admin's correction waits for a reviewer (admin channel,
`/flywheel review`), approval teaches it (memory + training data), rejection never does; only
admins make golden items; an admin's import is never overridden by a non-admin's correction.
The bot runs for real (uvicorn, Bolt, the local Slack double, a gateway with the tiny model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.prompt import PromptSettings
from gateway.settings import GatewaySettings
from trainer.dataset import build_snapshot
from trainer.settings import TrainerSettings
from store.audit import list_audit
from store.conversations import get_message
from store.db import session_scope
from store.errors import InvalidStateError
from store.examples import list_examples, upsert_example
from store.feedback import feedback_for_message, upsert_vote
from store.memory import memory_item
from store.migrate import upgrade
from store.models import FeedbackKind, ReviewState
from store.feedback import count_feedback
from store.review import count_pending, decide_review
from tests.support.bot_harness import ADMIN_CHANNEL, ADMIN_USER, BotServer, suggest_correction
from tests.support.gateway_server import GatewayServer
from tests.support.waiting import wait_until

ALICE, BOB, REVIEWER = "UALICE01", "UBOB0001", "UREVIEW01"


@pytest.fixture(scope="module")
def bot(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review")
    url = f"sqlite:///{tmp / 'flywheel.db'}"
    upgrade(url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        gateway = GatewayServer(GatewaySettings(base_model=tiny_model_dir, adapters_dir=tmp / "adapters",
                                                max_new_tokens=8, replica_id="review-test")).start()
        server = BotServer(gateway_url=gateway.url, reviewers=[REVIEWER]).start()
        yield server
        server.stop()
        gateway.stop()


def ask(bot: BotServer, text: str, channel: str, user: str = ALICE) -> str:
    """Mention the bot; the answer's ts once its final text is in."""
    q_ts, resp = bot.sender.mention(text, channel=channel, user=user)
    assert resp.status_code == 200
    placeholder = bot.double.wait_for(
        "chat.postMessage", lambda c: c.args.get("channel") == channel and c.args.get("thread_ts") == q_ts
        and (c.response or {}).get("ok"), timeout=60)[0]
    ts = placeholder.response["ts"]
    bot.double.wait_for("chat.update", lambda c: c.args.get("ts") == ts
                        and "_writing…_" not in json.dumps(c.args.get("blocks"), ensure_ascii=False), timeout=60)
    return ts


def stored(channel: str, ts: str):
    with session_scope() as s:
        return get_message(s, channel, ts)


def correction_of(message_id: int):
    with session_scope() as s:
        return next(f for f in feedback_for_message(s, message_id) if f.kind == FeedbackKind.correction)


def suggest(bot: BotServer, channel: str, answer_ts: str, text: str, user: str = ALICE) -> str:
    return suggest_correction(bot, channel, answer_ts, text, user)


def review_request(bot: BotServer, feedback_id: int):
    """The admin-channel post asking to review this correction."""
    return bot.double.wait_for("chat.postMessage", lambda c: c.args.get("channel") == ADMIN_CHANNEL
                               and f'"value": "{feedback_id}"' in json.dumps(c.args.get("blocks")))[-1]


def click(bot: BotServer, action_id: str, feedback_id: int, user: str, post=None) -> dict:
    """Press a review button; the bot's reply through the response_url."""
    channel = post.args["channel"] if post else "CGENERAL1"
    ts = post.response["ts"] if post else "1.000"
    message = {"type": "message", "ts": ts, "text": "", "blocks": json.loads(post.args["blocks"])
               if post and isinstance(post.args.get("blocks"), str) else (post.args.get("blocks") if post else [])}
    resp = bot.sender.block_action(action_id=action_id, value=str(feedback_id), channel=channel, message_ts=ts,
                                   user=user, message=message)
    assert resp.status_code == 200
    rid = bot.sender.last_response_id
    return bot.double.wait_for("response", lambda c: c.args["response_id"] == rid)[0].args


def examples_answering(text: str):
    from trainer.targets import derive_examples

    with session_scope() as s:
        derive_examples(s, admins=frozenset({ADMIN_USER}))
        return [e for e in list_examples(s) if e.answer == text]


def test_a_users_correction_waits_then_an_approval_teaches_it(bot):
    gold = "Expense reports are due on the 5th working day of each month, in Ledgerly."
    a_ts = ask(bot, "When are expense reports due at Lumenfold?", "CREVIEW01")
    msg = stored("CREVIEW01", a_ts)
    bot.sender.reaction("-1", channel="CREVIEW01", ts=a_ts, user=ALICE)
    thanks = suggest(bot, "CREVIEW01", a_ts, gold)
    assert "once a reviewer approves it" in thanks
    row = correction_of(msg.id)
    assert row.review == ReviewState.pending
    post = review_request(bot, row.id)
    shown = json.dumps(post.args["blocks"])
    assert gold in shown and "When are expense reports due" in shown and f"<@{ALICE}>" in shown
    # pending: neither the memory nor the training data knows it
    assert examples_answering(gold) == []
    with session_scope() as s:
        assert memory_item(s, f"message:{msg.id}") is None
    asked_again = stored("CREVIEW02", ask(bot, "by when do I have to hand in my expense report at lumenfold",
                                          "CREVIEW02", user=BOB))
    assert asked_again.text != gold and asked_again.model_version != "memory"
    # someone who is not a reviewer cannot approve it
    refused = click(bot, "review_approve", row.id, BOB, post)
    assert refused["response_type"] == "ephemeral" and "Only Flywheel admins and reviewers" in refused["text"]
    assert correction_of(msg.id).review == ReviewState.pending
    # a reviewer approves: the review message says who, the author hears, memory and training know it
    done = click(bot, "review_approve", row.id, REVIEWER, post)
    assert done["replace_original"] and f"approved by <@{REVIEWER}>" in done["text"]
    assert "review_approve" not in json.dumps(done.get("blocks"))  # the buttons are gone
    bot.double.wait_for("chat.postEphemeral", lambda c: c.args.get("user") == ALICE
                        and "A reviewer approved" in c.args.get("text", ""))
    approved = correction_of(msg.id)
    assert (approved.review, approved.reviewed_by) == (ReviewState.approved, REVIEWER)
    with session_scope() as s:
        assert memory_item(s, f"message:{msg.id}").answer == gold
        audit = list_audit(s, action="correction.approve", target=f"feedback {row.id}")
    assert {(e.actor, e.outcome) for e in audit} == {(BOB, "refused"), (REVIEWER, "ok")}
    taught = examples_answering(gold)
    assert len(taught) == 1 and not taught[0].golden  # a user's 👎 + correction is never golden
    paraphrase = stored("CREVIEW03", ask(bot, "by when do I have to hand in my expense report at lumenfold",
                                         "CREVIEW03", user=BOB))
    assert paraphrase.text == gold and paraphrase.model_version == "memory"
    # a second decision on the same correction is refused with who decided
    again = click(bot, "review_reject", row.id, ADMIN_USER, post)
    assert "already approved" in again["text"] and f"<@{REVIEWER}>" in again["text"]


def test_rejected_corrections_teach_nothing_and_edits_teach_the_reviewers_text(bot):
    a1 = ask(bot, "What is the guest wifi password?", "CREVIEW11")
    m1 = stored("CREVIEW11", a1)
    suggest(bot, "CREVIEW11", a1, "It is hunter2, ask anyone.", user=BOB)
    r1 = correction_of(m1.id)
    post = review_request(bot, r1.id)
    rejected = click(bot, "review_reject", r1.id, ADMIN_USER, post)
    assert f"rejected by <@{ADMIN_USER}>" in rejected["text"]
    assert correction_of(m1.id).review == ReviewState.rejected
    assert examples_answering("It is hunter2, ask anyone.") == []
    with session_scope() as s:
        assert memory_item(s, f"message:{m1.id}") is None

    a2 = ask(bot, "Where do I book a meeting room?", "CREVIEW12")
    m2 = stored("CREVIEW12", a2)
    suggest(bot, "CREVIEW12", a2, "in the room app i think", user=BOB)
    r2 = correction_of(m2.id)
    post = review_request(bot, r2.id)
    bot.sender.block_action(action_id="review_edit", value=str(r2.id), channel=ADMIN_CHANNEL,
                            message_ts=post.response["ts"], user=REVIEWER)
    view = bot.double.wait_for("views.open", lambda c: c.args["view"].get("callback_id") == "review_edit_modal")[-1]
    view = view.args["view"]
    assert view["blocks"][0]["element"]["initial_value"] == "in the room app i think"
    edited = "Book meeting rooms in the Rooms app; rooms free up after 10 minutes without check-in."
    ok = bot.sender.view_submission(callback_id="review_edit_modal", private_metadata=view["private_metadata"],
                                    values={"correction": {"text": {"type": "plain_text_input", "value": edited}}},
                                    user=REVIEWER)
    assert ok.status_code == 200 and not ok.content
    decided = correction_of(m2.id)
    assert (decided.review, decided.correction) == (ReviewState.approved, edited)
    assert decided.history[-1]["correction"] == "in the room app i think"  # what Bob wrote stays on record
    assert len(examples_answering(edited)) == 1 and examples_answering("in the room app i think") == []
    def remembered():  # the modal is acked first; the memory learns it right after
        with session_scope() as s:
            item = memory_item(s, f"message:{m2.id}")
            return (item.answer, item.author) if item else None
    # cited as the reviewer's words: Bob did not write them
    assert wait_until(remembered, what="the edited answer in the memory") == (edited, REVIEWER)
    with session_scope() as s:
        assert list_audit(s, action="correction.approve", target=f"feedback {r2.id}")[0].detail["edited"]


def test_review_queue_command_and_private_corrections(bot):
    carol, dm = "UCAROL01", "DCAROL009"
    q_ts = bot.sender.next_ts()
    bot.sender.event({"type": "message", "user": carol, "text": "What is my desk number?", "ts": q_ts,
                      "channel": dm, "channel_type": "im"})
    placeholder = bot.double.wait_for("chat.postMessage", lambda c: c.args.get("channel") == dm
                                      and (c.response or {}).get("ok"), timeout=60)[0]
    a_ts = placeholder.response["ts"]
    bot.double.wait_for("chat.update", lambda c: c.args.get("ts") == a_ts
                        and "_writing…_" not in json.dumps(c.args.get("blocks"), ensure_ascii=False), timeout=60)
    secret = "Desk 4.17, by the window on the fourth floor."
    suggest(bot, dm, a_ts, secret, user=carol)
    row = correction_of(stored(dm, a_ts).id)
    # the admin channel hears that something waits, never what a DM said
    notice = bot.double.wait_for("chat.postMessage", lambda c: c.args.get("channel") == ADMIN_CHANNEL
                                 and "private conversation" in c.args.get("text", ""))[-1]
    assert secret not in json.dumps(notice.args) and "What is my desk number" not in json.dumps(notice.args)
    # `/flywheel review`: reviewers see the queue with buttons, others are refused
    resp = bot.sender.command("review", user=REVIEWER)
    assert resp.status_code == 200
    rid = bot.sender.last_response_id
    listed = bot.double.wait_for("response", lambda c: c.args["response_id"] == rid, timeout=60)[0].args
    assert listed["response_type"] == "ephemeral" and secret in json.dumps(listed["blocks"])
    assert f'"value": "{row.id}"' in json.dumps(listed["blocks"]) and len(listed["blocks"]) <= 50
    with session_scope() as s:
        waiting = count_pending(s)
    assert f"{waiting} item" in listed["text"]
    resp = bot.sender.command("review", user=BOB)
    rid = bot.sender.last_response_id
    refused = bot.double.wait_for("response", lambda c: c.args["response_id"] == rid, timeout=60)[0].args
    assert "Only Flywheel admins and reviewers" in refused["text"] and secret not in json.dumps(refused)


def test_an_admins_correction_counts_at_once(bot):
    gold = "The office opens at 8:00 and closes at 19:00 on weekdays."
    a_ts = ask(bot, "When does the office open?", "CREVIEW21")
    msg = stored("CREVIEW21", a_ts)
    thanks = suggest(bot, "CREVIEW21", a_ts, gold, user=ADMIN_USER)
    assert "I use it from now on" in thanks
    assert correction_of(msg.id).review == ReviewState.approved
    with session_scope() as s:
        assert memory_item(s, f"message:{msg.id}").answer == gold
        own = list_audit(s, action="correction.approve")
    assert any(e.actor == ADMIN_USER and e.detail.get("own") for e in own)
    assert len(examples_answering(gold)) == 1


# -- a 👍 and "Add to training data" wait like corrections -------------------------------------------
def snapshot_text(tmp: Path) -> str:
    """Every row of a fresh snapshot (derived with FLYWHEEL_ADMINS = the admin), as the trainer reads it."""
    with session_scope() as s:
        snap = build_snapshot(s, TrainerSettings(data_dir=tmp / "data", runs_dir=tmp / "runs", admins=[ADMIN_USER],
                                                 adapters_dir=tmp / "adapters", augment=False))
    rows = [row for split in snap.dataset.values() for row in split]
    return json.dumps(rows, ensure_ascii=False) + "".join(
        p.read_text(errors="replace") for p in Path(snap.row.path).rglob("*.jsonl"))


def reply(bot: BotServer) -> dict:
    """The bot's answer through the response_url of the last click or shortcut."""
    rid = bot.sender.last_response_id
    return bot.double.wait_for("response", lambda c: c.args["response_id"] == rid, timeout=60)[0].args


def vote_of(message_id: int, user: str, kind: str):
    def stored_vote():
        with session_scope() as s:
            return next((f for f in feedback_for_message(s, message_id) if f.user == user and f.kind == kind), None)
    return wait_until(stored_vote, what=f"{user}'s {kind} stored")


def test_a_users_thumbs_up_trains_only_once_a_reviewer_approves_it(bot, tmp_path):
    question = "Which floor is the Lumenfold mail room on?"
    a_ts = ask(bot, question, "CREVIEW31")
    msg = stored("CREVIEW31", a_ts)
    with session_scope() as s:
        ups_before = count_feedback(s).get("reaction:up", 0)
    bot.sender.reaction("+1", channel="CREVIEW31", ts=a_ts, user=BOB)
    row = vote_of(msg.id, BOB, "reaction")
    assert row.review == ReviewState.pending
    post = review_request(bot, row.id)
    assert f"👍 by <@{BOB}>" in json.dumps(post.args["blocks"], ensure_ascii=False)
    # a second 👍 joins the same item: one post, one item in the queue
    bot.sender.block_action(action_id="vote_up", value="up", channel="CREVIEW31", message_ts=a_ts, user=ALICE)
    assert "a reviewer checks this answer before I learn from it" in reply(bot)["text"]
    second = vote_of(msg.id, ALICE, "button")
    assert len([c for c in bot.double.calls_to("chat.postMessage") if c.args.get("channel") == ADMIN_CHANNEL
                and f'"value": "{second.id}"' in json.dumps(c.args.get("blocks"))]) == 0
    # still a signal: the reports count it
    with session_scope() as s:
        assert count_feedback(s).get("reaction:up", 0) == ups_before + 1
    assert question not in snapshot_text(tmp_path / "pending")
    done = click(bot, "review_approve", row.id, REVIEWER, post)
    assert f"approved by <@{REVIEWER}>" in done["text"]
    with session_scope() as s:
        decided = [f for f in feedback_for_message(s, msg.id) if f.kind in ("reaction", "button")]
        assert memory_item(s, f"message:{msg.id}") is None  # a 👍 teaches training, not the memory
    assert {(f.user, f.review) for f in decided} == {(BOB, ReviewState.approved), (ALICE, ReviewState.approved)}
    assert question in snapshot_text(tmp_path / "approved")


def test_add_to_training_data_waits_and_a_rejection_keeps_it_out(bot, tmp_path):
    question = "Who signs off Lumenfold travel over 2000 EUR?"
    a_ts = ask(bot, question, "CREVIEW32")
    msg = stored("CREVIEW32", a_ts)
    bot.sender.message_shortcut(callback_id="add_to_training", channel="CREVIEW32", message_ts=a_ts, user=BOB)
    told = reply(bot)
    assert "before it goes into the training data" in told["text"]
    row = vote_of(msg.id, BOB, "shortcut")
    assert row.review == ReviewState.pending
    post = review_request(bot, row.id)
    assert "Add to training data" in json.dumps(post.args["blocks"], ensure_ascii=False)
    assert question not in snapshot_text(tmp_path / "pending")
    rejected = click(bot, "review_reject", row.id, ADMIN_USER, post)
    assert f"rejected by <@{ADMIN_USER}>" in rejected["text"]
    bot.double.wait_for("chat.postEphemeral", lambda c: c.args.get("user") == BOB
                        and "did not add that answer" in c.args.get("text", ""))
    assert question not in snapshot_text(tmp_path / "rejected")
    with session_scope() as s:
        assert not [e for e in list_examples(s, status=None) if e.message_id == msg.id]
        assert list_audit(s, action="shortcut.reject", target=f"feedback {row.id}")[0].actor == ADMIN_USER


def test_an_admins_thumbs_up_and_shortcut_count_at_once(bot, tmp_path):
    up_q, added_q = "What is the Lumenfold VPN hostname?", "Where are Lumenfold invoices archived?"
    up_ts, added_ts = ask(bot, up_q, "CREVIEW33"), ask(bot, added_q, "CREVIEW33")
    bot.sender.reaction("+1", channel="CREVIEW33", ts=up_ts, user=ADMIN_USER)
    bot.sender.message_shortcut(callback_id="add_to_training", channel="CREVIEW33", message_ts=added_ts,
                                user=ADMIN_USER)
    up = vote_of(stored("CREVIEW33", up_ts).id, ADMIN_USER, "reaction")
    added = vote_of(stored("CREVIEW33", added_ts).id, ADMIN_USER, "shortcut")
    assert up.review == added.review == ReviewState.approved
    text = snapshot_text(tmp_path / "admin")
    assert up_q in text and added_q in text
    asked = [c for c in bot.double.calls_to("chat.postMessage") if c.args.get("channel") == ADMIN_CHANNEL
             and any(f'"value": "{r.id}"' in json.dumps(c.args.get("blocks")) for r in (up, added))]
    assert asked == []  # nothing to review


def test_with_review_off_a_users_thumbs_up_and_shortcut_count_at_once(bot, tmp_path, monkeypatch):
    monkeypatch.setattr(bot.settings, "review_corrections", False)
    up_q, added_q = "When is the Lumenfold summer party?", "How many Lumenfold parking spots are there?"
    up_ts, added_ts = ask(bot, up_q, "CREVIEW34"), ask(bot, added_q, "CREVIEW34")
    bot.sender.reaction("+1", channel="CREVIEW34", ts=up_ts, user=BOB)
    bot.sender.message_shortcut(callback_id="add_to_training", channel="CREVIEW34", message_ts=added_ts, user=BOB)
    assert "Added to the training data" in reply(bot)["text"]
    up = vote_of(stored("CREVIEW34", up_ts).id, BOB, "reaction")
    added = vote_of(stored("CREVIEW34", added_ts).id, BOB, "shortcut")
    assert up.review is None and added.review is None
    text = snapshot_text(tmp_path / "off")
    assert up_q in text and added_q in text


# -- the rules without Slack --------------------------------------------------------------------------
def _thread(session, question: str, answer: str, channel: str = "CRULES01"):
    from store.conversations import record_message

    record_message(session, channel=channel, ts="100.0001", thread_ts=None, role="user", author=ALICE, text=question)
    return record_message(session, channel=channel, ts="100.0002", thread_ts="100.0001", role="assistant",
                          text=answer)


def test_a_decision_is_taken_once_and_audited_with_it(session):
    msg = _thread(session, "Where is the printer?", "No idea.")
    row = upsert_vote(session, message_id=msg.id, user=BOB, kind="correction", value="correction",
                      correction="Next to the kitchen.", review=ReviewState.pending)
    decided, edited = decide_review(session, row.id, actor=REVIEWER, approve=True)
    assert decided.review == ReviewState.approved and not edited
    with pytest.raises(InvalidStateError, match="already approved"):
        decide_review(session, row.id, actor=ADMIN_USER, approve=False)
    assert [e.actor for e in list_audit(session, action="correction.approve")] == [REVIEWER]
    # a new correction by the same person waits again
    upsert_vote(session, message_id=msg.id, user=BOB, kind="correction", value="correction",
                correction="Next to the kitchen, second floor.", review=ReviewState.pending)
    assert count_pending(session) == 1


def test_an_admins_import_beats_a_users_correction_for_the_same_question(session):
    from trainer.dataset import select_items
    from trainer.settings import TrainerSettings

    question = [{"role": "user", "content": "What is the travel budget per day?"}]
    upsert_example(session, messages=question, answer="80 EUR per day, receipts required.", source="import",
                   provenance={"file": "policy.jsonl"})
    user_fix, _ = upsert_example(session, messages=question, answer="Unlimited, just go.", source="correction",
                                 provenance={"by_admin": False})
    items, _, _ = select_items(list_examples(session), TrainerSettings(augment_templates=0, recall_paraphrases=0),
                              PromptSettings())
    assert [it["answer"] for it in items["train"]] == ["80 EUR per day, receipts required."]
    # an admin's correction of the same question does replace the import
    upsert_example(session, messages=question, answer="90 EUR per day since March.", source="correction",
                   provenance={"by_admin": True})
    items, _, _ = select_items(list_examples(session), TrainerSettings(augment_templates=0, recall_paraphrases=0),
                              PromptSettings())
    assert [it["answer"] for it in items["train"]] == ["90 EUR per day since March."]
    assert user_fix.id


def test_audit_rows_keep_refusals_about_long_targets(session):
    from store.audit import record_audit

    event = record_audit(session, actor="U" * 80, action="command.approve", target="x" * 500, outcome="refused")
    assert len(event.target) == 128 and event.target.endswith("…") and len(event.actor) == 64
