"""Why a position went flat, decided from the order that flattened it (DESIGN: closure causes).

Binance USDⓈ-M names the exchange's own closing orders by client id: "autoclose-..." is a liquidation,
"adl_autoclose" an auto-deleveraging, "settlement_autoclose-..." a delisting settlement. Our own
orders carry our namespace (lifecycle.client_ids). Anything else was placed by someone else: manual.
"""
from __future__ import annotations

from lifecycle.client_ids import parse_client_id
from lifecycle.domain import CloseCause, OrderPurpose


def classify_close(client_order_id: str | None, *, position_id: str, trailing_was_active: bool) -> CloseCause:
    """The cause of a close from the flattening order's client id; `unknown` when there is none."""
    if not client_order_id:
        return CloseCause.UNKNOWN
    if client_order_id.startswith("autoclose-"):
        return CloseCause.LIQUIDATION
    if client_order_id.startswith("adl_autoclose"):
        return CloseCause.ADL
    if client_order_id.startswith("settlement_autoclose-"):
        return CloseCause.SETTLEMENT
    ours = parse_client_id(client_order_id)
    if ours is None or ours.position_id != position_id:
        return CloseCause.MANUAL  # another client, or an order of ours for another position (should not happen)
    if ours.purpose is OrderPurpose.STOP:
        return CloseCause.TRAILING_STOP if trailing_was_active else CloseCause.STOP_LOSS
    if ours.purpose is OrderPurpose.TAKE_PROFIT:
        return CloseCause.TAKE_PROFIT
    if ours.purpose is OrderPurpose.CLOSE:
        return CloseCause.BOT
    return CloseCause.UNKNOWN  # our entry order cannot flatten a position
