"""ccxt's parsing of a Binance USDⓈ-M order update, without its generic detours (issue 13).

In a cascade every position brings two or three order updates (its closing fill, its stop's expiry), and
ccxt's `parse_ws_order` was half of ccxt's work per such frame (33 us of ~73 us for a fill, measured): most
of it in `safe_order`'s generic branches for shapes a futures update never has (trades to sum, fees to
reduce, a spot order report) and in Precise's text arithmetic. `lean_order` builds the same unified order
for the one shape the futures streams send (ORDER_TRADE_UPDATE's and ALGO_UPDATE's `o`: a contract order,
its numbers as text) in 11 us (a fill) and 8 us (an algo update; ccxt 25 us): ccxt's own calls for the
symbol, the status, the type, the fee's currency and the ISO time; exact Decimal sums and products where
ccxt uses Precise (the same floats come out); Precise itself for the one division. Anything else returns
None and ccxt parses it. tests/test_binance_lean.py compares both on generated updates of every status,
execution type and order type, and on the simulator's.
"""
from __future__ import annotations

from decimal import Context, Decimal, DecimalException, DivisionByZero, Inexact, InvalidOperation, Overflow
from typing import Any

from ccxt.base.precise import Precise

# Precise's sums and products are exact; so are Decimal's within this many digits (a price times a quantity
# needs ~30 at most), and a result that would need more raises (Inexact): ccxt parses that update itself. Their
# floats (all ccxt keeps of them) are then the same.
_EXACT = Context(prec=80, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])

_TAKE_PROFIT = ("take_profit", "take_profit_market", "take_profit_limit")
_TEXT = ("q", "z", "Z", "ap", "p", "P", "sp", "tp", "n")  # numbers Binance sends as text
_OPENED_AT = ("NEW", "AMENDMENT", "CANCELED")  # execution types whose T is the order's time too


def lean_order(ex: Any, order: Any) -> dict[str, Any] | None:
    """`ex.parse_ws_order(order)` for a futures order update, or None where ccxt must parse it itself."""
    try:
        return _lean_order(ex, order)
    except (DecimalException, ValueError, TypeError):
        return None  # a number that is not one: ccxt's own parsing decides what that means


def _lean_order(ex: Any, order: Any) -> dict[str, Any] | None:
    if getattr(ex, "number", None) is not float:
        return None  # ccxt set to give its numbers as text or Decimal: its own parsing does that
    if not isinstance(order, dict) or "ps" not in order or "e" in order:
        return None  # not a contract order update (a spot report, a stock order, a whole message)
    get = order.get
    for key in _TEXT:
        value = get(key)
        if value is not None and type(value) is not str:
            return None
    market_id, raw_status = get("s"), get("X")
    if type(market_id) is not str or type(raw_status) is not str or not market_id or not raw_status:
        return None
    execution = get("x")
    timestamp = _integer(get("O"))
    at = _integer(get("T"))
    last_trade = None
    if execution in _OPENED_AT:
        if timestamp is None:
            timestamp = at
    elif execution == "TRADE":
        last_trade = at
    if "aid" in order and timestamp is None and raw_status in ("NEW", "CANCELED"):
        timestamp = at
    fee = None
    fee_cost = _text(get("n"))
    if fee_cost is not None and Decimal(fee_cost) > 0:
        fee = {"cost": fee_cost, "currency": ex.safe_currency_code(_text(get("N")))}
    status = ex.parse_order_status(raw_status)
    client_id = _text(get("C")) or _text(get("caid"))
    if not client_id:
        client_id = _text(get("c"))
    trigger = ex.omit_zero(_text(get("P")) or _text(get("sp")) or _text(get("tp")))
    type_lower = _lower(get("o"))
    time_in_force = _text(get("f"))
    if time_in_force == "GTX":
        time_in_force = "PO"
    post_only = type_lower == "limit_maker" or time_in_force == "PO"
    order_type = ex.parse_order_type_by_market(type_lower, "contract")
    # safe_order, for this shape: no trades, at most one fee, no market (contract size 1, linear).
    amount = ex.omit_zero(_text(get("q")))
    filled = _text(get("z"))
    cost: str | Decimal | None = _text(get("Z"))
    average = ex.omit_zero(_text(get("ap")))
    price = ex.omit_zero(_text(get("p")))
    parse_cost = cost is None
    if amount is None and status == "closed":
        amount = filled
    if filled is None and status == "closed" and amount is not None:
        filled = amount
    remaining: str | Decimal | None = None
    if amount is not None and filled is not None:
        remaining = _unsigned_zero(_EXACT.subtract(Decimal(amount), Decimal(filled)))
    elif status == "closed":
        remaining = "0"
    if average is None and filled is not None and cost is not None and Decimal(filled) > 0:
        average = Precise.string_div(cost, filled)  # Precise's division (18 digits, truncated) as ccxt's
    if parse_cost and filled is not None and (average is not None or price is not None):
        cost = _unsigned_zero(_EXACT.multiply(Decimal(filled), Decimal(price if average is None else average)))
    if (price is None or Decimal(price) == 0) and order_type == "market":
        price = average
    if time_in_force is None:
        if trigger is None and order_type == "market":  # (a take-profit price is the trigger, or absent)
            time_in_force = "IOC"
        if post_only:
            time_in_force = "PO"
    trigger_number = _number(trigger)
    reduce_only = get("R")
    return {
        "info": order,
        "symbol": ex.safe_symbol(market_id, None, None, "contract"),
        "id": _text(get("i")) or _text(get("aid")),
        "clientOrderId": client_id,
        "timestamp": timestamp,
        "datetime": ex.iso8601(timestamp),
        "lastTradeTimestamp": last_trade,
        "lastUpdateTimestamp": at,
        "type": order_type,
        "timeInForce": time_in_force,
        "postOnly": post_only,
        "reduceOnly": reduce_only if type(reduce_only) is bool else None,
        "side": _lower(get("S")),
        "price": _number(price),
        "stopPrice": trigger_number,
        "triggerPrice": trigger_number,
        "takeProfitPrice": _number(trigger if type_lower in _TAKE_PROFIT else None),
        "amount": _number(amount),
        "cost": _number(cost),
        "average": _number(average),
        "filled": _number(filled),
        "remaining": _number(remaining),
        "status": status,
        "fee": fee,
        "trades": [],
        "fees": [] if fee is None else [{"cost": _number(fee["cost"]), "currency": fee["currency"]}],
        "stopLossPrice": None,
    }


def _unsigned_zero(value: Decimal) -> Decimal:
    """Precise has no negative zero ("-0" times a price is 0 there, -0.0 in Decimal)."""
    return value if value else Decimal(0)


def _number(value: Any) -> float | None:
    """ccxt's parse_number (a float), for text or an exact Decimal."""
    return None if value is None else float(value)


def _text(value: Any) -> str | None:
    """ccxt's safe_string: text as it is, a number as its text, anything else (and "") as None."""
    if value is None or value == "":
        return None
    kind = type(value)
    if kind is str:
        return value
    if kind is int or kind is float:
        return str(value)
    return None


def _lower(value: Any) -> str | None:
    text = _text(value)
    return text.lower() if text is not None else None


def _integer(value: Any) -> int | None:
    """ccxt's safe_integer."""
    try:
        return int(float(value))
    except Exception:  # noqa: BLE001 - as ccxt: whatever does not convert is absent
        return None


# --- the positions list (REST) ------------------------------------------------------------------------------

# Options of ccxt's that change which endpoint `fetch_positions` asks or how it reads the answer: with any of them
# set, ccxt does the whole call itself.
POSITION_OPTIONS = frozenset({"fetchPositions", "fetchPositionsRisk", "defaultType", "defaultSubType", "subType",
                              "type", "portfolioMargin", "defaultMarginMode", "useV2"})


def lean_position_risk(response: Any, markets_by_id: Any) -> list[dict[str, Any]] | None:
    """The entries of a USDⓈ-M positionRisk (v3) answer that ccxt's `fetch_positions` lists, their fields checked
    for the adapter to read as they are (`symbol` a listed market id, `positionAmt` and `entryPrice` finite
    numbers as text, `updateTime` an integer or absent); None where ccxt must parse the answer itself.

    ccxt keeps an entry whose entry price is above zero and turns each into a unified position (~56 us each with
    Precise's text arithmetic: 28 ms for 500 positions, on the event loop at every sync tick, bench.burst's
    profile); the adapter then reads only the market, `positionAmt`, `entryPrice` and `updateTime` of Binance's
    own payload. tests/test_binance_lean.py compares the two on generated answers and on the simulator's."""
    if not isinstance(response, list) or not isinstance(markets_by_id, dict):
        return None
    kept = []
    for entry in response:
        if not isinstance(entry, dict):
            return None
        symbol, amount, price, at = (entry.get("symbol"), entry.get("positionAmt"), entry.get("entryPrice"),
                                     entry.get("updateTime"))
        if type(symbol) is not str or symbol not in markets_by_id or type(amount) is not str \
                or type(price) is not str or not (at is None or type(at) is int):
            return None
        try:
            if not (Decimal(amount).is_finite() and Decimal(price).is_finite()):
                return None
        except DecimalException:
            return None
        if Decimal(price) > 0:
            kept.append(entry)
    return kept
