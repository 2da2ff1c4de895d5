"""message_sources: a small message's raw bytes in a row keyed by the message

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

A raw message that the configuration keeps in the database
(``storage.source_in_row``: the database backend, or the filesystem
backend under ``storage.inline_max_bytes``, one chunk at most) is stored
in ``message_sources`` instead of as a blob: one append to one B-tree per
message, where a blob takes a ``blobs`` and a ``blob_chunks`` row, each
indexed by a random digest. Messages stored before keep their blobs, and
every reader looks in both places.
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('message_sources',
                    sa.Column('message_id', sa.Integer(), autoincrement=False, nullable=False),
                    sa.Column('data', sa.LargeBinary(), nullable=False),
                    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], ondelete='CASCADE'),
                    sa.PrimaryKeyConstraint('message_id'))


def downgrade():
    # Older code reads a message's bytes only from its blob: each row becomes
    # one again (a reference, and the database backend's chunk, which 0002's
    # downgrade writes out to a file when it runs too).
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT m.raw_sha256, s.data FROM message_sources s "
                                "JOIN messages m ON m.id = s.message_id"))
    add_ref = sa.text("INSERT INTO blobs (sha256, size, refs) VALUES (:s, :z, 1) "
                      "ON CONFLICT (sha256) DO UPDATE SET refs = blobs.refs + 1")
    add_chunk = sa.text("INSERT INTO blob_chunks (sha256, seq, data) VALUES (:s, 0, :d) "
                        "ON CONFLICT (sha256, seq) DO NOTHING").bindparams(sa.bindparam("d", type_=sa.LargeBinary))
    for sha, data in rows.all():
        conn.execute(add_ref, {"s": sha, "z": len(data)})
        conn.execute(add_chunk, {"s": sha, "d": bytes(data)})
    op.drop_table('message_sources')
