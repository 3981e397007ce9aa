"""Dataset snapshots: what the trainer built, from which inputs and with which parameters."""
from __future__ import annotations

from sqlmodel import Session, col, select

from store.models import DatasetSnapshot


def record_snapshot(session: Session, *, content_hash: str, counts: dict, params: dict, path: str) -> DatasetSnapshot:
    snap = DatasetSnapshot(content_hash=content_hash, counts=counts, params=params, path=path)
    session.add(snap)
    session.commit()
    session.refresh(snap)
    return snap


def get_snapshot(session: Session, snapshot_id: int) -> DatasetSnapshot | None:
    return session.get(DatasetSnapshot, snapshot_id)


def latest_snapshot(session: Session) -> DatasetSnapshot | None:
    return session.exec(select(DatasetSnapshot).order_by(col(DatasetSnapshot.id).desc()).limit(1)).first()


def snapshot_by_hash(session: Session, content_hash: str) -> DatasetSnapshot | None:
    """The newest snapshot with this content hash (a rebuild of the same inputs reuses it)."""
    stmt = (
        select(DatasetSnapshot)
        .where(DatasetSnapshot.content_hash == content_hash)
        .order_by(col(DatasetSnapshot.id).desc())
        .limit(1)
    )
    return session.exec(stmt).first()
