"""memory search in the database: a pgvector column with an HNSW index

On PostgreSQL with the `vector` extension available: the extension, a vector(384) column
`memoryitem.embedding` (the embedder's dimension, flywheel.embedding.DIMS), filled from the bytes
column, and an HNSW index over the active items by inner product (the score the in-process search
gives: item vectors are means of two unit vectors, not unit themselves, so cosine would rank them
differently). The bytes column stays, so the in-process search remains the fallback and nothing
is lost going back. On SQLite, or a PostgreSQL without the extension (or without the right to
create it), nothing changes; a log line says so.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""
from typing import Sequence, Union

import numpy as np
import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import VECTOR

from flywheel.embedding import DIMS
from flywheel.logs import get_logger

revision: str = '0006'
down_revision: Union[str, None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

log = get_logger("store.migrations")
# pgvector's defaults; bench/memory/run.py measured recall@2 and latency at 1M items with them
HNSW = "USING hnsw (embedding vector_ip_ops) WITH (m = 16, ef_construction = 64) WHERE active"


def _vector_extension(bind) -> str | None:
    """Why the database search cannot be set up here, or None when it can."""
    if bind.dialect.name != "postgresql":
        return f"{bind.dialect.name} has no vector index"
    if bind.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first() is None:
        return "the pgvector extension is not installed on this PostgreSQL server"
    try:
        with bind.begin_nested():  # a refusal must not abort the migration's transaction
            bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS vector"))
    except sa.exc.DBAPIError as exc:
        return (f"CREATE EXTENSION vector refused ({str(exc.orig).strip().splitlines()[0]}); "
                "a superuser can create it before migrating")
    return None


def upgrade() -> None:
    bind = op.get_bind()
    reason = _vector_extension(bind)
    if reason is not None:
        log.info("memory search stays in process", reason=reason)
        return
    op.execute(f"ALTER TABLE memoryitem ADD COLUMN embedding vector({DIMS})")
    rows = bind.execute(sa.text("SELECT id, vector FROM memoryitem")).all()
    fill = [{"id": i, "v": np.frombuffer(blob, dtype=np.float32)} for i, blob in rows if len(blob) == DIMS * 4]
    if fill:
        set_embedding = sa.text("UPDATE memoryitem SET embedding = :v WHERE id = :id").bindparams(
            sa.bindparam("v", type_=VECTOR(DIMS)))
        bind.execute(set_embedding, fill)
    op.execute(f"CREATE INDEX ix_memoryitem_embedding ON memoryitem {HNSW}")
    log.info("memory search in the database", index="hnsw", dims=DIMS, items=len(fill),
             skipped=len(rows) - len(fill))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_memoryitem_embedding")
        op.execute("ALTER TABLE memoryitem DROP COLUMN IF EXISTS embedding")
