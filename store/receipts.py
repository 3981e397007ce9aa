"""Slack event receipts: each event id is handled exactly once, even under concurrent retries."""
from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from store.models import SlackEventReceipt


def record_event_once(session: Session, event_id: str, kind: str = "event") -> bool:
    """True for the first delivery of `event_id`, False for every later one (the insert decides)."""
    session.add(SlackEventReceipt(event_id=event_id, kind=kind))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return False
    return True
