"""An in-memory order book that accepts and cancels our orders; no prices, no fills.

It is the exchange of the foundation demo and of the engine-core tests, until the Binance USDⓈ-M
venue simulator (reached through the real ccxt client) replaces it. It is a real implementation of
`OrderCanceller`, not a mock: it refuses unknown orders and can be told to fail.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from lifecycle.domain import OrderRef, OrderStatus


class PaperOrderNotFound(LookupError):
    pass


class PaperExchangeDown(ConnectionError):
    pass


@dataclass
class PaperExchange:
    orders: dict[str, OrderRef] = field(default_factory=dict)  # by client id, as the exchange sees them
    down: bool = False  # when True every call fails as a network error would
    cancel_calls: list[str] = field(default_factory=list)

    async def place_order(self, order: OrderRef) -> OrderRef:
        self._check_up()
        placed = replace(order, status=OrderStatus.OPEN,  # the venue keeps its own copy
                         exchange_order_id=order.exchange_order_id or f"paper-{len(self.orders) + 1}")
        self.orders[order.client_id] = placed
        return placed

    async def cancel_order(self, order: OrderRef) -> None:
        self.cancel_calls.append(order.client_id)
        self._check_up()
        placed = self.orders.get(order.client_id)
        if placed is None or placed.status.is_final:
            raise PaperOrderNotFound(f"no open order {order.client_id}")
        placed.status = OrderStatus.CANCELED

    def open_orders(self, position_id: str | None = None) -> list[OrderRef]:
        return [
            o
            for o in self.orders.values()
            if not o.status.is_final and (position_id is None or o.position_id == position_id)
        ]

    def _check_up(self) -> None:
        if self.down:
            raise PaperExchangeDown("paper exchange is down")
