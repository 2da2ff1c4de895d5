"""messages.revision: how many times a message's stored fields were rewritten

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

Web workers keep listings and api.php message answers they built while the
rows they came from are unchanged (listingcache.py). Only ``flask reparse``
rewrites a stored message's fields; it adds one to ``revision``, which is
part of what the workers compare, so no worker keeps showing the old fields.
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    # A plain ADD COLUMN with a default: no table copy on SQLite.
    op.add_column('messages', sa.Column('revision', sa.Integer(), nullable=False, server_default='0'))


def downgrade():
    with op.batch_alter_table('messages') as batch:
        batch.drop_column('revision')
