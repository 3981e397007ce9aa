"""How each live version fared with real users: per version, the answers it gave while it was
production and how people reacted to them (👍, 👎, corrections). Read by the bot's version watch."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case
from sqlmodel import Session, col, func, select

from store.models import Feedback, FeedbackKind, Message, Role
from store.versions import CANDIDATE, PRODUCTION, alias_history, alias_target, version_label as _label

VOTES = (FeedbackKind.reaction, FeedbackKind.button)


@dataclass(frozen=True)
class Outcomes:
    """One version's answers in a window; `bad` = answers with a 👎 or a correction."""

    version: str  # a version name, or "base" for the base model (as answers record it)
    answers: int
    up: int
    down: int
    corrected: int
    bad: int


@dataclass(frozen=True)
class LiveWindow:
    """The version under watch and since when, against the one it is compared with, in
    [previous_since, previous_until) (None: open)."""

    current: str
    since: datetime
    previous: str
    previous_since: datetime | None
    previous_until: datetime | None
    canary: bool = False


def live_window(session: Session) -> LiveWindow | None:
    """During a canary: the canary against production, both since the canary started (the same
    days' traffic). Otherwise the production version against the one before it; None until
    production has moved at least once."""
    canary = alias_target(session, CANDIDATE)
    if canary is not None:
        started = alias_history(session, CANDIDATE, limit=1)[0]["at"]
        return LiveWindow(canary, started, _label(alias_target(session, PRODUCTION)), started, None, canary=True)
    history = alias_history(session, PRODUCTION, limit=200)
    if not history:
        return None
    last = history[0]
    previous_since = next((m["at"] for m in history[1:] if m["to"] == last["from"]), None)
    return LiveWindow(_label(last["to"]), last["at"], _label(last["from"]), previous_since, last["at"])


def version_outcomes(session: Session, version: str, since: datetime | None, until: datetime | None) -> Outcomes:
    """Answers `version` gave (errors and the memory's own answers excluded) in [since, until)."""
    live = (Feedback.retracted == False)  # noqa: E712
    up = func.max(case((live & col(Feedback.kind).in_(VOTES) & (Feedback.value == "up"), 1), else_=0))
    down = func.max(case((live & col(Feedback.kind).in_(VOTES) & (Feedback.value == "down"), 1), else_=0))
    corrected = func.max(case((live & (Feedback.kind == FeedbackKind.correction)
                               & (func.coalesce(Feedback.review, "") != "rejected"), 1), else_=0))
    per_answer = (select(Message.id, up.label("up"), down.label("down"), corrected.label("corrected"))
                  .join(Feedback, Feedback.message_id == Message.id, isouter=True)
                  .where(Message.role == Role.assistant, Message.model_version == version,
                         col(Message.error).is_(None)))
    if since is not None:
        per_answer = per_answer.where(Message.created_at >= since)
    if until is not None:
        per_answer = per_answer.where(Message.created_at < until)
    sub = per_answer.group_by(Message.id).subquery()
    bad = case(((sub.c.down + sub.c.corrected) > 0, 1), else_=0)
    row = session.exec(select(func.count(), func.coalesce(func.sum(sub.c.up), 0), func.coalesce(func.sum(sub.c.down), 0),
                              func.coalesce(func.sum(sub.c.corrected), 0), func.coalesce(func.sum(bad), 0))
                       .select_from(sub)).one()
    return Outcomes(version, *(int(x) for x in row))
