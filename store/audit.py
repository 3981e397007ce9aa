"""The audit log: every admin action and every refusal, with who and when."""
from __future__ import annotations

import getpass
import os

from sqlmodel import Session, col, select

from store.models import AuditEvent


def cli_actor(name: str | None) -> str:
    """Who the audit log names for a command run from the CLI: `name` (its --as), else
    cli:<login>. The CLI's authority is access to the database, not a Slack user id."""
    if name:
        return name
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # a uid without a passwd entry (some containers)
        return f"cli:uid{os.getuid()}"


def add_audit(session: Session, *, actor: str, action: str, target: str, outcome: str = "ok",
              detail: dict | None = None) -> AuditEvent:
    """Stage an audit event in the caller's transaction (commit together with the change).
    Over-long actors, actions and targets are cut to their columns, so a refusal about a long
    text is still recorded (the full text, if any, belongs in `detail`)."""
    event = AuditEvent(actor=_fit(actor, 64), action=_fit(action, 64), target=_fit(target, 128),
                       outcome=_fit(outcome, 16), detail=detail or {})
    session.add(event)
    return event


def _fit(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def record_audit(session: Session, *, actor: str, action: str, target: str, outcome: str = "ok",
                 detail: dict | None = None) -> AuditEvent:
    """Write one audit event on its own (e.g. a refused command)."""
    event = add_audit(session, actor=actor, action=action, target=target, outcome=outcome, detail=detail)
    session.commit()
    session.refresh(event)
    return event


def list_audit(session: Session, *, action: str | None = None, target: str | None = None,
               limit: int = 50) -> list[AuditEvent]:
    """Newest first."""
    stmt = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(limit)
    if action is not None:
        stmt = stmt.where(AuditEvent.action == action)
    if target is not None:
        stmt = stmt.where(AuditEvent.target == target)
    return list(session.exec(stmt).all())
