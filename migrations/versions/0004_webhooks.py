"""webhooks: a user's webhook, the durable outbox of its events, the attempt log

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

* ``webhooks``: one per user (URL, signing secret, the site URL for links);
* ``webhook_outbox``: one row per event, written with the message it
  announces; claimed by senders through ``claimed_until``/``claim``;
* ``webhook_deliveries``: the newest attempts per webhook.
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('webhooks',
                    sa.Column('id', sa.Integer(), nullable=False),
                    sa.Column('user_id', sa.Integer(), nullable=False),
                    sa.Column('url', sa.String(length=2048), nullable=False),
                    sa.Column('secret', sa.String(length=80), nullable=False),
                    sa.Column('base_url', sa.String(length=2048), nullable=False),
                    sa.Column('created_at', sa.DateTime(), nullable=False),
                    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
                    sa.PrimaryKeyConstraint('id'),
                    sa.UniqueConstraint('user_id'))
    op.create_table('webhook_outbox',
                    sa.Column('id', sa.Integer(), nullable=False),
                    sa.Column('event_id', sa.String(length=32), nullable=False),
                    sa.Column('webhook_id', sa.Integer(), nullable=False),
                    sa.Column('payload', sa.Text(), nullable=False),
                    sa.Column('attempts', sa.Integer(), nullable=False),
                    sa.Column('created_at', sa.DateTime(), nullable=False),
                    sa.Column('next_at', sa.DateTime(), nullable=True),
                    sa.Column('claimed_until', sa.DateTime(), nullable=True),
                    sa.Column('claim', sa.String(length=32), nullable=True),
                    sa.Column('last_status', sa.Integer(), nullable=True),
                    sa.Column('last_error', sa.Text(), nullable=True),
                    sa.Column('last_duration_ms', sa.Integer(), nullable=True),
                    sa.Column('delivered_at', sa.DateTime(), nullable=True),
                    sa.ForeignKeyConstraint(['webhook_id'], ['webhooks.id'], ondelete='CASCADE'),
                    sa.PrimaryKeyConstraint('id'),
                    sa.UniqueConstraint('event_id'),
                    sqlite_autoincrement=True)
    with op.batch_alter_table('webhook_outbox') as batch_op:
        batch_op.create_index(batch_op.f('ix_webhook_outbox_next_at'), ['next_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_webhook_outbox_webhook_id'), ['webhook_id'], unique=False)
    op.create_table('webhook_deliveries',
                    sa.Column('id', sa.Integer(), nullable=False),
                    sa.Column('webhook_id', sa.Integer(), nullable=False),
                    sa.Column('event_id', sa.String(length=32), nullable=False),
                    sa.Column('attempt', sa.Integer(), nullable=False),
                    sa.Column('at', sa.DateTime(), nullable=False),
                    sa.Column('status_code', sa.Integer(), nullable=True),
                    sa.Column('duration_ms', sa.Integer(), nullable=False),
                    sa.Column('error', sa.Text(), nullable=True),
                    sa.Column('ok', sa.Boolean(), nullable=False),
                    sa.ForeignKeyConstraint(['webhook_id'], ['webhooks.id'], ondelete='CASCADE'),
                    sa.PrimaryKeyConstraint('id'),
                    sqlite_autoincrement=True)
    with op.batch_alter_table('webhook_deliveries') as batch_op:
        batch_op.create_index('ix_webhook_deliveries_webhook_id_id', ['webhook_id', 'id'], unique=False)


def downgrade():
    op.drop_table('webhook_deliveries')
    op.drop_table('webhook_outbox')
    op.drop_table('webhooks')
