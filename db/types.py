"""Column types that keep money exact and time unambiguous on SQLite and PostgreSQL alike."""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out; a naive datetime is refused, never guessed.

    PostgreSQL: TIMESTAMP WITH TIME ZONE. SQLite has no time type: fixed-width ISO-8601 text with
    microseconds and "+00:00", which sorts chronologically and parses with C `fromisoformat`
    (several times faster than SQLAlchemy's generic SQLite DATETIME parsing; rehydration reads many).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.String(32))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} refused: store timezone-aware UTC")
        if value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            # "YYYY-MM-DD HH:MM:SS.ffffff+00:00"; isoformat writes it in a third of strftime's time (a fifth of
            # a group commit's work was this line: bench.transitions, issue 13) and pads a year below 1000 to four
            # digits, which strftime's %Y did not (such a text did not parse back).
            return value.isoformat(" ", "microseconds")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            return datetime.fromisoformat(value)
        aware: datetime = value.astimezone(UTC)
        return aware

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        if dialect.name == "sqlite":  # skip the impl's own processing: the text is parsed once, here
            fromiso = datetime.fromisoformat
            return lambda value: None if value is None else fromiso(value)
        return super().result_processor(dialect, coltype)


class ExactDecimal(TypeDecorator[Decimal]):
    """NUMERIC on PostgreSQL; text on SQLite, whose numbers are binary floats."""

    impl = sa.String(64)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.Numeric(asdecimal=True))
        return dialect.type_descriptor(sa.String(64))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, Decimal) or not value.is_finite():
            raise ValueError(f"ExactDecimal needs a finite Decimal, got {value!r}")
        return value if dialect.name == "postgresql" else str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(value) if isinstance(value, str) else Decimal(str(value))

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        if dialect.name == "sqlite":  # text in, Decimal out, nothing in between
            return lambda value: None if value is None else Decimal(value)
        return super().result_processor(dialect, coltype)
