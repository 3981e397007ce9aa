"""Votes, labels and corrections on messages. One vote per user, message and kind: the latest wins,
and earlier values and retractions are kept in the row's history."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from store.models import Feedback, FeedbackKind, Message, Role, utcnow


def _find(session: Session, message_id: int, user: str, kind: str) -> Feedback | None:
    stmt = select(Feedback).where(
        Feedback.message_id == message_id, Feedback.user == user, Feedback.kind == kind
    )
    return session.exec(stmt).first()


def upsert_vote(
    session: Session,
    *,
    message_id: int,
    user: str,
    kind: FeedbackKind | str,
    value: str,
    correction: str | None = None,
    is_admin: bool = False,
    review: str | None = None,
) -> Feedback:
    """Record a vote; a newer vote of the same user and kind replaces the value (history kept).
    `review` (corrections): its review state; a changed correction waits for a new review."""
    kind = str(kind)
    for _attempt in range(2):
        row = _find(session, message_id, user, kind)
        now = utcnow()
        if row is None:
            row = Feedback(message_id=message_id, user=user, kind=kind, value=value,
                           correction=correction, is_admin=is_admin, review=review, created_at=now, updated_at=now)
        else:
            row.history = [*row.history, {"value": row.value, "correction": row.correction, "review": row.review,
                                          "retracted": row.retracted, "at": row.updated_at.isoformat()}]
            row.value, row.correction, row.retracted = value, correction, False
            row.is_admin = is_admin or row.is_admin
            row.review, row.reviewed_by, row.reviewed_at = review, None, None
            row.updated_at = now
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # a concurrent first vote won the insert: update that one instead
            session.rollback()
            continue
        session.refresh(row)
        return row
    raise RuntimeError("could not record vote after a concurrent insert")


def retract_vote(
    session: Session, *, message_id: int, user: str, kind: FeedbackKind | str, value: str | None = None
) -> Feedback | None:
    """Mark a vote retracted (e.g. reaction removed). With `value`, only if it is still that value."""
    row = _find(session, message_id, user, str(kind))
    if row is None or row.retracted or (value is not None and row.value != value):
        return None
    row.history = [*row.history, {"value": row.value, "retracted": False, "at": row.updated_at.isoformat()}]
    row.retracted = True
    row.updated_at = utcnow()
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


def feedback_for_message(session: Session, message_id: int, include_retracted: bool = False) -> list[Feedback]:
    stmt = select(Feedback).where(Feedback.message_id == message_id).order_by(col(Feedback.id))
    if not include_retracted:
        stmt = stmt.where(Feedback.retracted == False)  # noqa: E712
    return list(session.exec(stmt).all())


def active_feedback(session: Session) -> list[tuple[Feedback, Message]]:
    """Every live (not retracted) vote with its message, for building the dataset."""
    stmt = (
        select(Feedback, Message)
        .join(Message, Message.id == Feedback.message_id)
        .where(Feedback.retracted == False)  # noqa: E712
        .order_by(col(Feedback.id))
    )
    return list(session.exec(stmt).all())


def count_feedback(session: Session) -> dict[str, int]:
    """Live votes per kind and value, e.g. {"reaction:up": 3, "correction:correction": 1}."""
    stmt = (
        select(Feedback.kind, Feedback.value, func.count())
        .where(Feedback.retracted == False)  # noqa: E712
        .group_by(Feedback.kind, Feedback.value)
    )
    return {f"{k}:{v}": n for k, v, n in session.exec(stmt).all()}


def top_downvoted_answers(session: Session, limit: int = 5) -> list[tuple[Message, int]]:
    """Bot answers with the most live 👎 votes (reactions and buttons together)."""
    downs = func.count(Feedback.id)
    stmt = (
        select(Message, downs)
        .join(Feedback, Feedback.message_id == Message.id)
        .where(
            Message.role == Role.assistant,
            Feedback.retracted == False,  # noqa: E712
            col(Feedback.kind).in_([FeedbackKind.reaction, FeedbackKind.button]),
            Feedback.value == "down",
        )
        .group_by(Message.id)
        .order_by(downs.desc(), col(Message.id).desc())
        .limit(limit)
    )
    return [(m, n) for m, n in session.exec(stmt).all()]


def count_feedback_since(session: Session, since: datetime | None = None) -> int:
    """Live votes recorded or changed after `since` (all when None): new signal for the scheduler."""
    stmt = select(func.count()).select_from(Feedback).where(Feedback.retracted == False)  # noqa: E712
    if since is not None:
        stmt = stmt.where(col(Feedback.updated_at) > since)
    return session.exec(stmt).one()
