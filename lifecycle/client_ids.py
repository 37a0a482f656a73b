"""Our client-order-id namespace: `lc-<position id>-<purpose letter><attempt>`.

Binance allows 36 characters of [.A-Z:/a-z0-9_-]; a 20-character position id leaves room for an
attempt number up to 9,999,999. The id is deterministic for (position, purpose, attempt), so a
retried or resumed request reuses it and the exchange refuses a duplicate instead of opening twice.
Orders whose client id does not parse are not ours and are never touched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lifecycle.domain import OrderPurpose

PREFIX = "lc-"
MAX_LENGTH = 36
_LETTER = {OrderPurpose.ENTRY: "e", OrderPurpose.STOP: "s", OrderPurpose.TAKE_PROFIT: "t", OrderPurpose.CLOSE: "c"}
_PURPOSE = {v: k for k, v in _LETTER.items()}
_PATTERN = re.compile(r"^lc-([0-9a-f]{20})-([estc])(\d{1,7})$")
_ALLOWED = re.compile(r"^[.A-Za-z0-9:/_-]{1,36}$")


@dataclass(frozen=True, slots=True)
class ClientId:
    position_id: str
    purpose: OrderPurpose
    attempt: int

    def __str__(self) -> str:
        return f"{PREFIX}{self.position_id}-{_LETTER[self.purpose]}{self.attempt}"


def make_client_id(position_id: str, purpose: OrderPurpose, attempt: int = 0) -> str:
    if not re.fullmatch(r"[0-9a-f]{20}", position_id):
        raise ValueError(f"position id {position_id!r} is not 20 lowercase hex characters")
    if not 0 <= attempt <= 9_999_999:
        raise ValueError(f"attempt must be in 0..9999999, got {attempt}")
    value = str(ClientId(position_id, purpose, attempt))
    assert len(value) <= MAX_LENGTH and _ALLOWED.match(value)
    return value


def parse_client_id(value: str | None) -> ClientId | None:
    """Our id decoded, or None for anything that is not ours."""
    match = _PATTERN.match(value or "")
    if match is None:
        return None
    return ClientId(match.group(1), _PURPOSE[match.group(2)], int(match.group(3)))
