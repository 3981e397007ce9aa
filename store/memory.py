"""Correction memory rows: write one (keyed, so a newer correction of the same answer replaces
the older), read what changed after a change number (readers keep an index in memory and refresh
it; every change takes the next number of the database's `memory` counter, in commit order),
or, on PostgreSQL with pgvector (migration 0006), search them in the database by the HNSW index
over `memoryitem.embedding`, a column the model does not map (SQLite has no such type)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pgvector.sqlalchemy import VECTOR
from sqlalchemy import bindparam, literal_column, or_, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from store.models import SECTION_SOURCE, Counter, MemoryItem, utcnow

EMBEDDING = "embedding"  # the unmapped vector column (migrations/env.py leaves it out of the drift check)
_SET_EMBEDDING = text("UPDATE memoryitem SET embedding = :v WHERE id = :id").bindparams(bindparam("v", type_=VECTOR()))
_VECTOR_COLUMN = text(
    "SELECT a.atttypmod, e.extversion FROM pg_attribute a JOIN pg_extension e ON e.extname = 'vector' "
    "WHERE a.attrelid = to_regclass('memoryitem') AND a.attname = :name AND NOT a.attisdropped")

# for this transaction: the HNSW candidates looked at, and (pgvector >= 0.8) scanning on in exact
# order while the visibility filter leaves fewer than k
_EF_SEARCH = text("SELECT set_config('hnsw.ef_search', :n, true)")
_ITERATIVE_SCAN = text("SELECT set_config('hnsw.ef_search', :n, true), "
                       "set_config('hnsw.iterative_scan', 'strict_order', true)")


@dataclass(frozen=True)
class VectorSearch:
    """The database's own search for the memory: the column's dimension and pgvector's abilities."""

    dims: int
    iterative_scan: bool  # pgvector >= 0.8 scans on until k items pass the visibility filter


_NEXT_CHANGE = text("UPDATE counter SET value = value + 1 WHERE name = 'memory' RETURNING value")
_vector_search: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine → VectorSearch


def vector_search(session: Session) -> VectorSearch | None:
    """What the database offers: None on SQLite and on a PostgreSQL without pgvector's column,
    where the memory searches in process. Found once per engine; until then asked again (one
    catalog query), so a migration to 0006 under a running process is picked up."""
    engine = session.get_bind()
    if engine.dialect.name != "postgresql":
        return None
    found = _vector_search.get(engine)
    if found is None:
        row = session.execute(_VECTOR_COLUMN, {"name": EMBEDDING}).first()
        if row is None:
            return None
        version = tuple(int(x) for x in row[1].split(".")[:2])
        found = _vector_search[engine] = VectorSearch(dims=int(row[0]), iterative_scan=version >= (0, 8))
    return found


def next_change(session: Session) -> int:
    """The next memory change number. The counter row stays locked until this transaction ends
    (SQLite: the database), so numbers are handed out in commit order: a reader that saw N and
    asks for `> N` never skips a change that commits later with a smaller number."""
    value = session.execute(_NEXT_CHANGE).scalar()
    if value is None:  # a store made before migration 0008's row (or wiped): start the counter
        session.add(Counter(name="memory", value=1))
        session.flush()
        return 1
    return int(value)


def touch_memory_item(session: Session, row: MemoryItem) -> None:
    """Mark a changed item: the next change number (first, so every writer locks the counter
    before its items) and the time, for people."""
    row.change_seq, row.updated_at = next_change(session), utcnow()


def _set_embedding(session: Session, item_id: int, vector: bytes) -> None:
    """Mirror the item's vector into the database's vector column, where there is one (left empty
    for another embedder's dimension: the memory then searches in process)."""
    search = vector_search(session)
    if search is None:
        return
    values = np.frombuffer(vector, dtype=np.float32)
    session.execute(_SET_EMBEDDING, {"v": values if len(values) == search.dims else None, "id": item_id})


def upsert_memory_item(session: Session, *, key: str, question: str, answer: str, source: str,
                       author: str | None, channel: str | None, visible_in: str | None,
                       vector: bytes) -> MemoryItem:
    """Insert or replace the item under `key` (and switch it back on)."""
    for _attempt in range(2):
        seq = next_change(session)
        row = session.exec(select(MemoryItem).where(MemoryItem.key == key)).first()
        if row is None:
            row = MemoryItem(key=key, question=question, answer=answer, source=source, author=author,
                             channel=channel, visible_in=visible_in, vector=vector, change_seq=seq)
        else:
            row.question, row.answer, row.source, row.author = question, answer, source, author
            row.channel, row.visible_in, row.vector, row.active = channel, visible_in, vector, True
            row.change_seq, row.updated_at = seq, utcnow()
        session.add(row)
        try:
            session.flush()
            _set_embedding(session, row.id, vector)
            session.commit()
        except IntegrityError:  # a concurrent writer inserted the same key first: update theirs
            session.rollback()
            continue
        session.refresh(row)
        return row
    raise RuntimeError(f"could not write memory item {key}")


def deactivate_memory_items(session: Session, keys: list[str]) -> int:
    """Switch off the active items under `keys`, staged in the caller's transaction (so with the
    change that retires them); how many were on."""
    rows = [row for row in memory_items_by_key(session, keys) if row.active]
    for row in rows:
        row.active = False
        touch_memory_item(session, row)
        session.add(row)
    return len(rows)


def deactivate_memory_item(session: Session, key: str) -> bool:
    """Switch off one item, committed; whether it was on."""
    off = deactivate_memory_items(session, [key])
    session.commit()
    return bool(off)


def erase_memory_items(session: Session, rows: list[MemoryItem]) -> int:
    """Forget items (store.forget): text, vector and database vector go, the row stays inactive
    with its key and author (ids only), so in-process indexes see the change and drop it.
    Staged in the caller's transaction; returns how many still held something."""
    erased = 0
    for row in rows:
        erased += bool(row.question or row.answer or row.vector)
        row.question, row.answer, row.vector, row.active = "", "", b"", False
        touch_memory_item(session, row)
        session.add(row)
        session.flush()
        _set_embedding(session, row.id, b"")
    return erased


def memory_items_by_key(session: Session, keys: list[str]) -> list[MemoryItem]:
    return list(session.exec(select(MemoryItem).where(col(MemoryItem.key).in_(keys))).all()) if keys else []


def memory_keys(session: Session, item_ids: list[int]) -> list[str]:
    """The keys of these items, in the order of `item_ids` (an id without a row is left out)."""
    if not item_ids:
        return []
    keys = dict(session.exec(select(MemoryItem.id, MemoryItem.key).where(col(MemoryItem.id).in_(item_ids))).all())
    return [keys[i] for i in item_ids if i in keys]


def memory_item_by_id(session: Session, item_id: int) -> MemoryItem | None:
    return session.get(MemoryItem, item_id)


def list_memory_items(session: Session, *, search: str | None = None, limit: int = 20) -> list[MemoryItem]:
    """Active items, newest first; `search`: only those whose question or answer contains it
    (case-insensitive)."""
    stmt = select(MemoryItem).where(col(MemoryItem.active)).order_by(col(MemoryItem.id).desc()).limit(limit)
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        stmt = stmt.where(or_(col(MemoryItem.question).ilike(pattern, escape="\\"),
                              col(MemoryItem.answer).ilike(pattern, escape="\\")))
    return list(session.exec(stmt).all())


def memory_changed_after(session: Session, change: int) -> list[MemoryItem]:
    """Items (active or not) whose last change is numbered above `change`, in change order
    (0: all of them)."""
    stmt = select(MemoryItem).where(MemoryItem.change_seq > change).order_by(col(MemoryItem.change_seq))
    return list(session.exec(stmt).all())


def memory_taught_since(session: Session, since: datetime) -> list[MemoryItem]:
    """Active items people taught (corrections, golden answers, imports; not document sections)
    since `since`, oldest first."""
    stmt = (select(MemoryItem)
            .where(col(MemoryItem.active), MemoryItem.source != SECTION_SOURCE, MemoryItem.created_at >= since)
            .order_by(col(MemoryItem.id)))
    return list(session.exec(stmt).all())


def memory_item(session: Session, key: str) -> MemoryItem | None:
    return session.exec(select(MemoryItem).where(MemoryItem.key == key, col(MemoryItem.active))).first()


def count_memory(session: Session) -> int:
    return session.exec(select(func.count()).select_from(MemoryItem).where(col(MemoryItem.active))).one()


def has_memory(session: Session) -> bool:
    return session.exec(select(MemoryItem.id).where(col(MemoryItem.active)).limit(1)).first() is not None


def search_memory(session: Session, vector: np.ndarray, *, channel: str | None, k: int,
                  ef_search: int) -> list[tuple]:
    """The k active items that `channel` may see (visible_in NULL or that channel) with the largest
    inner product with `vector`, best first, as (id, question, answer, source, author, created_at,
    score): the in-process search's scores. Needs `vector_search(session)`; approximate through
    the HNSW index, which looks at `ef_search` candidates (bench/memory/run.py: recall@2 against
    the exact search)."""
    search = vector_search(session)
    if search is None:
        raise RuntimeError("this database has no vector search (PostgreSQL with pgvector, migration 0006)")
    session.execute(_ITERATIVE_SCAN if search.iterative_scan else _EF_SEARCH, {"n": str(ef_search)})
    return [tuple(row) for row in session.exec(memory_search_query(vector, channel=channel, k=k)).all()]


def memory_search_query(vector: np.ndarray, *, channel: str | None, k: int):
    """search_memory's statement: ordered by pgvector's negative inner product, which the HNSW
    index (partial: active items) serves; score = the inner product."""
    distance = literal_column(EMBEDDING, VECTOR()).max_inner_product(np.asarray(vector, dtype=np.float32))
    return (select(MemoryItem.id, MemoryItem.question, MemoryItem.answer, MemoryItem.source, MemoryItem.author,
                   MemoryItem.created_at, (-distance).label("score"))
            .where(col(MemoryItem.active), or_(col(MemoryItem.visible_in).is_(None), MemoryItem.visible_in == channel))
            .order_by(distance).limit(k))
