"""documents become training data, reviewed: questions generated from their sections (issue 28)

A `docquestion` row is one question a section answers and its short answer from the section's
words, generated through the gateway (trainer/docquestions.py), tied to the version of the section's
text it was checked against; filtered, pending, approved (an example and a memory item), rejected or stale.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""
from typing import Sequence, Union

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0009'
down_revision: Union[str, None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('docquestion',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('document_id', sa.Integer(), nullable=False),
    sa.Column('section_id', sa.Integer(), nullable=False),
    sa.Column('section_version', sa.Integer(), nullable=False),
    sa.Column('question', sa.Text(), nullable=False),
    sa.Column('answer', sa.Text(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('edited', sa.Boolean(), nullable=False),
    sa.Column('decided_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('decided_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('example_id', sa.Integer(), nullable=True),
    sa.Column('review_ts', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['document_id'], ['document.id'], ),
    sa.ForeignKeyConstraint(['section_id'], ['documentsection.id'], ),
    sa.ForeignKeyConstraint(['example_id'], ['example.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('docquestion', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_docquestion_document_id'), ['document_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_docquestion_section_id'), ['section_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_docquestion_status'), ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('docquestion', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_docquestion_status'))
        batch_op.drop_index(batch_op.f('ix_docquestion_section_id'))
        batch_op.drop_index(batch_op.f('ix_docquestion_document_id'))
    op.drop_table('docquestion')
