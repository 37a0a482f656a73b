"""closures: pnl, fee, net_pnl, detection_latency_ms

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""
import sqlalchemy as sa
from alembic import op

from db.types import ExactDecimal

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: closures written before this revision have no figures (they stay NULL, not zero).
    with op.batch_alter_table('closures', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pnl', ExactDecimal(), nullable=True))
        batch_op.add_column(sa.Column('fee', ExactDecimal(), nullable=True))
        batch_op.add_column(sa.Column('net_pnl', ExactDecimal(), nullable=True))
        batch_op.add_column(sa.Column('detection_latency_ms', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('closures', schema=None) as batch_op:
        batch_op.drop_column('detection_latency_ms')
        batch_op.drop_column('net_pnl')
        batch_op.drop_column('fee')
        batch_op.drop_column('pnl')
