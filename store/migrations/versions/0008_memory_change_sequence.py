"""memory items carry the database's order of changes (issue 25.7)

Readers refreshed their in-process index by `updated_at >= since`, a writer host's clock: a
writer whose clock ran behind had its items hidden until a restart. Each change now takes the
next value of the `memory` counter row, which the writer keeps locked until it commits, so the
numbers follow commit order and a reader asks for `change_seq > last seen`. Existing items are
numbered in their `updated_at` order; the old index on `updated_at` goes (nothing reads by it).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""
from typing import Sequence, Union

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0008'
down_revision: Union[str, None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('counter',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('memoryitem') as batch:
        batch.add_column(sa.Column('change_seq', sa.BigInteger(), nullable=False, server_default='0'))
    with op.batch_alter_table('memoryitem') as batch:
        batch.alter_column('change_seq', server_default=None)
        batch.drop_index('ix_memoryitem_updated_at')
        batch.create_index('ix_memoryitem_change_seq', ['change_seq'], unique=False)
    op.execute("UPDATE memoryitem SET change_seq = (SELECT COUNT(*) FROM memoryitem AS older "
               "WHERE older.updated_at < memoryitem.updated_at "
               "OR (older.updated_at = memoryitem.updated_at AND older.id <= memoryitem.id))")
    op.execute("INSERT INTO counter (name, value) SELECT 'memory', COUNT(*) FROM memoryitem")


def downgrade() -> None:
    with op.batch_alter_table('memoryitem') as batch:
        batch.drop_index('ix_memoryitem_change_seq')
        batch.create_index('ix_memoryitem_updated_at', ['updated_at'], unique=False)
        batch.drop_column('change_seq')
    op.drop_table('counter')
