"""Training and evaluation examples: imported, derived from feedback, or marked golden."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from store.models import Example, ExampleStatus, utcnow


def example_hash(messages: list[dict], answer: str | None, label: str | None, rejected: str | None = None) -> str:
    """Content identity of an example: same context and target → same hash. An example with
    only a rejected answer (voted down, nothing better taught) is identified by that answer."""
    content = {"m": messages, "a": answer, "l": label}
    if answer is None and label is None:
        content["r"] = rejected
    payload = json.dumps(content, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def upsert_example(
    session: Session,
    *,
    messages: list[dict],
    answer: str | None = None,
    label: str | None = None,
    source: str,
    provenance: dict | None = None,
    golden: bool = False,
    rejected_answer: str | None = None,
    message_id: int | None = None,
    visible_in: str | None = None,
) -> tuple[Example, bool]:
    """Insert an example unless one with the same content exists; returns (row, created).
    An existing row keeps its history: provenance is merged and `golden` can only be switched on;
    `visible_in` (store.channels.training_scope) follows the latest derivation from a message,
    while a row from no message (a curated import) stays visible to everyone.
    Without an answer or a label it must carry a rejected answer (only preference training uses it)."""
    if answer is None and label is None and not (rejected_answer or "").strip():
        raise ValueError("an example needs an answer, a label or a rejected answer")
    digest = example_hash(messages, answer, label, rejected_answer)
    stmt = select(Example).where(Example.content_hash == digest)
    for _attempt in range(2):
        row = session.exec(stmt).first()
        created = row is None
        if created:
            row = Example(content_hash=digest, messages=messages, answer=answer, label=label,
                          source=source, provenance=provenance or {}, golden=golden,
                          rejected_answer=rejected_answer, message_id=message_id, visible_in=visible_in)
        else:
            if row.message_id is not None:
                row.visible_in = visible_in
            row.provenance = {**row.provenance, **(provenance or {})}
            row.golden = row.golden or golden
            row.rejected_answer = row.rejected_answer or rejected_answer
            row.updated_at = utcnow()
        session.add(row)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            continue
        session.refresh(row)
        return row, created
    raise RuntimeError("could not upsert example after a concurrent insert")


def list_examples(
    session: Session, *, status: ExampleStatus | str | None = ExampleStatus.active, golden: bool | None = None,
    everyone_may_see: bool = False,
) -> list[Example]:
    """Examples by status and golden mark; `everyone_may_see` keeps only those the whole workspace
    may see (visible_in None): the only ones that train or evaluate the shared model."""
    stmt = select(Example).order_by(col(Example.id))
    if everyone_may_see:
        stmt = stmt.where(col(Example.visible_in).is_(None))
    if status is not None:
        stmt = stmt.where(Example.status == str(status))
    if golden is not None:
        stmt = stmt.where(Example.golden == golden)
    return list(session.exec(stmt).all())


def examples_for_message(session: Session, message_id: int) -> list[Example]:
    return list(session.exec(select(Example).where(Example.message_id == message_id)).all())


def set_example_status(session: Session, example_id: int, status: ExampleStatus | str) -> Example:
    row = session.get(Example, example_id)
    if row is None:
        raise LookupError(f"no example with id {example_id}")
    row.status, row.updated_at = str(status), utcnow()
    session.add(row)
    session.commit()
    return row


def mark_golden(session: Session, example_id: int, golden: bool = True) -> Example:
    row = session.get(Example, example_id)
    if row is None:
        raise LookupError(f"no example with id {example_id}")
    row.golden, row.updated_at = golden, utcnow()
    session.add(row)
    session.commit()
    return row


def mark_paraphrased(session: Session, kept: dict[int, int]) -> None:
    """Remember which examples were sent for model paraphrases (id → how many were kept), in one
    commit, so a question the model could not reword is not sent again every cycle."""
    for example_id, n in kept.items():
        row = session.get(Example, example_id)
        if row is not None:
            row.provenance = {**row.provenance, "paraphrased": n}
            session.add(row)
    session.commit()


def set_splits(session: Session, splits: dict[int, str]) -> None:
    """Remember each example's split (train / eval / golden) as the last build assigned it."""
    for example_id, split in splits.items():
        row = session.get(Example, example_id)
        if row is not None and row.split != split:
            row.split = split
            session.add(row)
    session.commit()


def count_examples(session: Session, since: datetime | None = None) -> dict[str, int]:
    """Active examples per source (and 'golden', 'total'); `since` counts only newer ones."""
    stmt = select(Example.source, func.count()).where(Example.status == ExampleStatus.active)
    if since is not None:
        stmt = stmt.where(col(Example.created_at) > since)
    counts = {src: n for src, n in session.exec(stmt.group_by(Example.source)).all()}
    golden = select(func.count()).select_from(Example).where(
        Example.golden == True, Example.status == ExampleStatus.active  # noqa: E712
    )
    counts["golden"] = session.exec(golden).one()
    counts["total"] = sum(v for k, v in counts.items() if k != "golden")
    return counts


def exclude_examples(session: Session, example_ids: list[int], reason: str) -> int:
    """Exclude examples and remember why (a rebuild may re-activate its own 'stale' exclusions)."""
    count = stage_exclusions(session, example_ids, reason)
    session.commit()
    return count


def stage_exclusions(session: Session, example_ids: list[int], reason: str) -> int:
    """exclude_examples staged in the caller's transaction (with the change that makes them
    stale); how many were active."""
    count = 0
    for example_id in example_ids:
        row = session.get(Example, example_id)
        if row is None or row.status == ExampleStatus.excluded:
            continue
        row.status, row.updated_at = ExampleStatus.excluded, utcnow()
        row.provenance = {**row.provenance, "excluded_reason": reason}
        session.add(row)
        count += 1
    return count
