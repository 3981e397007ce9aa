"""The review queue: what waits for a reviewer before it teaches, and a reviewer's decision.
Three things wait while review is on (FLYWHEEL_REVIEW_CORRECTIONS) when they come from someone who
is neither an admin nor a reviewer: a correction (its text is the item), a 👍 (reaction or
button: "this answer, as written, is right"; every waiting 👍 on one answer is one item, decided
together) and "Add to training data" (the question and this answer as a pair; every waiting one
on an answer decided together). A decision and its audit event commit together, and the rows are
locked so two reviewers cannot both decide."""
from __future__ import annotations

from sqlalchemy import or_
from sqlmodel import Session, col, select

from store.audit import add_audit
from store.errors import InvalidStateError, NotFoundError
from store.models import Feedback, FeedbackKind, Message, ReviewState, utcnow

VOTE_KINDS = (FeedbackKind.reaction, FeedbackKind.button)
REVIEWED_KINDS = (FeedbackKind.correction, FeedbackKind.shortcut, *VOTE_KINDS)


def held_back(row: Feedback) -> bool:
    """Waiting for a reviewer or rejected by one: it teaches nothing (None: reviews were off)."""
    return row.review in (ReviewState.pending, ReviewState.rejected)


def subject(row: Feedback) -> str:
    """What a review item is, for audit actions and messages: correction, vote or shortcut."""
    return "vote" if row.kind in VOTE_KINDS else row.kind


def _group(row: Feedback) -> tuple:
    """Rows decided as one item: each correction alone; a message's 👍s together; its shortcuts together."""
    return (row.message_id, subject(row)) if row.kind != FeedbackKind.correction else (row.id,)


def _pending():
    return (select(Feedback, Message).join(Message, Message.id == Feedback.message_id)
            .where(col(Feedback.kind).in_(REVIEWED_KINDS), Feedback.review == ReviewState.pending,
                   Feedback.retracted == False)  # noqa: E712
            .order_by(col(Feedback.updated_at), col(Feedback.id)))


def _one_per_item(rows: list[tuple[Feedback, Message]]) -> list[tuple[Feedback, Message]]:
    seen: set[tuple] = set()
    out = []
    for row, msg in rows:
        if _group(row) not in seen:
            seen.add(_group(row))
            out.append((row, msg))
    return out


def pending_reviews(session: Session, limit: int = 20) -> list[tuple[Feedback, Message]]:
    """Oldest first, one row per item: the queue in the order people taught."""
    return _one_per_item(list(session.exec(_pending()).all()))[:limit]


def count_pending(session: Session) -> int:
    return len(_one_per_item(list(session.exec(_pending()).all())))


def waits_already(session: Session, row: Feedback) -> bool:
    """Another row of the same item already waits (a second 👍 on an answer in the queue)."""
    return any(_group(other) == _group(row) and other.id != row.id for other, _ in session.exec(_pending()).all())


def get_reviewable(session: Session, feedback_id: int) -> tuple[Feedback, Message] | None:
    stmt = (select(Feedback, Message).join(Message, Message.id == Feedback.message_id)
            .where(Feedback.id == feedback_id, col(Feedback.kind).in_(REVIEWED_KINDS)))
    return session.exec(stmt).first()


def _keep_history(row: Feedback) -> None:
    row.history = [*row.history, {"value": row.value, "correction": row.correction, "review": row.review,
                                  "retracted": row.retracted, "at": row.updated_at.isoformat()}]


def _locked_item(session: Session, feedback_id: int) -> list[Feedback]:
    """The pending rows of the item `feedback_id` belongs to, locked, that row first."""
    row = session.exec(select(Feedback).where(Feedback.id == feedback_id, col(Feedback.kind).in_(REVIEWED_KINDS))
                       .with_for_update()).first()
    if row is None or row.retracted:
        raise NotFoundError(f"review item {feedback_id} not found")
    if row.review != ReviewState.pending:
        by = f" by <@{row.reviewed_by}>" if row.reviewed_by else ""
        raise InvalidStateError(f"this {subject(row)} is already {row.review or 'counted'}{by}")
    if row.kind == FeedbackKind.correction:
        return [row]
    kinds = VOTE_KINDS if row.kind in VOTE_KINDS else (row.kind,)
    others = session.exec(select(Feedback).where(
        Feedback.message_id == row.message_id, col(Feedback.kind).in_(kinds), Feedback.id != row.id,
        Feedback.review == ReviewState.pending, Feedback.retracted == False).with_for_update()).all()  # noqa: E712
    return [row, *others]


def _reviewers_correction(session: Session, message_id: int, actor: str, text: str) -> Feedback:
    """A reviewer's edit of a 👍'd or added answer: the reviewer's own correction, approved."""
    row = session.exec(select(Feedback).where(Feedback.message_id == message_id, Feedback.user == actor,
                                              Feedback.kind == FeedbackKind.correction)).first()
    if row is None:
        row = Feedback(message_id=message_id, user=actor, kind=FeedbackKind.correction, value="correction")
    else:
        _keep_history(row)
    row.correction, row.retracted = text, False
    row.review, row.reviewed_by, row.reviewed_at, row.updated_at = ReviewState.approved, actor, utcnow(), utcnow()
    session.add(row)
    return row


def decide_review(session: Session, feedback_id: int, *, actor: str, approve: bool,
                  text: str | None = None) -> tuple[Feedback, str | None]:
    """Approve (optionally with the reviewer's edited text) or reject a pending item; returns its
    first row and the text the reviewer wrote when it differs from what was to be taught (an edit
    of a 👍 or an added answer is stored as the reviewer's own approved correction)."""
    rows = _locked_item(session, feedback_id)
    row = rows[0]
    if text is not None and not text.strip():
        raise InvalidStateError("the edited answer is empty")
    as_written = row.correction if row.kind == FeedbackKind.correction else session.get(Message, row.message_id).text
    edited = text.strip() if approve and text is not None and text.strip() != (as_written or "").strip() else None
    if edited and row.kind == FeedbackKind.correction:
        _keep_history(row)
        row.correction = edited
    elif edited:
        _reviewers_correction(session, row.message_id, actor, edited)
    now = utcnow()
    for each in rows:
        each.review = ReviewState.approved if approve else ReviewState.rejected
        each.reviewed_by, each.reviewed_at, each.updated_at = actor, now, now
        session.add(each)
    add_audit(session, actor=actor, action=f"{subject(row)}.{'approve' if approve else 'reject'}",
              target=f"feedback {row.id}", detail={"author": row.user, "message_id": row.message_id,
                                                   "edited": bool(edited), "rows": [r.id for r in rows]})
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
        _keep_history(row)
        row.review, row.reviewed_by, row.reviewed_at, row.updated_at = ReviewState.pending, None, None, now
        session.add(row)
        add_audit(session, actor=actor, action="correction.reopen", target=f"feedback {row.id}",
                  detail={"author": row.user, "message_id": row.message_id, "reason": reason})
    session.commit()
    for row in rows:
        session.refresh(row)
    return rows
