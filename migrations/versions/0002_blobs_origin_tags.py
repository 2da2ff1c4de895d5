"""content-addressed blobs, mailbox origin, sub-address tags, ids never reused

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

* ``blobs`` (one row per distinct blob, with its reference count) and
  ``blob_chunks`` (the database storage backend);
* messages name their raw blob by ``raw_sha256`` (no ``raw_path``),
  attachments by ``sha256`` (no ``stored_path``); existing files move from
  ``uploads/YYYYMMDD/<uuid>`` to ``uploads/blobs/ab/cd/<sha256>``;
* ``mailboxes.origin``: which front made a mailbox (api.php shows only its own);
* ``messages.tag``: the ``tag`` of ``name+tag@domain``;
* SQLite tables of messages and attachments get AUTOINCREMENT, so an id is
  never handed out twice.
"""
import hashlib
import os
from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from flask import current_app

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('blobs',
                    sa.Column('sha256', sa.String(length=64), nullable=False),
                    sa.Column('size', sa.BigInteger(), nullable=False),
                    sa.Column('refs', sa.Integer(), nullable=False),
                    sa.PrimaryKeyConstraint('sha256'))
    op.create_table('blob_chunks',
                    sa.Column('sha256', sa.String(length=64), nullable=False),
                    sa.Column('seq', sa.Integer(), nullable=False),
                    sa.Column('data', sa.LargeBinary(), nullable=False),
                    sa.PrimaryKeyConstraint('sha256', 'seq'))
    with op.batch_alter_table('mailboxes') as batch_op:
        batch_op.add_column(sa.Column('origin', sa.String(length=16), nullable=False,
                                      server_default='api.php'))
    conn = op.get_bind()
    conn.execute(sa.text("UPDATE mailboxes SET origin = 'user-api' WHERE user_id IS NOT NULL"))
    conn.execute(sa.text("UPDATE mailboxes SET origin = 'web' WHERE session_id IS NOT NULL"))
    with op.batch_alter_table('attachments') as batch_op:
        batch_op.add_column(sa.Column('sha256', sa.String(length=64), nullable=True))
    move_files(conn)
    # AUTOINCREMENT is SQLite's (a table copy there); PostgreSQL's sequences
    # never hand out an id twice, and its tables are altered in place.
    sqlite = conn.dialect.name == "sqlite"
    rebuild = {"recreate": "always" if sqlite else "auto",
               "table_kwargs": {"sqlite_autoincrement": True} if sqlite else {}}
    with op.batch_alter_table('attachments', **rebuild) as batch_op:
        batch_op.drop_column('stored_path')
        batch_op.alter_column('sha256', existing_type=sa.String(length=64), nullable=False)
        batch_op.create_index(batch_op.f('ix_attachments_sha256'), ['sha256'], unique=False)
    with op.batch_alter_table('messages', **rebuild) as batch_op:
        batch_op.add_column(sa.Column('tag', sa.String(length=64), nullable=True))
        batch_op.drop_column('raw_path')
        batch_op.drop_index('ix_messages_raw_sha256')
        batch_op.create_index('ix_messages_raw_sha256_mailbox_id', ['raw_sha256', 'mailbox_id'],
                              unique=False)


def move_files(conn):
    """Move every stored file to its blob name and count the references.
    A file already gone leaves its row without bytes (``flask purge``
    reports such rows), as before."""
    root = Path(current_app.config["UPLOADS_DIR"])
    refs, sizes = Counter(), {}
    for msg_id, rel, sha in conn.execute(sa.text("SELECT id, raw_path, raw_sha256 FROM messages")).all():
        sha = place(root, rel, sha, sizes)
        if sha:
            refs[sha] += 1
            conn.execute(sa.text("UPDATE messages SET raw_sha256 = :s WHERE id = :i"), {"s": sha, "i": msg_id})
    for att_id, rel in conn.execute(sa.text("SELECT id, stored_path FROM attachments")).all():
        sha = place(root, rel, None, sizes) or hashlib.sha256(b"").hexdigest()
        refs[sha] += 1
        sizes.setdefault(sha, 0)
        conn.execute(sa.text("UPDATE attachments SET sha256 = :s WHERE id = :i"), {"s": sha, "i": att_id})
    for sha, count in refs.items():
        conn.execute(sa.text("INSERT INTO blobs (sha256, size, refs) VALUES (:s, :z, :r)"),
                     {"s": sha, "z": sizes.get(sha, 0), "r": count})


def place(root: Path, rel, sha, sizes: dict):
    """Move ``uploads/<rel>`` to its blob path; returns its SHA-256 (or the
    recorded one when the file is gone)."""
    path = (root / rel).resolve() if rel else None
    if path is None or root.resolve() not in path.parents or not path.is_file():
        return sha
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    target = root / "blobs" / sha[:2] / sha[2:4] / sha
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        path.unlink()
    else:
        os.replace(path, target)
    sizes[sha] = len(data)
    return sha


def downgrade():
    """Back to per-row file paths: each row names its blob's file (kept where
    it is, under ``uploads/blobs/``, which the old code reads as any path
    inside uploads); blobs held only in the database are written out first."""
    conn = op.get_bind()
    rebuild = {"recreate": "always" if conn.dialect.name == "sqlite" else "auto"}
    with op.batch_alter_table('messages', **rebuild) as batch_op:
        batch_op.add_column(sa.Column('raw_path', sa.String(length=128), nullable=True))
    with op.batch_alter_table('attachments', **rebuild) as batch_op:
        batch_op.add_column(sa.Column('stored_path', sa.String(length=128), nullable=True))
    write_back(conn)
    with op.batch_alter_table('attachments', **rebuild) as batch_op:
        batch_op.drop_index(batch_op.f('ix_attachments_sha256'))
        batch_op.drop_column('sha256')
        batch_op.alter_column('stored_path', existing_type=sa.String(length=128), nullable=False)
    with op.batch_alter_table('messages', **rebuild) as batch_op:
        batch_op.drop_index('ix_messages_raw_sha256_mailbox_id')
        batch_op.drop_column('tag')
        batch_op.create_index(batch_op.f('ix_messages_raw_sha256'), ['raw_sha256'], unique=False)
    with op.batch_alter_table('mailboxes') as batch_op:
        batch_op.drop_column('origin')
    op.drop_table('blob_chunks')
    op.drop_table('blobs')


def write_back(conn):
    """Give every row the relative path of its blob's file, writing the file
    from ``blob_chunks`` where only the database holds it."""
    root = Path(current_app.config["UPLOADS_DIR"])
    for (sha,) in conn.execute(sa.text("SELECT sha256 FROM blobs")).all():
        rel = f"blobs/{sha[:2]}/{sha[2:4]}/{sha}"
        path = root / rel
        if not path.exists():
            chunks = conn.execute(sa.text("SELECT data FROM blob_chunks WHERE sha256 = :s ORDER BY seq"),
                                  {"s": sha}).scalars().all()
            if chunks:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"".join(bytes(c) for c in chunks))
        conn.execute(sa.text("UPDATE messages SET raw_path = :p WHERE raw_sha256 = :s"), {"p": rel, "s": sha})
        conn.execute(sa.text("UPDATE attachments SET stored_path = :p WHERE sha256 = :s"), {"p": rel, "s": sha})
