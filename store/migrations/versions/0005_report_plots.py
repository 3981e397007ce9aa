"""report plots in the store

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '0005'
down_revision: Union[str, None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('reportplot',
    sa.Column('version_name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('png', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['version_name'], ['modelversion.name'], ),
    sa.PrimaryKeyConstraint('version_name')
    )


def downgrade() -> None:
    op.drop_table('reportplot')
