"""The simulated venue's state and matching: accounts, positions, orders, algo orders, mark prices.

Single-threaded (one asyncio loop); every mutation emits user-data events in Binance's order:
a fill that changes a position sends ACCOUNT_UPDATE first, then the fill's ORDER_TRADE_UPDATE.
Conditional orders live in the Algo Service (/fapi/v1/algoOrder, ALGO_UPDATE), as on Binance
since 2025-12-09; a triggered one becomes a market order carrying the algo's client id.
"""
from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_UP
from decimal import Decimal as D
from typing import Any

ZERO = D(0)


class SimError(Exception):
    """A Binance error answer: HTTP status, code and message, as the real venue sends them."""

    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(f"{code}: {msg}")
        self.code, self.msg, self.status = code, msg, status


ERR_UNKNOWN_ORDER = (-2011, "Unknown order sent.")
ERR_WOULD_TRIGGER = (-2021, "Order would immediately trigger.")
ERR_REDUCE_ONLY = (-2022, "ReduceOnly Order is rejected.")
ERR_USE_ALGO = (-4120, "Order type not supported for this endpoint. Please use the Algo Order API endpoints instead.")
ERR_BAD_SYMBOL = (-1121, "Invalid symbol.")
ERR_BAD_PARAM = (-1102, "Mandatory parameter was not sent, was empty/null, or malformed.")
ERR_MARGIN = (-2019, "Margin is insufficient.")
ERR_DUPLICATE = (-4116, "ClientOrderId is duplicated.")
TAKER_FEE = D("0.0004")


@dataclass(frozen=True)
class SymbolSpec:
    symbol: str
    base: str
    tick: D = D("0.1")
    step: D = D("0.001")
    min_qty: D = D("0.001")
    mark: D = D(100)


@dataclass
class VenueConfig:
    """Symbols and starting state. The simulator has one price per symbol, the mark: stops trigger on it
    whatever their workingType (the adapter asks for MARK_PRICE), and orders fill at it."""

    symbols: tuple[SymbolSpec, ...] = (
        SymbolSpec("BTCUSDT", "BTC", D("0.1"), D("0.001"), D("0.001"), D(60000)),
        SymbolSpec("ETHUSDT", "ETH", D("0.01"), D("0.001"), D("0.001"), D(3000)),
        SymbolSpec("SOLUSDT", "SOL", D("0.01"), D("0.01"), D("0.01"), D(150)),
        SymbolSpec("XRPUSDT", "XRP", D("0.0001"), D("0.1"), D("0.1"), D("0.6")),
        SymbolSpec("DOGEUSDT", "DOGE", D("0.00001"), D(1), D(1), D("0.2")),
        SymbolSpec("ADAUSDT", "ADA", D("0.0001"), D(1), D(1), D("0.45")),
    )
    initial_balance: D = D(100_000)
    leverage: int = 20
    maint_margin_rate: D = D("0.004")  # Binance's first bracket for BTCUSDT (leverageBracket answers the same)

    @classmethod
    def with_symbols(cls, count: int) -> VenueConfig:
        """The six real symbols, then synthetic ones (`X007USDT`, mark 100) up to `count` in all: for a burst
        over many symbols at once (bench/burst.py)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        real = cls().symbols
        extra = tuple(SymbolSpec(f"X{i:03d}USDT", f"X{i:03d}", D("0.01"), D("0.001"), D("0.001"), D(100))
                      for i in range(len(real) + 1, count + 1))
        return cls(symbols=real[:count] + extra)


@dataclass
class SimPosition:
    amount: D = ZERO  # signed: > 0 long, < 0 short (one-way mode, positionSide BOTH)
    entry: D = ZERO
    realized: D = ZERO
    updated: int = 0


@dataclass
class SimOrder:
    order_id: int
    client_id: str
    symbol: str
    side: str  # BUY / SELL
    type: str  # MARKET / LIMIT / LIQUIDATION
    qty: D
    price: D = ZERO
    reduce_only: bool = False
    status: str = "NEW"
    filled: D = ZERO
    avg: D = ZERO
    time: int = 0
    update: int = 0
    orig_type: str | None = None
    stop_price: D = ZERO
    realized: D = ZERO
    account: str = ""

    @property
    def shown_status(self) -> str:
        """`status` as Binance shows it: a working order with fills is PARTIALLY_FILLED (kept NEW here, for
        the open-order lists and cancels)."""
        return "PARTIALLY_FILLED" if self.status == "NEW" and self.filled > 0 else self.status


@dataclass
class SimAlgo:
    algo_id: int
    client_id: str
    symbol: str
    side: str
    order_type: str  # STOP_MARKET / TAKE_PROFIT_MARKET
    qty: D
    trigger: D
    reduce_only: bool
    close_position: bool
    working_type: str = "CONTRACT_PRICE"
    status: str = "NEW"
    created: int = 0
    updated: int = 0
    triggered: int = 0
    actual_order_id: int | None = None
    avg_price: D = ZERO  # of the order it triggered
    filled: D = ZERO
    reject_reason: str = ""
    account: str = ""


@dataclass
class SimTrade:
    trade_id: int
    order_id: int
    symbol: str
    side: str
    price: D
    qty: D
    realized: D
    fee: D
    time: int
    maker: bool = False


@dataclass
class Account:
    name: str
    api_key: str
    secret: str
    wallet: D
    positions: dict[str, SimPosition] = field(default_factory=dict)
    orders: dict[int, SimOrder] = field(default_factory=dict)
    algos: dict[int, SimAlgo] = field(default_factory=dict)
    trades: list[SimTrade] = field(default_factory=list)
    can_trade: bool = True  # accountConfig / account v2 `canTrade` (orders are not refused: see Faults)
    dual_side_position: bool = False  # hedge mode (positionSide/dual); orders without LONG/SHORT answer -4061
    revoked: bool = False  # the key was deleted or disabled: every keyed request answers -2015


def now_ms() -> int:
    return int(time.time() * 1000)


def fmt(value: D) -> str:
    """Binance prints decimals as plain strings."""
    return format(value.normalize(), "f") if value else "0"


Listener = Callable[[str, dict[str, Any]], None]  # (account name, user-data event)


class Venue:
    def __init__(self, config: VenueConfig | None = None) -> None:
        self.config = config or VenueConfig()
        self.specs = {s.symbol: s for s in self.config.symbols}
        self.marks: dict[str, D] = {s.symbol: s.mark for s in self.config.symbols}
        self.accounts: dict[str, Account] = {}  # by api key
        self.keep_stops_when_flat = False  # the simulator's fault of that name
        self._ids = itertools.count(8_000_000_000)
        self._algo_ids = itertools.count(1_000)
        self._trade_ids = itertools.count(500_000)
        self.user_listeners: list[Listener] = []
        self.mark_listeners: list[Callable[[str, D], None]] = []

    # --- accounts --------------------------------------------------------------------------------

    def add_account(self, name: str, api_key: str | None = None, secret: str | None = None) -> Account:
        account = Account(name, api_key or secrets.token_hex(16), secret or secrets.token_hex(32),
                          self.config.initial_balance)
        self.accounts[account.api_key] = account
        return account

    def account(self, api_key: str) -> Account | None:
        return self.accounts.get(api_key)

    def spec(self, symbol: str) -> SymbolSpec:
        spec = self.specs.get(symbol)
        if spec is None:
            raise SimError(*ERR_BAD_SYMBOL)
        return spec

    def position(self, account: Account, symbol: str) -> SimPosition:
        return account.positions.setdefault(symbol, SimPosition())

    # --- prices ----------------------------------------------------------------------------------

    def set_mark(self, symbol: str, price: D) -> None:
        spec = self.spec(symbol)
        self.marks[symbol] = price.quantize(spec.tick, rounding=ROUND_DOWN) if price > spec.tick else spec.tick
        for listener in list(self.mark_listeners):
            listener(symbol, self.marks[symbol])
        self._check_triggers(symbol)

    def _check_triggers(self, symbol: str) -> None:
        mark = self.marks[symbol]
        for account in list(self.accounts.values()):
            for algo in [a for a in account.algos.values() if a.symbol == symbol and a.status == "NEW"]:
                if self._crossed(algo, mark):
                    self._trigger(account, algo)
            for order in [o for o in account.orders.values() if o.symbol == symbol and o.status == "NEW"
                          and o.type == "LIMIT"]:
                if (order.side == "BUY" and mark <= order.price) or (order.side == "SELL" and mark >= order.price):
                    self._fill(account, order, order.price)

    @staticmethod
    def _crossed(algo: SimAlgo, mark: D) -> bool:
        # A SELL stop triggers when the mark falls to it; a SELL take-profit when it rises to it.
        stop_like = algo.order_type.startswith("STOP")
        if algo.side == "SELL":
            return mark <= algo.trigger if stop_like else mark >= algo.trigger
        return mark >= algo.trigger if stop_like else mark <= algo.trigger

    def liquidation_price(self, account: Account, symbol: str) -> D | None:
        """Where the position would be liquidated (None when flat), an isolated-margin approximation: the
        margin is notional / leverage, and the position goes when its loss eats that margin down to the
        maintenance margin (maintenance margin rate × notional), fees and funding ignored:

            long:  entry × (1 - 1/leverage + mmr)
            short: entry × (1 + 1/leverage - mmr)

        At 20x and mmr 0.4 % a long goes 4.6 % below its entry. Rounded to the tick towards the entry (a long's
        up, a short's down): the price is on the losing side of the entry, never beyond the formula's."""
        pos = self.position(account, symbol)
        if pos.amount == 0:
            return None
        spec = self.spec(symbol)
        step = 1 / D(self.config.leverage) - self.config.maint_margin_rate
        if pos.amount > 0:
            return (pos.entry * (1 - step)).quantize(spec.tick, rounding=ROUND_UP)
        return (pos.entry * (1 + step)).quantize(spec.tick, rounding=ROUND_DOWN)

    # --- orders ----------------------------------------------------------------------------------

    def new_order(self, account: Account, *, symbol: str, side: str, type_: str, quantity: D, price: D | None,
                  client_id: str | None, reduce_only: bool, time_in_force: str | None = None) -> SimOrder:
        spec = self.spec(symbol)
        if type_ in {"STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"}:
            raise SimError(*ERR_USE_ALGO)
        if type_ not in {"MARKET", "LIMIT"} or side not in {"BUY", "SELL"} or quantity <= 0:
            raise SimError(*ERR_BAD_PARAM)
        if type_ == "LIMIT" and not price:
            raise SimError(*ERR_BAD_PARAM)
        quantity = quantity.quantize(spec.step, rounding=ROUND_DOWN)
        self._refuse_open_duplicate(account, client_id)
        order = SimOrder(next(self._ids), client_id or f"sim{secrets.token_hex(8)}", symbol, side, type_, quantity,
                         price or ZERO, reduce_only, time=now_ms(), update=now_ms(), account=account.name)
        if reduce_only:
            pos = self.position(account, symbol)
            closing = (pos.amount > 0 and side == "SELL") or (pos.amount < 0 and side == "BUY")
            if not closing:
                raise SimError(*ERR_REDUCE_ONLY)
            order.qty = min(order.qty, abs(pos.amount))
        account.orders[order.order_id] = order
        self._emit_order(account, order, "NEW", ZERO, ZERO)
        mark = self.marks[symbol]
        if type_ == "MARKET":
            self._fill(account, order, mark)
        elif (side == "BUY" and order.price >= mark) or (side == "SELL" and order.price <= mark):
            self._fill(account, order, mark)  # marketable: fills at once (as a taker, at the mark)
        return order

    @staticmethod
    def _refuse_open_duplicate(account: Account, client_id: str | None) -> None:
        """Binance: a client order id must be unique among open orders (a filled one may be reused)."""
        if (client_id and any(o.client_id == client_id and o.status == "NEW" for o in account.orders.values())) or \
                (client_id and any(a.client_id == client_id and a.status == "NEW" for a in account.algos.values())):
            raise SimError(*ERR_DUPLICATE)

    def cancel_order(self, account: Account, symbol: str, order_id: int | None, client_id: str | None) -> SimOrder:
        order = self._find_order(account, symbol, order_id, client_id)
        if order is None or order.status != "NEW":
            raise SimError(*ERR_UNKNOWN_ORDER)
        order.status, order.update = "CANCELED", now_ms()
        self._emit_order(account, order, "CANCELED", ZERO, ZERO)
        return order

    def _find_order(self, account: Account, symbol: str, order_id: int | None,
                    client_id: str | None) -> SimOrder | None:
        if order_id is not None:
            order = account.orders.get(order_id)
            return order if order and order.symbol == symbol else None
        return next((o for o in account.orders.values() if o.client_id == client_id and o.symbol == symbol), None)

    def new_algo(self, account: Account, *, symbol: str, side: str, order_type: str, quantity: D | None,
                 trigger: D, client_id: str | None, reduce_only: bool, close_position: bool,
                 working_type: str = "CONTRACT_PRICE") -> SimAlgo:
        spec = self.spec(symbol)
        if order_type not in {"STOP_MARKET", "TAKE_PROFIT_MARKET"} or side not in {"BUY", "SELL"} or trigger <= 0:
            raise SimError(*ERR_BAD_PARAM)
        if not close_position and (quantity is None or quantity <= 0):
            raise SimError(*ERR_BAD_PARAM)
        self._refuse_open_duplicate(account, client_id)
        algo = SimAlgo(next(self._algo_ids), client_id or f"sim{secrets.token_hex(8)}", symbol, side, order_type,
                       (quantity or ZERO).quantize(spec.step, rounding=ROUND_DOWN),
                       trigger.quantize(spec.tick, rounding=ROUND_DOWN), reduce_only, close_position, working_type,
                       created=now_ms(), updated=now_ms(), account=account.name)
        if self._crossed(algo, self.marks[symbol]):
            raise SimError(*ERR_WOULD_TRIGGER)
        account.algos[algo.algo_id] = algo
        self._emit_algo(account, algo)
        return algo

    def cancel_algo(self, account: Account, algo_id: int | None, client_id: str | None) -> SimAlgo:
        algo = account.algos.get(algo_id) if algo_id is not None else next(
            (a for a in account.algos.values() if a.client_id == client_id), None)
        if algo is None or algo.status != "NEW":
            raise SimError(*ERR_UNKNOWN_ORDER)
        algo.status, algo.updated = "CANCELED", now_ms()
        self._emit_algo(account, algo)
        return algo

    def _trigger(self, account: Account, algo: SimAlgo) -> None:
        algo.status, algo.triggered, algo.updated = "TRIGGERING", now_ms(), now_ms()
        self._emit_algo(account, algo)
        pos = self.position(account, algo.symbol)
        qty = abs(pos.amount) if algo.close_position else algo.qty
        if (algo.reduce_only or algo.close_position) and (
            pos.amount == 0 or (pos.amount > 0) == (algo.side == "BUY")
        ):
            algo.status, algo.reject_reason = "EXPIRED", "Reduce Only reject"
            self._emit_algo(account, algo)
            return
        order = SimOrder(next(self._ids), algo.client_id, algo.symbol, algo.side, "MARKET", qty,
                         reduce_only=algo.reduce_only or algo.close_position, time=now_ms(), update=now_ms(),
                         orig_type=algo.order_type, stop_price=algo.trigger, account=account.name)
        if order.reduce_only:
            order.qty = min(order.qty, abs(pos.amount))
        account.orders[order.order_id] = order
        algo.actual_order_id, algo.status = order.order_id, "TRIGGERED"
        self._emit_algo(account, algo)
        self._emit_order(account, order, "NEW", ZERO, ZERO)
        self._fill(account, order, self.marks[algo.symbol])
        algo.avg_price, algo.filled = order.avg, order.filled
        algo.status, algo.updated = "FINISHED", now_ms()
        self._emit_algo(account, algo)

    def funding(self, account: Account, symbol: str) -> None:
        """A funding event: Binance sends an ACCOUNT_UPDATE (reason FUNDING_FEE) carrying the position."""
        self._emit(account, self._account_update(account, symbol, "FUNDING_FEE"))

    def vanish(self, account: Account, symbol: str) -> None:
        """The position disappears with no order, no fill and no event (data lost on the venue's side): what
        a phantom looks like. Its stops stay working."""
        pos = self.position(account, symbol)
        pos.amount, pos.entry, pos.updated = ZERO, ZERO, now_ms()

    def force_close(self, account: Account, symbol: str, kind: str) -> SimOrder:
        """Close a position the way the exchange or another client would: liquidation, adl, settlement, manual.

        A liquidation fills at the position's liquidation price (`liquidation_price`), wherever the mark is:
        the venue's liquidation engine takes the position over there (move the mark to it first for a
        believable market, as the demo does). The others fill at the mark."""
        pos = self.position(account, symbol)
        if pos.amount == 0:
            raise SimError(-2022, "No position to close.")
        price = self.liquidation_price(account, symbol) if kind == "liquidation" else self.marks[symbol]
        side = "SELL" if pos.amount > 0 else "BUY"
        ts = now_ms()
        client_id, type_ = {
            "liquidation": (f"autoclose-{ts}", "LIQUIDATION"),
            "adl": ("adl_autoclose", "LIQUIDATION"),
            "settlement": (f"settlement_autoclose-{ts}", "MARKET"),
            "manual": (f"web_{secrets.token_hex(8)}", "MARKET"),
        }[kind]
        order = SimOrder(next(self._ids), client_id, symbol, side, type_, abs(pos.amount), reduce_only=True,
                         time=ts, update=ts, account=account.name)
        account.orders[order.order_id] = order
        if kind == "manual":
            self._emit_order(account, order, "NEW", ZERO, ZERO)
        assert price is not None  # not flat
        self._fill(account, order, price)
        return order

    # --- fills -----------------------------------------------------------------------------------

    def fill_partially(self, account: Account, order_id: int, quantity: D) -> SimOrder:
        """Fill part of a resting LIMIT order at its price (another trader took that much of it): the order
        stays NEW (PARTIALLY_FILLED on Binance) with the rest working, as a fill update with x=TRADE says."""
        order = account.orders.get(order_id)
        if order is None or order.status != "NEW" or order.type != "LIMIT":
            raise SimError(*ERR_UNKNOWN_ORDER)
        step = self.spec(order.symbol).step
        quantity = quantity.quantize(step, rounding=ROUND_DOWN)
        if not ZERO < quantity < order.qty - order.filled:
            raise SimError(*ERR_BAD_PARAM)
        self._fill(account, order, order.price, quantity)
        return order

    def _fill(self, account: Account, order: SimOrder, price: D, quantity: D | None = None) -> None:
        """Fill `quantity` of the order (all that is left when None) at `price`."""
        pos = self.position(account, order.symbol)
        this = order.qty - order.filled if quantity is None else quantity
        signed = this if order.side == "BUY" else -this
        realized = ZERO
        if pos.amount == 0 or (pos.amount > 0) == (signed > 0):  # open or add
            new_amount = pos.amount + signed
            pos.entry = (pos.entry * abs(pos.amount) + price * abs(signed)) / abs(new_amount)
            pos.amount = new_amount
        else:  # reduce, close or flip
            closing = min(abs(signed), abs(pos.amount))
            direction = 1 if pos.amount > 0 else -1
            realized = (price - pos.entry) * closing * direction
            remainder = abs(signed) - closing
            pos.amount += signed
            if pos.amount == 0:
                pos.entry = ZERO
            elif remainder > 0:
                pos.entry = price
        fee = (price * this * TAKER_FEE).quantize(D("0.00000001"))
        pos.realized += realized
        pos.updated = now_ms()
        account.wallet += realized - fee
        order.avg = (order.avg * order.filled + price * this) / (order.filled + this)
        order.filled += this
        order.realized += realized
        order.update = now_ms()
        if order.filled >= order.qty:
            order.status = "FILLED"
        account.trades.append(SimTrade(next(self._trade_ids), order.order_id, order.symbol, order.side, price,
                                       this, realized, fee, now_ms()))
        # Binance order: ACCOUNT_UPDATE with the new position first, then the fill's ORDER_TRADE_UPDATE.
        self._emit(account, self._account_update(account, order.symbol, "ORDER"))
        self._emit_order(account, order, "TRADE", this, price, fee=fee, realized=realized)
        if pos.amount == 0 and not self.keep_stops_when_flat:
            for algo in [a for a in account.algos.values() if a.symbol == order.symbol and a.status == "NEW"
                         and (a.reduce_only or a.close_position)]:
                algo.status, algo.updated = "EXPIRED", now_ms()  # a reduce-only stop on a flat symbol expires
                self._emit_algo(account, algo)

    # --- user-data events ------------------------------------------------------------------------

    def _emit(self, account: Account, event: dict[str, Any]) -> None:
        for listener in list(self.user_listeners):
            listener(account.name, event)

    def _account_update(self, account: Account, symbol: str, reason: str) -> dict[str, Any]:
        pos = self.position(account, symbol)
        ts = now_ms()
        return {
            "e": "ACCOUNT_UPDATE", "E": ts, "T": ts,
            "a": {
                "m": reason,
                "B": [{"a": "USDT", "wb": fmt(account.wallet), "cw": fmt(account.wallet), "bc": "0"}],
                "P": [{"s": symbol, "pa": fmt(pos.amount), "ep": fmt(pos.entry), "bep": fmt(pos.entry),
                       "cr": fmt(pos.realized), "up": fmt(self._upnl(symbol, pos)), "mt": "cross", "iw": "0",
                       "ps": "BOTH"}],
            },
        }

    def _upnl(self, symbol: str, pos: SimPosition) -> D:
        return (self.marks[symbol] - pos.entry) * pos.amount if pos.amount else ZERO

    def _emit_order(self, account: Account, order: SimOrder, execution: str, last_qty: D, last_price: D,
                    fee: D = ZERO, realized: D = ZERO) -> None:
        """An ORDER_TRADE_UPDATE. As on Binance, `n` (commission) and `rp` (realized profit) are this trade's own
        (0 for an update that is not a trade), not the order's sums."""
        ts = now_ms()
        self._emit(account, {
            "e": "ORDER_TRADE_UPDATE", "E": ts, "T": ts,
            "o": {
                "s": order.symbol, "c": order.client_id, "S": order.side, "o": order.type, "f": "GTC",
                "q": fmt(order.qty), "p": fmt(order.price), "ap": fmt(order.avg), "sp": fmt(order.stop_price),
                "x": execution, "X": order.shown_status, "i": order.order_id, "l": fmt(last_qty),
                "z": fmt(order.filled), "L": fmt(last_price), "N": "USDT", "n": fmt(fee), "T": ts,
                "t": next(self._trade_ids) if last_qty else 0,
                "b": "0", "a": "0", "m": False, "R": order.reduce_only, "wt": "CONTRACT_PRICE",
                "ot": order.orig_type or order.type, "ps": "BOTH", "cp": False, "rp": fmt(realized),
                "pP": False, "si": 0, "ss": 0, "V": "EXPIRE_TAKER", "pm": "NONE", "gtd": 0, "er": "0",
            },
        })

    def _emit_algo(self, account: Account, algo: SimAlgo) -> None:
        ts = now_ms()
        self._emit(account, {"e": "ALGO_UPDATE", "T": ts, "E": ts, "o": self.algo_event_body(algo)})

    @staticmethod
    def algo_event_body(algo: SimAlgo) -> dict[str, Any]:
        body: dict[str, Any] = {
            "caid": algo.client_id, "aid": algo.algo_id, "at": "CONDITIONAL", "o": algo.order_type,
            "s": algo.symbol, "S": algo.side, "ps": "BOTH", "f": "GTC", "q": fmt(algo.qty), "X": algo.status,
            "ai": str(algo.actual_order_id) if algo.actual_order_id is not None else "",
            "ap": fmt(algo.avg_price), "aq": fmt(algo.filled), "act": "0", "tp": fmt(algo.trigger), "p": "0",
            "V": "EXPIRE_MAKER", "wt": algo.working_type, "pm": "NONE", "cp": algo.close_position,
            "pP": False, "R": algo.reduce_only, "tt": algo.triggered, "gtd": 0, "rm": algo.reject_reason,
        }
        return body

    # --- read models for REST --------------------------------------------------------------------

    def open_orders(self, account: Account, symbol: str | None) -> list[SimOrder]:
        return [o for o in account.orders.values() if o.status == "NEW" and (symbol is None or o.symbol == symbol)]

    def open_algos(self, account: Account, symbol: str | None) -> list[SimAlgo]:
        return [a for a in account.algos.values() if a.status == "NEW" and (symbol is None or a.symbol == symbol)]
