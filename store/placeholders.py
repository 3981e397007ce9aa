"""Placeholders showing: one row for each answer message the bot posted ("Thinking…") and has not
yet turned into its answer or an apology. A bot killed mid-answer (SIGKILL, a lost node) leaves
its rows behind; the bot's sweep turns those messages into an apology (bot/answering.py).

They live in the event receipt table (kind `placeholder`, key `placeholder:<channel>:<ts>:<thread>`):
a key and the time it was written is all a placeholder needs, so no table or migration of its own."""
from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from sqlmodel import Session, col, delete, select

from store.models import SlackEventReceipt

KIND = "placeholder"


class Placeholder(NamedTuple):
    channel: str
    ts: str
    conversation: str  # the thread the answer belongs to in the store (a ts, or "dm")


def _key(p: Placeholder) -> str:
    return f"{KIND}:{p.channel}:{p.ts}:{p.conversation}"


def open_placeholder(session: Session, placeholder: Placeholder) -> None:
    session.add(SlackEventReceipt(event_id=_key(placeholder), kind=KIND))
    session.commit()


def close_placeholder(session: Session, placeholder: Placeholder) -> None:
    """The placeholder became an answer or an apology; closing one twice is harmless."""
    session.exec(delete(SlackEventReceipt).where(SlackEventReceipt.event_id == _key(placeholder)))
    session.commit()


def placeholders_before(session: Session, before: datetime, limit: int = 500) -> list[Placeholder]:
    """Placeholders posted before `before`, oldest first."""
    stmt = (select(SlackEventReceipt.event_id)
            .where(SlackEventReceipt.kind == KIND, col(SlackEventReceipt.received_at) < before)
            .order_by(col(SlackEventReceipt.received_at)).limit(limit))
    return [Placeholder(*key.split(":", 3)[1:]) for key in session.exec(stmt).all()]
