"""Training runs: queued by admins or the scheduler, claimed by one trainer, with progress."""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from store.errors import NotFoundError
from store.models import RunStatus, TrainingRun, utcnow

FINISHED = (RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled)


def queue_run(session: Session, *, queued_by: str | None = None, hyperparams: dict | None = None) -> TrainingRun:
    """Ask for a training run; a run already waiting is reused rather than queuing twice."""
    waiting = session.exec(select(TrainingRun).where(TrainingRun.status == RunStatus.queued)).first()
    if waiting:
        return waiting
    run = TrainingRun(status=RunStatus.queued, queued_by=queued_by, hyperparams=hyperparams or {})
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


def has_queued_run(session: Session) -> bool:
    return session.exec(select(TrainingRun.id).where(TrainingRun.status == RunStatus.queued)).first() is not None


def start_run(session: Session, *, owner: str, hyperparams: dict) -> TrainingRun:
    """Claim the oldest queued run (or open a new one) and mark it running under `owner`.
    Call only while holding the trainer lease."""
    run = session.exec(
        select(TrainingRun).where(TrainingRun.status == RunStatus.queued).order_by(col(TrainingRun.id)).limit(1)
    ).first() or TrainingRun()
    now = utcnow()
    run.status, run.lease_owner, run.started_at, run.heartbeat_at = RunStatus.running, owner, now, now
    run.hyperparams = {**(run.hyperparams or {}), **hyperparams}
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


def get_run(session: Session, run_id: int) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise NotFoundError(f"no training run {run_id}")
    return run


def update_run(session: Session, run_id: int, **fields) -> TrainingRun:
    """Set plain fields (dataset_snapshot_id, total_steps, ...) and beat the heartbeat."""
    run = get_run(session, run_id)
    for key, value in fields.items():
        setattr(run, key, value)
    run.heartbeat_at = utcnow()
    session.add(run)
    session.commit()
    return run


def record_progress(session: Session, run_id: int, *, step: int, total_steps: int, point: dict | None = None) -> TrainingRun:
    """Progress for the bot and a loss-history point; doubles as the run's heartbeat."""
    run = get_run(session, run_id)
    run.step, run.total_steps = step, total_steps
    run.progress = round(step / total_steps, 4) if total_steps else 0.0
    if point:
        run.metrics = [*run.metrics, {"step": step, **point}]
    run.heartbeat_at = utcnow()
    session.add(run)
    session.commit()
    return run


def finish_run(
    session: Session, run_id: int, status: RunStatus, *, error: str | None = None, model_version: str | None = None
) -> TrainingRun:
    if status not in FINISHED:
        raise ValueError(f"{status} is not a final status")
    run = get_run(session, run_id)
    run.status, run.error, run.model_version = status, error, model_version
    run.finished_at = utcnow()
    if status == RunStatus.succeeded:
        run.progress = 1.0
    session.add(run)
    session.commit()
    return run


NOT_STARTED = "could not start: "  # the error of a run that failed before training began


def fail_before_start(session: Session, *, owner: str, hyperparams: dict, error: str) -> TrainingRun | None:
    """A cycle failed before its run started (snapshot build, disk full): the queued run, if an admin
    queued one, is failed with the reason; else a new failed run says it, unless the newest run
    already failed before starting (a retry of the same trouble is reported once). None then.
    Call only while holding the trainer lease."""
    if not has_queued_run(session):
        newest = session.exec(select(TrainingRun).order_by(col(TrainingRun.id).desc()).limit(1)).first()
        if newest is not None and newest.status == RunStatus.failed and (newest.error or "").startswith(NOT_STARTED):
            return None
    run = start_run(session, owner=owner, hyperparams=hyperparams)
    return finish_run(session, run.id, RunStatus.failed, error=NOT_STARTED + error)


def fail_stale_runs(session: Session, stale_after_s: float) -> list[TrainingRun]:
    """Runs still 'running' whose trainer stopped heartbeating died: mark them failed."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    stale = session.exec(
        select(TrainingRun).where(TrainingRun.status == RunStatus.running, col(TrainingRun.heartbeat_at) < cutoff)
    ).all()
    for run in stale:
        run.status, run.finished_at = RunStatus.failed, utcnow()
        run.error = f"trainer {run.lease_owner} stopped heartbeating (last at {run.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC)"
        session.add(run)
    session.commit()
    return list(stale)


def list_runs(session: Session, limit: int = 10) -> list[TrainingRun]:
    return list(session.exec(select(TrainingRun).order_by(col(TrainingRun.id).desc()).limit(limit)).all())


def last_successful_run(session: Session) -> TrainingRun | None:
    stmt = (
        select(TrainingRun)
        .where(TrainingRun.status == RunStatus.succeeded)
        .order_by(col(TrainingRun.id).desc())
        .limit(1)
    )
    return session.exec(stmt).first()


def runs_to_report(session: Session, *, since: datetime | None = None, limit: int = 10) -> list[TrainingRun]:
    """Runs whose admin-channel message is not final yet (reported_at unset), oldest first;
    `since` skips an old backlog (e.g. runs from before the bot was configured)."""
    session.expire_all()
    stmt = select(TrainingRun).where(col(TrainingRun.reported_at).is_(None))
    if since is not None:
        stmt = stmt.where(col(TrainingRun.created_at) >= since)
    return list(session.exec(stmt.order_by(col(TrainingRun.id)).limit(limit)).all())


def set_report_message(session: Session, run_id: int, *, channel: str, ts: str) -> bool:
    """Remember the Slack message that shows this run. Only the first poster wins (a conditional
    update), so two bot replicas never both own the message. Does not touch the heartbeat."""
    res = session.execute(
        update(TrainingRun)
        .where(col(TrainingRun.id) == run_id, col(TrainingRun.report_ts).is_(None))
        .values(report_channel=channel, report_ts=ts)
    )
    session.commit()
    if res.rowcount == 0:
        get_run(session, run_id)  # NotFoundError for an unknown run; else someone else posted first
    return res.rowcount == 1


def mark_run_reported(session: Session, run_id: int) -> TrainingRun:
    """The final report is posted: stop updating this run's message."""
    run = get_run(session, run_id)
    run.reported_at = utcnow()
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


def run_by_report_message(session: Session, channel: str, ts: str) -> TrainingRun | None:
    """The run a Slack report message belongs to (for its Approve / Reject buttons)."""
    stmt = select(TrainingRun).where(TrainingRun.report_channel == channel, TrainingRun.report_ts == ts)
    return session.exec(stmt).first()
