"""Conversations and messages: the dialogue the bot takes part in."""
from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from store.models import Conversation, Message, Role


def get_or_create_conversation(session: Session, channel: str, thread_ts: str) -> Conversation:
    """The conversation for a Slack thread; safe when two deliveries race to create it."""
    stmt = select(Conversation).where(Conversation.channel == channel, Conversation.thread_ts == thread_ts)
    found = session.exec(stmt).first()
    if found:
        return found
    conv = Conversation(channel=channel, thread_ts=thread_ts)
    session.add(conv)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return session.exec(stmt).one()
    session.refresh(conv)
    return conv


def record_message(
    session: Session,
    *,
    channel: str,
    ts: str,
    thread_ts: str | None,
    role: Role | str,
    text: str,
    author: str | None = None,
    model_version: str | None = None,
    latency_ms: float | None = None,
    error: str | None = None,
    cited: list[str] | None = None,
) -> Message:
    """Store a message once: a second call with the same (channel, ts) returns the first row.
    `cited`: a bot answer's memory item keys (Message.cited)."""
    existing = get_message(session, channel, ts)
    if existing:
        return existing
    conv = get_or_create_conversation(session, channel, thread_ts or ts)
    msg = Message(
        conversation_id=conv.id, channel=channel, ts=ts, role=str(role), text=text, author=author,
        model_version=model_version, latency_ms=latency_ms, error=error, cited=cited,
    )
    session.add(msg)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return get_message(session, channel, ts)
    session.refresh(msg)
    return msg


def get_message(session: Session, channel: str, ts: str) -> Message | None:
    return session.exec(select(Message).where(Message.channel == channel, Message.ts == ts)).first()


def get_message_by_id(session: Session, message_id: int) -> Message | None:
    return session.get(Message, message_id)


def thread_messages(session: Session, channel: str, thread_ts: str, limit: int = 50,
                    until_ts: str | None = None) -> list[Message]:
    """The last `limit` messages of a thread, oldest first (the dialogue context); `until_ts`:
    only those up to that message (an answer's context ends at its question, whatever was asked
    in the thread since)."""
    stmt = (
        select(Message)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Conversation.channel == channel, Conversation.thread_ts == thread_ts)
        .order_by(col(Message.ts).desc(), col(Message.id).desc())
        .limit(limit)
    )
    if until_ts is not None:
        stmt = stmt.where(col(Message.ts) <= until_ts)
    return list(reversed(session.exec(stmt).all()))


def previous_user_message(session: Session, answer: Message) -> Message | None:
    """The question a bot answer replied to: the latest user message before it in its thread."""
    stmt = (
        select(Message)
        .where(
            Message.conversation_id == answer.conversation_id,
            Message.role == Role.user,
            col(Message.ts) < answer.ts,
        )
        .order_by(col(Message.ts).desc())
        .limit(1)
    )
    return session.exec(stmt).first()


def count_messages(session: Session, role: Role | str | None = None) -> int:
    stmt = select(func.count()).select_from(Message)
    if role is not None:
        stmt = stmt.where(Message.role == str(role))
    return session.exec(stmt).one()


def conversation_messages(session: Session, conversation_id: int, limit: int = 500) -> list[Message]:
    """Every message of one conversation, oldest first (context before / reply after a message)."""
    stmt = (
        select(Message)
        .where(Message.conversation_id == conversation_id)
        .order_by(col(Message.ts), col(Message.id))
        .limit(limit)
    )
    return list(session.exec(stmt).all())


def recent_questions(session: Session, limit: int = 2000) -> list[tuple[str, str]]:
    """(text, channel) of the newest questions people asked outside DMs, newest first: the raw
    material for suggested prompts (the caller keeps only public channels)."""
    stmt = (select(Message.text, Message.channel).where(Message.role == Role.user)
            .where(~col(Message.channel).startswith("D")).order_by(col(Message.id).desc()).limit(limit))
    return [(text, channel) for text, channel in session.exec(stmt).all()]


def answers_to(session: Session, question: Message, limit: int = 20) -> list[Message]:
    """The bot's answers to a person's message: the assistant messages after it in its thread up
    to the next person's message (previous_user_message the other way round)."""
    stmt = (
        select(Message)
        .where(Message.conversation_id == question.conversation_id, col(Message.ts) > question.ts)
        .order_by(col(Message.ts), col(Message.id))
        .limit(limit)
    )
    answers = []
    for msg in session.exec(stmt).all():
        if msg.role != Role.assistant:
            break
        answers.append(msg)
    return answers
