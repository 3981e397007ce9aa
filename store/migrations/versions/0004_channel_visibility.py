"""channel visibility: where what was taught may be seen

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('channel',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('visibility', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('shared_for_training', sa.Boolean(), nullable=False),
    sa.Column('shared_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('shared_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('checked_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('example', schema=None) as batch_op:
        batch_op.add_column(sa.Column('visible_in', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_example_visible_in'), ['visible_in'], unique=False)
    # Fail closed: an example taught from a message counts as private to its channel until the
    # next derivation finds the channel public (the bot records channels as it answers in them).
    op.execute("UPDATE example SET visible_in = (SELECT message.channel FROM message "
               "WHERE message.id = example.message_id) WHERE message_id IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table('example', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_example_visible_in'))
        batch_op.drop_column('visible_in')
    op.drop_table('channel')
