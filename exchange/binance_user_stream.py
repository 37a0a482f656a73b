"""Binance USDⓈ-M user-stream events read straight into our snapshots, without ccxt's caches (issue 13).

Through ccxt, one order update cost ~50 us of the event loop (a fill: parsing the trade for a cache nobody reads,
the order into a unified dict, the cache's linear search), one ACCOUNT_UPDATE ~30 us, and the stream's consumer
then converted ccxt's dicts again and swept its caches (~30 us an item): a 500-position cascade's ~2,000 user
frames were a third of the event loop's work (bench.burst). Here the three events the engine reads become
`OrderSnapshot`s and `PositionSnapshot`s in one step each, field for field what `CcxtExchange._order` and
`_position` make of ccxt's parsing of the same frame (tests/test_user_stream.py compares both on generated
frames and on the simulator's):

* ORDER_TRADE_UPDATE and ALGO_UPDATE (`o`): an order or a conditional (algo) order. Numbers ccxt hands over as
  floats are read through a float as it does (the same Decimal text comes out: "0.010" becomes 0.01).
* ACCOUNT_UPDATE (`a.P`): the positions it lists, stamped with the event time `E`.

And one market stream's event, for the same reason: markPriceUpdate (`<symbol>@markPrice@1s`, one frame per symbol
and second, ~35 us each through ccxt's ticker handling and the adapter's conversion, and the sweep after it converted
ccxt's whole ticker table) becomes a `MarkPrice` as `CcxtExchange.mark_prices` made of ccxt's ticker: the symbol
`s`, the price `p` read through a float, the event time `E`.

Differences, on purpose: an order's `fee` is the sum of the commissions (`n`) of every fill update of that order
seen on the stream (TRADE, and CALCULATED: a liquidation's), per currency (`FeeBook`; None when its fills paid in
more than one). ccxt's cache summed them only when it had seen the order's NEW first and otherwise kept the
first fill's; a single fill, the common case, gives the same figure both ways. A negative commission (a maker
rebate) counts as such; ccxt gave no fee for it. Its `realized_pnl` is the sum of their realized profits (`rp`,
each trade id once; `CcxtExchange._order` sums the frames ccxt reads the same way): Binance's `rp` is the
trade's own, and an order filled in several trades reported its last trade's profit.

Anything of a shape this does not know (a status or field Binance does not send, a number that is not text)
returns None: the frame then goes to ccxt as before, and its update reaches the engine through ccxt's watch.
"""
from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime
from decimal import Decimal, DecimalException
from typing import Any

from exchange.port import MarkPrice, OrderSnapshot, OrderTrade, PositionSnapshot
from lifecycle.domain import OrderStatus

# Binance's order and algo statuses as the adapter reads them (ccxt's parsed ones too: `CcxtExchange._order`); a
# status outside these goes to ccxt. TRIGGERED means the algo placed its order, not that anything filled: still
# working until FINISHED.
ORDER_STATUS = {
    "NEW": OrderStatus.OPEN, "PARTIALLY_FILLED": OrderStatus.OPEN, "FILLED": OrderStatus.FILLED,
    "CANCELED": OrderStatus.CANCELED, "EXPIRED": OrderStatus.EXPIRED, "EXPIRED_IN_MATCH": OrderStatus.EXPIRED,
    "REJECTED": OrderStatus.REJECTED,
}
ALGO_STATUS = {
    "NEW": OrderStatus.OPEN, "TRIGGERING": OrderStatus.OPEN, "TRIGGERED": OrderStatus.OPEN,
    "FINISHED": OrderStatus.FILLED, "CANCELED": OrderStatus.CANCELED, "EXPIRED": OrderStatus.EXPIRED,
    "REJECTED": OrderStatus.REJECTED,
}
# The execution types of a fill: a trade, and a liquidation's (or ADL's) execution, which carry the commission.
FILL_EXECUTIONS = ("TRADE", "CALCULATED")
FEE_BOOK_SIZE = 5_000  # orders whose fees are remembered (ccxt's order cache held as many: STREAM_CACHE)


class FeeBook:
    """The commissions and realized profits of each order's fills seen on the stream, by (symbol, order id):
    the commissions' currency and sum (None once fills paid in two currencies), and the realized profits' sum,
    each trade (`t`) counted once. Binance's `n` and `rp` are the trade's own, not the order's: an order filled in
    several trades reported only its last trade's profit. Bounded: the orders longest without a fill are
    forgotten first."""

    def __init__(self, size: int = FEE_BOOK_SIZE) -> None:
        self.size = size
        self._sums: OrderedDict[tuple[str, str], tuple[str, Decimal | None]] = OrderedDict()
        self._realized: OrderedDict[tuple[str, str], tuple[set[int], Decimal | None]] = OrderedDict()

    def add_realized(self, key: tuple[str, str], trade: int, realized: Decimal | None) -> None:
        """One trade (its id remembered: `seen`) and its realized profit, once per trade id (a frame seen twice,
        a cache converted again)."""
        prior = self._realized.pop(key) if key in self._realized else None
        trades, total = prior if prior is not None else (set(), None)
        if trade not in trades:
            trades.add(trade)
            if realized is not None:
                total = realized if total is None else total + realized
        self._realized[key] = (trades, total)
        if len(self._realized) > self.size:
            self._realized.popitem(last=False)

    def seen(self, key: tuple[str, str], trade: int) -> bool:
        """Whether this trade of the order was counted already (its frame seen twice)."""
        entry = self._realized.get(key)
        return entry is not None and trade in entry[0]

    def realized_of(self, key: tuple[str, str], default: Decimal | None) -> Decimal | None:
        """The order's realized profit over its trades seen; `default` when none was."""
        entry = self._realized.get(key)
        return entry[1] if entry is not None and entry[1] is not None else default

    def add(self, key: tuple[str, str], currency: str, cost: Decimal) -> None:
        prior = self._sums.pop(key, None)
        if prior is None:
            total: Decimal | None = cost
        elif prior[0] != currency or prior[1] is None:
            total = None
        else:
            total = prior[1] + cost
        self._sums[key] = (currency, total)
        if len(self._sums) > self.size:
            self._sums.popitem(last=False)

    def of(self, key: tuple[str, str]) -> Decimal | None:
        entry = self._sums.get(key)
        return entry[1] if entry is not None and entry[1] else None


def order_update(event: str, message: dict[str, Any], fees: FeeBook) -> OrderSnapshot | None:
    """The snapshot of an ORDER_TRADE_UPDATE or ALGO_UPDATE message; None: leave it to ccxt."""
    order = message.get("o")
    if not isinstance(order, dict):
        return None
    try:
        if event == "ALGO_UPDATE":
            return _algo(order, message)
        return _order(order, fees)
    except (DecimalException, ValueError, TypeError, OverflowError, OSError):
        return None  # a number that is not one, a time out of range: ccxt's reading decides what it means


def position_update(message: dict[str, Any]) -> list[PositionSnapshot] | None:
    """The snapshots of an ACCOUNT_UPDATE's positions (its frame checked: `a.P` a list of entries with `s` and
    `pa`); None: leave it to ccxt."""
    at = message.get("E")
    account = message.get("a")
    if type(at) is not int or not at or not isinstance(account, dict):
        return None
    entries = account.get("P", [])
    if not isinstance(entries, list):
        return None
    out = []
    try:
        stamp = _ms(at)
        for entry in entries:
            if not isinstance(entry, dict):
                return None
            symbol, amount, entry_price = entry.get("s"), entry.get("pa"), entry.get("ep")
            if type(symbol) is not str or not symbol or type(amount) is not str or not amount \
                    or not (entry_price is None or type(entry_price) is str):
                return None
            price = Decimal(entry_price) if entry_price else None
            if price is not None and not price.is_finite():
                return None
            out.append(PositionSnapshot(symbol, Decimal(amount), price or Decimal(0), stamp))
    except (DecimalException, ValueError, OverflowError, OSError):
        return None  # (a time out of range too)
    return out


def mark_update(message: dict[str, Any]) -> MarkPrice | None:
    """The mark of a markPriceUpdate message (its frame checked: `s` a market, `p` a number); None: leave it to
    ccxt. ccxt's ticker keeps `p` as its `markPrice` and `E` as its time; the adapter read the price through a
    float (a zero as Decimal(0)) and took a missing or zero time for now (here: left to ccxt, as is an options
    mark, `mp`, which ccxt prefers to `p`)."""
    symbol, price, at = message.get("s"), message.get("p"), message.get("E")
    if "mp" in message or type(symbol) is not str or not symbol or type(price) is not str \
            or type(at) is not int or not at:
        return None
    try:
        return MarkPrice(symbol, _via_float(price) or Decimal(0), _ms(at))
    except (DecimalException, ValueError, OverflowError, OSError):
        return None  # not a finite number, a time out of range


def trade_id(value: Any) -> int | None:
    """A fill's trade id (`t`): a positive integer, else None (not a trade's: nothing to count once)."""
    return value if type(value) is int and value > 0 else None


def order_trade(o: Any) -> OrderTrade | None:
    """The trade an order update (`o`) is about: a fill's (TRADE, or a liquidation's CALCULATED) quantity `l`,
    trade id `t`, realized profit `rp` and commission `n` in `N`; None for any other update, or for one whose
    trade reads as nothing (no quantity, a number that is not one). Both readings of a frame use it (ccxt's:
    `CcxtExchange._order` from `info`)."""
    if not isinstance(o, dict) or o.get("x") not in FILL_EXECUTIONS:
        return None
    try:
        quantity = _decimal(o.get("l"))
        if quantity is None or not quantity.is_finite() or quantity <= 0:
            return None
        realized, fee = _decimal(o.get("rp")), _decimal(o.get("n"))
        if (realized is not None and not realized.is_finite()) or (fee is not None and not fee.is_finite()):
            return None
    except DecimalException:
        return None
    currency = o.get("N")
    return OrderTrade(trade_id(o.get("t")), quantity, realized, fee, currency if type(currency) is str else "")


def _order(o: dict[str, Any], fees: FeeBook) -> OrderSnapshot | None:
    get = o.get
    status = ORDER_STATUS.get(get("X"))  # type: ignore[arg-type]
    if status is None or not _plain(o) or "aid" in o:
        return None
    symbol, order_id, at = get("s"), get("i"), get("T")
    if not symbol or type(at) is not int or not at or type(order_id) is not int:
        return None
    amount, filled = _amount_filled(o, status is OrderStatus.FILLED)
    average = _nonzero(get("ap"))
    if average is None and filled is not None and _text(get("Z")) is not None and Decimal(filled) > 0:
        return None  # ccxt would work the average out of the cost: its reading
    ident = str(order_id)
    # Everything that can fail is read before the fill's commission is counted (a frame left to ccxt counts none).
    quantity, filled_qty, average_price = _via_float(amount), _via_float(filled), _via_float(average)
    trigger, kind, realized, stamp = _via_float(_trigger(o)), _type(o), _decimal(get("rp")), _ms(at)
    commission, trade = _text(get("n")), trade_id(get("t"))  # each trade counted once
    own = order_trade(o)
    if get("x") in FILL_EXECUTIONS and not (trade is not None and fees.seen((symbol, ident), trade)):
        if commission is not None:
            fees.add((symbol, ident), get("N") or "", Decimal(commission))
        if trade is not None:
            fees.add_realized((symbol, ident), trade, realized)
    return OrderSnapshot(
        symbol=symbol,
        client_id=_client_id(o),
        exchange_order_id=ident,
        algo_id=None,
        side=(_text(get("S")) or "").lower(),
        type=kind,
        status=status,
        quantity=quantity or Decimal(0),
        filled=filled_qty or Decimal(0),
        average_price=average_price,
        trigger_price=trigger,
        reduce_only=get("R") is True,
        at=stamp,
        realized_pnl=fees.realized_of((symbol, ident), realized),
        fee=fees.of((symbol, ident)),
        trade=own,
    )


def _algo(o: dict[str, Any], message: dict[str, Any]) -> OrderSnapshot | None:
    get = o.get
    status = ALGO_STATUS.get(get("X"))  # type: ignore[arg-type]
    if status is None or not _plain(o) or "i" in o:
        return None
    symbol, algo_id, actual = get("s"), get("aid"), get("ai")
    at = get("T") if "T" in o else message.get("T")  # ccxt puts the event's T in when the algo has none
    if not symbol or type(at) is not int or not at or type(algo_id) is not int \
            or not (actual is None or type(actual) is int or type(actual) is str):
        return None
    amount, _ = _amount_filled(o, get("X") in ("TRIGGERED", "FINISHED"))
    return OrderSnapshot(
        symbol=symbol,
        client_id=_client_id(o),
        exchange_order_id=str(actual) if actual not in (None, "") else None,
        algo_id=str(algo_id),
        side=(_text(get("S")) or "").lower(),
        type=_text(get("o")) or "STOP_MARKET",
        status=status,
        quantity=_via_float(amount) or Decimal(0),
        filled=_decimal(get("aq")) or Decimal(0),
        average_price=_decimal(get("ap")) or None,
        trigger_price=_via_float(_trigger(o)),
        reduce_only=get("R") is True,
        at=_ms(at),
        realized_pnl=_decimal(get("rp")),
        fee=None,
    )


# The fields read as text (numbers included: Binance sends them as text); any other type goes to ccxt.
_TEXT_FIELDS = ("s", "X", "x", "S", "o", "C", "c", "caid", "N", "q", "z", "Z", "ap", "aq", "p", "P", "sp", "tp",
                "rp", "n")


def _plain(o: dict[str, Any]) -> bool:
    """The futures shape: a contract order (`ps`), not a whole message (`e`), every text field text."""
    if "ps" not in o or "e" in o or type(o.get("s")) is not str:
        return False
    get = o.get
    for key in _TEXT_FIELDS:
        value = get(key)
        if value is not None and type(value) is not str:
            return False
    return type(o.get("R")) in (bool, type(None))


def _amount_filled(o: dict[str, Any], closed: bool) -> tuple[str | None, str | None]:
    """ccxt's amount and filled: a zero amount is absent; a closed order's missing one is the other."""
    amount, filled = _nonzero(o.get("q")), _text(o.get("z"))
    if amount is None and closed:
        amount = filled
    if filled is None and closed:
        filled = amount
    return amount, filled


def _client_id(o: dict[str, Any]) -> str | None:
    """ccxt's clientOrderId (C, then caid, then c, the first not empty), else the algo's own `caid` as it is."""
    get = o.get
    return _text(get("C")) or _text(get("caid")) or _text(get("c")) or get("caid")


def _trigger(o: dict[str, Any]) -> str | None:
    get = o.get
    return _nonzero(_text(get("P")) or _text(get("sp")) or _text(get("tp")))


def _type(o: dict[str, Any]) -> str:
    kind = _text(o.get("o"))
    if kind is None:
        raise ValueError("an order update without its type")  # ccxt's reading decides
    return kind


# --- ccxt's readings, one by one ---------------------------------------------------------------------------------

def _text(value: Any) -> str | None:
    """Text as it is; empty text and anything else as absent (ccxt's safe_string for the text Binance sends)."""
    return value if type(value) is str and value else None


def _nonzero(value: Any) -> str | None:
    """ccxt's omit_zero: absent when it reads as zero."""
    text = _text(value)
    return text if text is not None and float(text) != 0 else None


def _via_float(text: str | None) -> Decimal | None:
    """What the adapter makes of a number ccxt hands over as a float (ccxt's parse_number, then Decimal(str())):
    the shortest text of the float ("0.010" comes out as 0.01)."""
    if text is None:
        return None
    number = float(text)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite number: {text!r}")
    return Decimal(str(number))


def _decimal(value: Any) -> Decimal | None:
    """A number the adapter reads from Binance's own payload (`info`), as text."""
    return Decimal(value) if type(value) is str and value else None


def _ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, tz=UTC)

