"""One read of what the bot shows as status: production version, last runs, data counts."""
from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session

from store.conversations import count_messages
from store.examples import count_examples
from store.feedback import count_feedback
from store.models import Role, TrainingRun
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
