"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

from db.types import ExactDecimal, UTCDateTime

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('positions',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('symbol', sa.String(length=64), nullable=False),
    sa.Column('side', sa.String(length=8), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('requested_quantity', ExactDecimal(), nullable=False),
    sa.Column('quantity', ExactDecimal(), nullable=False),
    sa.Column('entry_price', ExactDecimal(), nullable=True),
    sa.Column('stop_price', ExactDecimal(), nullable=True),
    sa.Column('exit_price', ExactDecimal(), nullable=True),
    sa.Column('close_cause', sa.String(length=32), nullable=True),
    sa.Column('close_reason', sa.String(length=32), nullable=True),
    sa.Column('state_before_close', sa.String(length=32), nullable=True),
    sa.Column('last_activity_at', UTCDateTime(), nullable=True),
    sa.Column('created_at', UTCDateTime(), nullable=False),
    sa.Column('updated_at', UTCDateTime(), nullable=False),
    sa.Column('closed_at', UTCDateTime(), nullable=True),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('positions', schema=None) as batch_op:
        batch_op.create_index('ix_positions_state', ['state'], unique=False)
        batch_op.create_index('uq_positions_live_symbol_side', ['account', 'symbol', 'side'], unique=True,
                              sqlite_where=sa.text(
                                  "state NOT IN ('CANCELLED', 'CLOSED', 'CLOSED_EXTERNAL', 'PHANTOM')"),
                              postgresql_where=sa.text(
                                  "state NOT IN ('CANCELLED', 'CLOSED', 'CLOSED_EXTERNAL', 'PHANTOM')"))

    op.create_table('closures',
    sa.Column('position_id', sa.String(length=32), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('symbol', sa.String(length=64), nullable=False),
    sa.Column('side', sa.String(length=8), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('cause', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=True),
    sa.Column('quantity', ExactDecimal(), nullable=False),
    sa.Column('entry_price', ExactDecimal(), nullable=True),
    sa.Column('exit_price', ExactDecimal(), nullable=True),
    sa.Column('opened_at', UTCDateTime(), nullable=False),
    sa.Column('closed_at', UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['position_id'], ['positions.id'], ),
    sa.PrimaryKeyConstraint('position_id')
    )
    with op.batch_alter_table('closures', schema=None) as batch_op:
        batch_op.create_index('ix_closures_closed_at', ['closed_at'], unique=False)

    op.create_table('journal',
    sa.Column('position_id', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=True),
    sa.Column('dest', sa.String(length=32), nullable=False),
    sa.Column('at', UTCDateTime(), nullable=False),
    sa.Column('cause', sa.String(length=32), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['position_id'], ['positions.id'], ),
    sa.PrimaryKeyConstraint('position_id', 'seq')
    )
    op.create_table('orders',
    sa.Column('client_id', sa.String(length=36), nullable=False),
    sa.Column('position_id', sa.String(length=32), nullable=False),
    sa.Column('symbol', sa.String(length=64), nullable=False),
    sa.Column('purpose', sa.String(length=16), nullable=False),
    sa.Column('side', sa.String(length=8), nullable=False),
    sa.Column('quantity', ExactDecimal(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('trigger_price', ExactDecimal(), nullable=True),
    sa.Column('exchange_order_id', sa.String(length=64), nullable=True),
    sa.Column('algo_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', UTCDateTime(), nullable=False),
    sa.Column('updated_at', UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['position_id'], ['positions.id'], ),
    sa.PrimaryKeyConstraint('client_id')
    )
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.create_index('ix_orders_position', ['position_id'], unique=False)
        batch_op.create_index('ix_orders_status', ['status'], unique=False)

    op.create_table('trailing_states',
    sa.Column('position_id', sa.String(length=32), nullable=False),
    sa.Column('activation_price', ExactDecimal(), nullable=False),
    sa.Column('callback_rate', ExactDecimal(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('watermark', ExactDecimal(), nullable=True),
    sa.Column('last_moved_at', UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['position_id'], ['positions.id'], ),
    sa.PrimaryKeyConstraint('position_id')
    )


def downgrade() -> None:
    op.drop_table('trailing_states')
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.drop_index('ix_orders_status')
        batch_op.drop_index('ix_orders_position')

    op.drop_table('orders')
    op.drop_table('journal')
    with op.batch_alter_table('closures', schema=None) as batch_op:
        batch_op.drop_index('ix_closures_closed_at')

    op.drop_table('closures')
    with op.batch_alter_table('positions', schema=None) as batch_op:
        batch_op.drop_index('uq_positions_live_symbol_side',
                            sqlite_where=sa.text("state NOT IN ('CANCELLED', 'CLOSED', 'CLOSED_EXTERNAL', 'PHANTOM')"),
                            postgresql_where=sa.text(
                                "state NOT IN ('CANCELLED', 'CLOSED', 'CLOSED_EXTERNAL', 'PHANTOM')"))
        batch_op.drop_index('ix_positions_state')

    op.drop_table('positions')
