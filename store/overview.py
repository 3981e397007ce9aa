"""One read of what the bot shows as status: production version, last runs, data counts."""
from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session, func, select

from store.conversations import count_messages
from store.examples import count_examples
from store.feedback import count_feedback
from store.models import Feedback, Message, Role, TrainingRun
from store.runs import list_runs
from store.versions import PRODUCTION, alias_target


@dataclass
class Overview:
    production: str | None  # None: the base model
    runs: list[TrainingRun]
    questions: int
    answers: int
    feedback: dict[str, int]
    examples: dict[str, int]


def overview(session: Session, runs: int = 5) -> Overview:
    production = alias_target(session, PRODUCTION)  # first: it expires the session's objects
    return Overview(
        production=production, runs=list_runs(session, limit=runs),
        questions=count_messages(session, Role.user), answers=count_messages(session, Role.assistant),
        feedback=count_feedback(session), examples=count_examples(session),
    )


@dataclass
class Personal:
    """One person's own figures: what App Home shows someone who is not an admin or reviewer."""

    questions: int
    feedback: dict[str, int]  # live votes per "kind:value", as in Overview


def personal_overview(session: Session, user: str) -> Personal:
    questions = session.exec(select(func.count()).select_from(Message).where(
        Message.role == str(Role.user), Message.author == user)).one()
    votes = session.exec(select(Feedback.kind, Feedback.value, func.count()).where(
        Feedback.user == user, Feedback.retracted == False,  # noqa: E712
    ).group_by(Feedback.kind, Feedback.value)).all()
    return Personal(questions=questions, feedback={f"{k}:{v}": n for k, v, n in votes})
