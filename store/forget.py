"""Forgetting: what a person unsaid (a Slack message deleted or edited), what an admin asked to
forget (`/flywheel forget @user`) and what nobody taught from once the retention period is over
leaves the store with everything derived from it: the bot's answers to a deleted question, the
votes and corrections on them, the examples derived from them or quoting them (and their
paraphrases), their memory items. Audit events and event receipts keep ids only.

Derived examples are dropped, not rewritten: the next snapshot derives them again from the
feedback that remains (trainer/targets.py), so nobody else's teaching is lost and nothing quoting
the forgotten text comes back. Memory items become tombstones (no text, no vector, inactive)
rather than vanishing, because the bots' in-process indexes learn of a removal from a changed row.

What is already trained cannot be taken back here: the audit event names the dataset snapshots
(and so the exports written from them) and the model versions that may hold the forgotten data,
and a retrain is suggested. A snapshot's rows are files on the trainer's disk, not in the store,
so "may hold" is decided by time: an example the whole workspace could see (visible_in NULL) is
in every snapshot built after it was derived."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlmodel import Session, col, func, select

from store.audit import add_audit
from store.conversations import answers_to, get_message
from store.errors import NotFoundError
from store.memory import erase_memory_items, memory_items_by_key
from store.models import (
    Conversation,
    DatasetSnapshot,
    Example,
    ExampleStatus,
    Feedback,
    MemoryItem,
    Message,
    ModelVersion,
    Role,
)


@dataclass
class Forgotten:
    """What one forgetting removed, and what already trained on it."""

    messages: int = 0  # people's messages
    answers: int = 0  # the bot's answers
    feedback: int = 0
    examples: int = 0
    memory_items: int = 0
    conversations: int = 0
    snapshots: list[int] = field(default_factory=list)  # dataset snapshots that may hold it
    versions: list[str] = field(default_factory=list)  # model versions trained on those

    @property
    def anything(self) -> bool:
        return bool(self.messages or self.answers or self.feedback or self.examples or self.memory_items
                    or self.conversations)

    def detail(self) -> dict:
        """The audit event's detail: counts and ids only."""
        detail = asdict(self)
        if self.versions:
            detail["retrain"] = "suggested: these versions were trained on forgotten data"
        return detail


# -- the one way things are erased -----------------------------------------------------------------
def _erase(session: Session, messages: list[Message], gone: Forgotten) -> None:
    """Delete `messages` with their feedback, the examples derived from or quoting them and their
    memory items; staged in the caller's transaction."""
    if not messages:
        return
    ids = [m.id for m in messages]
    examples = derived_examples(session, messages)
    _drop_examples(session, examples, gone)
    votes = list(session.exec(select(Feedback).where(col(Feedback.message_id).in_(ids))).all())
    for vote in votes:
        session.delete(vote)
    gone.feedback += len(votes)
    gone.memory_items += erase_memory_items(session, memory_items_by_key(session, [f"message:{i}" for i in ids]))
    session.flush()  # feedback and examples point at the messages
    for msg in messages:
        gone.messages += msg.role != Role.assistant
        gone.answers += msg.role == Role.assistant
        session.delete(msg)
    session.flush()
    gone.conversations += _drop_empty_conversations(session, {m.conversation_id for m in messages})


def derived_examples(session: Session, messages: list[Message]) -> list[Example]:
    """Examples derived from `messages` or quoting one of them in their context (a later answer
    in the same thread), and the paraphrases made of those."""
    ids = {m.id for m in messages}
    texts: dict[int, set[str]] = defaultdict(set)
    for m in messages:
        texts[m.conversation_id].add(m.text)
    stmt = (select(Example, Message.conversation_id).join(Message, Message.id == Example.message_id)
            .where(col(Message.conversation_id).in_(list(texts))))
    found = {ex.id: ex for ex, conv in session.exec(stmt).all()
             if ex.message_id in ids or any(turn.get("content") in texts[conv] for turn in ex.messages)}
    return _with_paraphrases(session, found)


def _with_paraphrases(session: Session, found: dict[int, Example]) -> list[Example]:
    if found:
        for ex in session.exec(select(Example).where(Example.source == "augmented")).all():
            if ex.provenance.get("augmented_from") in found:
                found[ex.id] = ex
    return list(found.values())


def _drop_examples(session: Session, examples: list[Example], gone: Forgotten) -> None:
    """Name what may have trained on them, then delete them and their memory items."""
    _name_trained(session, examples, gone)
    gone.memory_items += erase_memory_items(session, memory_items_by_key(session, [f"example:{e.id}" for e in examples]))
    for ex in examples:
        session.delete(ex)
    gone.examples += len(examples)
    session.flush()


def _name_trained(session: Session, examples: list[Example], gone: Forgotten) -> None:
    """Snapshots built since the first of these examples the whole workspace could see was
    derived, and the versions trained on them."""
    shared = [e.created_at for e in examples if e.visible_in is None]
    if not shared:
        return
    snaps = session.exec(select(DatasetSnapshot.id).where(col(DatasetSnapshot.created_at) >= min(shared))
                         .order_by(col(DatasetSnapshot.id))).all()
    new = [s for s in snaps if s not in gone.snapshots]
    gone.snapshots.extend(new)
    if new:
        names = session.exec(select(ModelVersion.name).where(col(ModelVersion.dataset_snapshot_id).in_(new))
                             .order_by(col(ModelVersion.id))).all()
        gone.versions.extend(n for n in names if n not in gone.versions)


def _drop_empty_conversations(session: Session, conversation_ids: set[int]) -> int:
    dropped = 0
    for conv_id in conversation_ids:
        left = session.exec(select(Message.id).where(Message.conversation_id == conv_id).limit(1)).first()
        conv = session.get(Conversation, conv_id)
        if left is None and conv is not None:
            session.delete(conv)
            dropped += 1
    session.flush()
    return dropped


# -- a message deleted or edited in Slack ----------------------------------------------------------
def forget_message(session: Session, channel: str, ts: str, *, actor: str) -> Forgotten | None:
    """A message deleted in Slack: it, the bot's answers to it (they quote it, and its memory items
    hold its question) and everything derived from them; None when it was never stored."""
    msg = get_message(session, channel, ts)
    if msg is None:
        return None
    gone = Forgotten()
    _erase(session, [msg, *answers_to(session, msg)] if msg.role == Role.user else [msg], gone)
    add_audit(session, actor=actor, action="message.forget", target=f"message {channel}/{ts}",
              detail={**gone.detail(), "reason": "deleted in Slack"})
    session.commit()
    return gone


def edit_message(session: Session, channel: str, ts: str, text: str, *, actor: str) -> list[Message] | None:
    """A person's message edited in Slack: the stored text becomes the new one and the examples
    quoting the old text go (derived again with the new text at the next snapshot). Returns the
    bot's answers to it, whose memory items the caller refreshes or sends back to review; None
    when nothing changed (not stored, not a person's message, or the same text: Slack sends
    message_changed for unfurls and thread replies too)."""
    msg = get_message(session, channel, ts)
    if msg is None or msg.role != Role.user or msg.text == text:
        return None
    gone = Forgotten()
    _drop_examples(session, derived_examples(session, [msg]), gone)
    msg.text = text
    session.add(msg)
    answers = answers_to(session, msg)
    add_audit(session, actor=actor, action="message.edit", target=f"message {channel}/{ts}",
              detail={**gone.detail(), "answers": [a.id for a in answers], "reason": "edited in Slack"})
    session.commit()
    for answer in answers:
        session.refresh(answer)
    return answers


# -- an admin's `/flywheel forget @user` -------------------------------------------------------------
def forget_user(session: Session, user: str, *, actor: str) -> Forgotten:
    """Everything `user` said (and the bot's answers to it), every vote, label and correction they
    gave, and the memory items they taught; audited with the counts. NotFoundError when nothing
    of theirs is stored."""
    said = list(session.exec(select(Message).where(Message.author == user, Message.role == Role.user)).all())
    votes = list(session.exec(select(Feedback).where(Feedback.user == user)).all())
    items = list(session.exec(select(MemoryItem).where(MemoryItem.author == user, MemoryItem.answer != "")).all())
    if not (said or votes or items):
        raise NotFoundError(f"nothing of <@{user}> is stored: no messages, feedback or memory items")
    gone = Forgotten()
    erased = {m.id: m for m in said}
    for msg in said:
        erased.update((a.id, a) for a in answers_to(session, msg))
    _forget_votes(session, [v for v in votes if v.message_id not in erased], gone)
    _erase(session, list(erased.values()), gone)
    gone.memory_items += erase_memory_items(session, items)  # those not erased with their message
    add_audit(session, actor=actor, action="user.forget", target=user, detail=gone.detail())
    session.commit()
    return gone


def _forget_votes(session: Session, votes: list[Feedback], gone: Forgotten) -> None:
    """A person's feedback on messages that stay: the votes go, and so do the examples derived
    from those messages (and from the answer after a message marked "Add to training data"),
    derived again from everyone else's feedback at the next snapshot."""
    voted_on = [session.get(Message, v.message_id) for v in votes]
    targets = {m.id for m in voted_on if m is not None}
    for msg in voted_on:
        if msg is not None and msg.role == Role.user:
            targets.update(a.id for a in answers_to(session, msg))
    found = {e.id: e for e in session.exec(select(Example).where(col(Example.message_id).in_(targets))).all()}
    _drop_examples(session, _with_paraphrases(session, found), gone)
    for vote in votes:
        session.delete(vote)
    gone.feedback += len(votes)
    session.flush()


# -- FLYWHEEL_RETENTION_DAYS -----------------------------------------------------------------------
def purge_untaught(session: Session, *, before: datetime, limit: int = 200) -> Forgotten:
    """Conversations whose last message is older than `before` and that nobody taught from (no
    live vote, label or correction on any of their messages, no active example derived from
    them): deleted with their messages, up to `limit` conversations a call; audited when any."""
    taught = (select(Message.conversation_id).join(Feedback, Feedback.message_id == Message.id)
              .where(Feedback.retracted == False)  # noqa: E712
              .union(select(Message.conversation_id).join(Example, Example.message_id == Message.id)
                     .where(Example.status == ExampleStatus.active)))
    old = (select(Message.conversation_id).where(col(Message.conversation_id).not_in(taught))
           .group_by(Message.conversation_id).having(func.max(Message.created_at) < before)
           .order_by(Message.conversation_id).limit(limit))
    conv_ids = list(session.exec(old).all())
    gone = Forgotten()
    if not conv_ids:
        return gone
    messages = list(session.exec(select(Message).where(col(Message.conversation_id).in_(conv_ids))).all())
    _erase(session, messages, gone)
    add_audit(session, actor="retention", action="retention.purge", target=f"{len(conv_ids)} conversations",
              detail={**gone.detail(), "before": before.isoformat()})
    session.commit()
    return gone
