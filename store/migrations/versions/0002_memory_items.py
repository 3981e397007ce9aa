"""correction memory items

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('memoryitem',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('question', sa.Text(), nullable=False),
    sa.Column('answer', sa.Text(), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('author', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('channel', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('visible_in', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('vector', sa.LargeBinary(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    with op.batch_alter_table('memoryitem', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_memoryitem_active'), ['active'], unique=False)
        batch_op.create_index(batch_op.f('ix_memoryitem_updated_at'), ['updated_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_memoryitem_visible_in'), ['visible_in'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('memoryitem', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_memoryitem_visible_in'))
        batch_op.drop_index(batch_op.f('ix_memoryitem_updated_at'))
        batch_op.drop_index(batch_op.f('ix_memoryitem_active'))
    op.drop_table('memoryitem')
