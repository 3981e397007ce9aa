"""Correction memory rows: write one (keyed, so a newer correction of the same answer replaces
the older), read what changed since a moment (readers keep an index in memory and refresh it)."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from store.models import MemoryItem, utcnow


def upsert_memory_item(session: Session, *, key: str, question: str, answer: str, source: str,
                       author: str | None, channel: str | None, visible_in: str | None,
                       vector: bytes) -> MemoryItem:
    """Insert or replace the item under `key` (and switch it back on)."""
    for _attempt in range(2):
        row = session.exec(select(MemoryItem).where(MemoryItem.key == key)).first()
        if row is None:
            row = MemoryItem(key=key, question=question, answer=answer, source=source, author=author,
                             channel=channel, visible_in=visible_in, vector=vector)
        else:
            row.question, row.answer, row.source, row.author = question, answer, source, author
            row.channel, row.visible_in, row.vector, row.active = channel, visible_in, vector, True
            row.updated_at = utcnow()
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # a concurrent writer inserted the same key first: update theirs
            session.rollback()
            continue
        session.refresh(row)
        return row
    raise RuntimeError(f"could not write memory item {key}")


def deactivate_memory_item(session: Session, key: str) -> bool:
    row = session.exec(select(MemoryItem).where(MemoryItem.key == key)).first()
    if row is None or not row.active:
        return False
    row.active, row.updated_at = False, utcnow()
    session.add(row)
    session.commit()
    return True


def memory_changed_since(session: Session, since: datetime | None) -> list[MemoryItem]:
    """Items (active or not) updated after `since`, oldest first; all of them when None."""
    stmt = select(MemoryItem).order_by(col(MemoryItem.updated_at), col(MemoryItem.id))
    if since is not None:
        stmt = stmt.where(MemoryItem.updated_at >= since)
    return list(session.exec(stmt).all())


def memory_item(session: Session, key: str) -> MemoryItem | None:
    return session.exec(select(MemoryItem).where(MemoryItem.key == key, col(MemoryItem.active))).first()


def count_memory(session: Session) -> int:
    return session.exec(select(func.count()).select_from(MemoryItem).where(col(MemoryItem.active))).one()
