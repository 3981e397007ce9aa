"""Model versions, the aliases that point at them, and the moves between them (with audit)."""
from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from store.audit import add_audit, list_audit
from store.errors import InvalidStateError, NotFoundError
from store.models import Alias, ModelVersion, ReportPlot, VersionStatus, utcnow

PRODUCTION = "production"
CANDIDATE = "candidate"
ALIASES = (PRODUCTION, CANDIDATE)
BASE_LABEL = "base"  # how answers, replicas and the watch name the base model (no version)
VERSION_NAME = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
ALIAS_MOVE = "alias.move"


def version_label(name: str | None) -> str:
    return name or BASE_LABEL


def validate_version_name(name: str) -> str:
    """Version names end up in paths and URLs: allow lowercase letters, digits and dashes only."""
    if not VERSION_NAME.fullmatch(name or "") or name in ALIASES or name == BASE_LABEL:
        raise ValueError(f"invalid version name {name!r}: use lowercase letters, digits and '-' (e.g. ft-0007)")
    return name


def next_version_name(session: Session, prefix: str = "ft", after: str | None = None) -> str:
    """One past the highest `prefix-NNNN` registered (or past `after`): a count would hand out
    a taken name once any name was skipped."""
    numbers = [int(n.rsplit("-", 1)[1]) for n in session.exec(
        select(ModelVersion.name).where(col(ModelVersion.name).like(f"{prefix}-%"))).all()
        if n.rsplit("-", 1)[1].isdigit()]
    if after and after.rsplit("-", 1)[-1].isdigit():
        numbers.append(int(after.rsplit("-", 1)[1]))
    return f"{prefix}-{max(numbers, default=0) + 1:04d}"


def register_version(
    session: Session,
    *,
    adapter_path: str,
    adapter_sha256: str,
    base_model: str,
    gate_passed: bool,
    gate_reasons: list[str],
    report: dict | None = None,
    report_path: str | None = None,
    report_plot: bytes | None = None,
    run_id: int | None = None,
    dataset_snapshot_id: int | None = None,
    name: str | None = None,
) -> ModelVersion:
    """Register an immutable version: 'candidate' if the gate passed, else 'rejected'; its
    evaluation plot (PNG bytes) is stored with it in the same transaction."""
    for _attempt in range(5):
        version = ModelVersion(
            name=validate_version_name(name or next_version_name(session)),
            adapter_path=adapter_path, adapter_sha256=adapter_sha256, base_model=base_model,
            gate_passed=gate_passed, gate_reasons=list(gate_reasons), report=report or {},
            report_path=report_path, run_id=run_id, dataset_snapshot_id=dataset_snapshot_id,
            status=VersionStatus.candidate if gate_passed else VersionStatus.rejected,
        )
        session.add(version)
        if report_plot is not None:
            session.add(ReportPlot(version_name=version.name, png=report_plot))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            if name:
                raise InvalidStateError(f"version {name} already exists; versions are immutable") from None
            continue  # another trainer took that number; take the next
        session.refresh(version)
        return version
    raise InvalidStateError("could not allocate a version name")


def find_version(session: Session, name: str) -> ModelVersion | None:
    return session.exec(select(ModelVersion).where(ModelVersion.name == name)).first()


def get_version(session: Session, name: str) -> ModelVersion:
    version = find_version(session, name)
    if version is None:
        raise NotFoundError(f"no model version named {name!r}")
    return version


def list_versions(session: Session, limit: int = 20, offset: int = 0) -> list[ModelVersion]:
    """Newest first."""
    query = select(ModelVersion).order_by(col(ModelVersion.id).desc()).offset(offset).limit(limit)
    return list(session.exec(query).all())


def count_versions(session: Session) -> int:
    return session.exec(select(func.count()).select_from(ModelVersion)).one()


def alias_target(session: Session, alias: str = PRODUCTION) -> str | None:
    """The version name an alias points at; None means the base model."""
    session.expire_all()
    row = session.get(Alias, alias)
    return row.version_name if row else None


def alias_version(session: Session, alias: str = PRODUCTION) -> ModelVersion | None:
    name = alias_target(session, alias)
    return find_version(session, name) if name else None


def set_version_status(session: Session, name: str, status: VersionStatus, *, actor: str,
                       reason: str | None = None, force: bool = False, commit: bool = True) -> ModelVersion:
    """Approve or reject a version, with its audit event in the same transaction.
    Approving a version the gate rejected needs `force` and a reason."""
    version = _locked_version(session, name)
    if status == VersionStatus.approved:
        if version.status == VersionStatus.production:
            raise InvalidStateError(f"{name} is already in production")
        if not version.gate_passed and not force:
            raise InvalidStateError(f"{name} did not pass the evaluation gate; use --force \"reason\" to override")
        if force and not reason:
            raise InvalidStateError("forcing needs a reason")
    elif status == VersionStatus.rejected:
        if version.status == VersionStatus.production:
            raise InvalidStateError(f"{name} is in production; roll back or promote another version first")
    else:
        raise ValueError(f"set_version_status handles approve/reject, not {status}")
    before = version.status
    version.status = status
    session.add(version)
    add_audit(session, actor=actor, action=f"version.{'approve' if status == VersionStatus.approved else 'reject'}",
              target=name, detail={"from": before, "to": status.value, "reason": reason, "force": force})
    if commit:
        session.commit()
        session.refresh(version)
    return version


def _locked_version(session: Session, name: str) -> ModelVersion:
    """The version row, locked until the transaction ends (PostgreSQL; SQLite serializes writers)."""
    version = session.exec(select(ModelVersion).where(ModelVersion.name == name).with_for_update()).first()
    if version is None:
        raise NotFoundError(f"no model version named {name!r}")
    return version


def promote_version(session: Session, name: str, *, actor: str, reason: str | None = None,
                    force: bool = False) -> dict:
    """Approve (when not yet approved) and move production to `name` in one transaction, the
    alias row locked first: of two concurrent promotions one waits for the other, and whatever
    the order exactly one version ends up in production."""
    _locked_alias(session, PRODUCTION)
    version = _locked_version(session, name)
    if version.status not in (VersionStatus.approved, VersionStatus.production):
        set_version_status(session, name, VersionStatus.approved, actor=actor, reason=reason, force=force,
                           commit=False)
    return move_alias(session, PRODUCTION, name, actor=actor, reason=reason, force=force)


def _locked_alias(session: Session, alias: str) -> Alias | None:
    """The alias row, locked, as the database has it now (not as this session last saw it)."""
    stmt = select(Alias).where(Alias.name == alias).with_for_update().execution_options(populate_existing=True)
    return session.exec(stmt).first()


def move_alias(session: Session, alias: str, version_name: str | None, *, actor: str,
               reason: str | None = None, force: bool = False, expected: str | None = None) -> dict:
    """Point `alias` at a version (None = base model) and write the audit event, in one transaction.
    Moving production also sets the statuses: the new version 'production', every other one that
    says 'production' 'retired' (so a lost race can never leave two). `expected`: compare and swap,
    move only if the alias still shows this (a version_label), read under the alias lock."""
    if alias not in ALIASES:
        raise ValueError(f"unknown alias {alias!r}; known: {', '.join(ALIASES)}")
    _locked_alias(session, alias)
    new = _locked_version(session, version_name) if version_name else None
    if new is not None and alias == PRODUCTION and not new.gate_passed and not force:
        raise InvalidStateError(
            f"{new.name} did not pass the evaluation gate; use --force \"reason\" to promote it anyway")
    if force and not reason:
        raise InvalidStateError("forcing needs a reason")
    row = session.get(Alias, alias) or Alias(name=alias)
    before = row.version_name
    if expected is not None and version_label(before) != expected:
        raise InvalidStateError(f"{alias} is `{version_label(before)}` now, not `{expected}`; nothing was changed")
    if before == version_name:
        raise InvalidStateError(f"{alias} already points at {version_name or 'the base model'}")
    row.version_name, row.updated_at, row.updated_by = version_name, utcnow(), actor
    session.add(row)
    if alias == PRODUCTION:
        if new is not None:
            new.status = VersionStatus.production
            session.add(new)
        live = select(ModelVersion).where(ModelVersion.status == VersionStatus.production)
        for old in session.exec(live).all():
            if old.name != version_name:
                old.status = VersionStatus.retired
                session.add(old)
    detail = {"from": before, "to": version_name, "reason": reason, "force": force}
    add_audit(session, actor=actor, action=ALIAS_MOVE, target=alias, detail=detail)
    session.commit()
    return detail


def alias_history(session: Session, alias: str = PRODUCTION, limit: int = 50) -> list[dict]:
    """Which version was live when: newest first, one entry per move."""
    return [
        {"at": e.at, "actor": e.actor, "from": e.detail.get("from"), "to": e.detail.get("to"),
         "reason": e.detail.get("reason")}
        for e in list_audit(session, action=ALIAS_MOVE, target=alias, limit=limit)
    ]


def went_live_at(session: Session, version_name: str, alias: str = PRODUCTION) -> datetime | None:
    """When `alias` last moved to this version (None: it never did)."""
    for move in alias_history(session, alias, limit=200):
        if move["to"] == version_name:
            return move["at"]
    return None


def rollback_target(session: Session, alias: str = PRODUCTION) -> str | None:
    """The version that was live before the current one (None = the base model), skipping
    versions an admin has rejected since: a rollback never brings back what someone turned down."""
    history = alias_history(session, alias, limit=200)
    if not history:
        raise InvalidStateError(f"{alias} has never moved; nothing to roll back to")
    current = history[0]["to"]
    for move in history:
        name = move["from"]
        if name == current:
            continue
        if name is None:
            return None
        version = find_version(session, name)
        if version is not None and version.status != VersionStatus.rejected:
            return name
    return None


def report_plot(session: Session, version_name: str) -> bytes | None:
    """The evaluation plot stored with a version, if any."""
    row = session.get(ReportPlot, version_name)
    return row.png if row is not None else None
