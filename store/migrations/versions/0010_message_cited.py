"""a bot answer records the memory items it cited (issue 28)

`message.cited` holds the keys of the memory items an answer used and named in its citation
("section:<id>:<version>" for a document's section), so a correction of that answer can flag
the section as possibly out of date. NULL on people's messages and on answers from before.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: Union[str, None] = '0009'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cited', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_column('cited')
