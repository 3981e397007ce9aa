"""Gateway replicas report what they serve, so operators see a rollout's progress."""
from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session, col, select

from store.models import GatewayReplica, utcnow


def heartbeat_replica(
    session: Session, replica_id: str, *, backend: str, served: dict, loaded: list, error: str | None = None
) -> GatewayReplica:
    row = session.get(GatewayReplica, replica_id)
    if row is None:
        row = GatewayReplica(id=replica_id, backend=backend)
    row.backend, row.served, row.loaded, row.last_error = backend, served, loaded, error
    row.heartbeat_at = utcnow()
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


def list_replicas(session: Session, alive_within_s: float | None = 30.0) -> list[GatewayReplica]:
    stmt = select(GatewayReplica).order_by(col(GatewayReplica.id))
    if alive_within_s is not None:
        stmt = stmt.where(col(GatewayReplica.heartbeat_at) >= utcnow() - timedelta(seconds=alive_within_s))
    return list(session.exec(stmt).all())


def remove_replica(session: Session, replica_id: str) -> None:
    row = session.get(GatewayReplica, replica_id)
    if row is not None:
        session.delete(row)
        session.commit()
