"""account_leases and instances: several service processes on one PostgreSQL database

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""
import sqlalchemy as sa
from alembic import op

from db.types import UTCDateTime

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('account_leases',
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('owner', sa.String(length=128), nullable=True),
    sa.Column('token', sa.String(length=36), nullable=True),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('expires_at', UTCDateTime(), nullable=True),
    sa.Column('acquired_at', UTCDateTime(), nullable=True),
    sa.Column('renewed_at', UTCDateTime(), nullable=True),
    sa.Column('release_requested', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('account')
    )
    op.create_table('instances',
    sa.Column('token', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('max_accounts', sa.Integer(), nullable=False),
    sa.Column('started_at', UTCDateTime(), nullable=False),
    sa.Column('seen_at', UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('token')
    )


def downgrade() -> None:
    op.drop_table('instances')
    op.drop_table('account_leases')
