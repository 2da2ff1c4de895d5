"""attachment spans: an attachment kept as a span of its message's own row

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

A message whose raw bytes are kept in ``message_sources`` already holds
every attachment's bytes, transfer-encoded. Such an attachment is now
stored as where it lies in them (``source_start``, ``source_end``) and how
it decodes (``source_codec``), with an empty ``sha256``, instead of as a
second copy in a blob. Attachments stored before keep their blobs.
"""
import hashlib

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('attachments') as batch_op:
        batch_op.add_column(sa.Column('source_start', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('source_end', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('source_codec', sa.String(length=20), nullable=True))


def downgrade():
    # Older code reads an attachment's bytes only from its blob: each span
    # becomes one (a reference, and the database backend's chunk, which
    # 0002's downgrade writes out to a file when it runs too).
    import mimeheaders  # the one decoder that the spans were made with

    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT a.id, a.source_start, a.source_end, a.source_codec, s.data "
                                "FROM attachments a JOIN message_sources s ON s.message_id = a.message_id "
                                "WHERE a.source_start IS NOT NULL"))
    add_ref = sa.text("INSERT INTO blobs (sha256, size, refs) VALUES (:s, :z, 1) "
                      "ON CONFLICT (sha256) DO UPDATE SET refs = blobs.refs + 1")
    add_chunk = sa.text("INSERT INTO blob_chunks (sha256, seq, data) VALUES (:s, 0, :d) "
                        "ON CONFLICT (sha256, seq) DO NOTHING").bindparams(sa.bindparam("d", type_=sa.LargeBinary))
    name = sa.text("UPDATE attachments SET sha256 = :s WHERE id = :i")
    for att_id, start, end, codec, raw in rows.all():
        data = mimeheaders.decode_span(bytes(raw), (start, end, codec)) or b""
        sha = hashlib.sha256(data).hexdigest()
        conn.execute(add_ref, {"s": sha, "z": len(data)})
        conn.execute(add_chunk, {"s": sha, "d": data})
        conn.execute(name, {"s": sha, "i": att_id})
    with op.batch_alter_table('attachments') as batch_op:
        batch_op.drop_column('source_codec')
        batch_op.drop_column('source_end')
        batch_op.drop_column('source_start')
