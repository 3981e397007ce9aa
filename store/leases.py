"""Named leases with expiry: at most one holder at a time, across processes and machines.
Both operations are single conditional statements, so the database decides every race."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from store.models import Lease, utcnow


def acquire_lease(session: Session, name: str, owner: str, ttl_s: float) -> bool:
    """Take the lease if it is free, expired, or already ours. True when we hold it."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    taken = session.execute(
        update(Lease)
        .where(Lease.name == name, or_(Lease.owner == owner, Lease.expires_at < now))
        .values(owner=owner, acquired_at=now, heartbeat_at=now, expires_at=expires)
    )
    session.commit()
    if taken.rowcount == 1:
        return True
    session.add(Lease(name=name, owner=owner, acquired_at=now, heartbeat_at=now, expires_at=expires))
    try:
        session.commit()
    except IntegrityError:  # the row exists and someone else holds it
        session.rollback()
        return False
    return True


def renew_lease(session: Session, name: str, owner: str, ttl_s: float) -> bool:
    """Extend our lease; False means we lost it (it expired and was taken) and must stop."""
    now = utcnow()
    res = session.execute(
        update(Lease)
        .where(Lease.name == name, Lease.owner == owner)
        .values(heartbeat_at=now, expires_at=now + timedelta(seconds=ttl_s))
    )
    session.commit()
    return res.rowcount == 1


def release_lease(session: Session, name: str, owner: str) -> bool:
    """Give the lease back at once (expire it) if we hold it."""
    res = session.execute(
        update(Lease).where(Lease.name == name, Lease.owner == owner).values(expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()
    return res.rowcount == 1


def lease_holder(session: Session, name: str) -> Lease | None:
    """The current holder, or None when the lease is free or expired."""
    session.expire_all()
    row = session.get(Lease, name)
    if row is None or row.expires_at < utcnow():
        return None
    return row
