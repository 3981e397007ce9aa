"""The correction review queue: which corrections wait, and a reviewer's decision. A decision
and its audit event commit together, and the row is locked so two reviewers cannot both decide."""
from __future__ import annotations

from sqlalchemy import or_
from sqlmodel import Session, col, func, select

from store.audit import add_audit
from store.errors import InvalidStateError, NotFoundError
from store.models import Feedback, FeedbackKind, Message, ReviewState, utcnow


def _pending():
    return (select(Feedback, Message).join(Message, Message.id == Feedback.message_id)
            .where(Feedback.kind == FeedbackKind.correction, Feedback.review == ReviewState.pending,
                   Feedback.retracted == False))  # noqa: E712


def pending_corrections(session: Session, limit: int = 20) -> list[tuple[Feedback, Message]]:
    """Oldest first: the queue in the order people wrote their corrections."""
    return list(session.exec(_pending().order_by(col(Feedback.updated_at), col(Feedback.id)).limit(limit)).all())


def count_pending(session: Session) -> int:
    stmt = select(func.count()).select_from(Feedback).where(
        Feedback.kind == FeedbackKind.correction, Feedback.review == ReviewState.pending,
        Feedback.retracted == False)  # noqa: E712
    return session.exec(stmt).one()


def get_correction(session: Session, feedback_id: int) -> tuple[Feedback, Message] | None:
    stmt = (select(Feedback, Message).join(Message, Message.id == Feedback.message_id)
            .where(Feedback.id == feedback_id, Feedback.kind == FeedbackKind.correction))
    return session.exec(stmt).first()


def decide_correction(session: Session, feedback_id: int, *, actor: str, approve: bool,
                      text: str | None = None) -> tuple[Feedback, bool]:
    """Approve (optionally with the reviewer's edited text) or reject a pending correction;
    returns the row and whether the reviewer changed its text."""
    row = session.exec(select(Feedback).where(Feedback.id == feedback_id, Feedback.kind == FeedbackKind.correction)
                       .with_for_update()).first()
    if row is None or row.retracted:
        raise NotFoundError(f"correction {feedback_id} not found")
    if row.review != ReviewState.pending:
        by = f" by <@{row.reviewed_by}>" if row.reviewed_by else ""
        raise InvalidStateError(f"this correction is already {row.review or 'counted'}{by}")
    if text is not None and not text.strip():
        raise InvalidStateError("the edited answer is empty")
    edited = approve and text is not None and text.strip() != (row.correction or "").strip()
    if edited:
        row.history = [*row.history, {"value": row.value, "correction": row.correction, "review": row.review,
                                      "retracted": row.retracted, "at": row.updated_at.isoformat()}]
        row.correction = text.strip()
    now = utcnow()
    row.review = ReviewState.approved if approve else ReviewState.rejected
    row.reviewed_by, row.reviewed_at, row.updated_at = actor, now, now
    session.add(row)
    add_audit(session, actor=actor, action=f"correction.{'approve' if approve else 'reject'}",
              target=f"feedback {row.id}",
              detail={"author": row.user, "message_id": row.message_id, "edited": edited})
    session.commit()
    session.refresh(row)
    return row, edited


def reopen_corrections(session: Session, message_ids: list[int], *, actor: str, reason: str) -> list[Feedback]:
    """Send the counted corrections of these answers back to review (their question changed, say):
    pending again, the earlier decision kept in the history, one audit event each."""
    if not message_ids:
        return []
    stmt = select(Feedback).where(col(Feedback.message_id).in_(message_ids), Feedback.kind == FeedbackKind.correction,
                                  Feedback.retracted == False,  # noqa: E712
                                  or_(col(Feedback.review).is_(None), Feedback.review == ReviewState.approved))
    rows = list(session.exec(stmt.with_for_update()).all())
    now = utcnow()
    for row in rows:
        row.history = [*row.history, {"value": row.value, "correction": row.correction, "review": row.review,
                                      "retracted": row.retracted, "at": row.updated_at.isoformat()}]
        row.review, row.reviewed_by, row.reviewed_at, row.updated_at = ReviewState.pending, None, None, now
        session.add(row)
        add_audit(session, actor=actor, action="correction.reopen", target=f"feedback {row.id}",
                  detail={"author": row.user, "message_id": row.message_id, "reason": reason})
    session.commit()
    for row in rows:
        session.refresh(row)
    return rows
