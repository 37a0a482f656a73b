"""Binance's user-stream events read straight into snapshots (exchange/binance_user_stream.py) give what the adapter
made of ccxt's handling of the same frames: generated sequences of frames go through the adapter's client twice,
once tapped and once through ccxt's handlers, cache and the adapter's conversion; and the simulator's frames do."""
from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from decimal import Decimal as D
from typing import Any

import ccxt.pro as ccxtpro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.binance_user_stream import FeeBook, mark_update, order_update, position_update
from exchange.ccxt_adapter import CcxtExchange, ExchangeSettings, _binance_frame_ok, _guarded, _Tap
from exchange.port import MarkPrice, OrderSnapshot, Resynced
from exchange.sim.server import SimServer, _mark_event
from exchange.sim.venue import SimAlgo, Venue
from lifecycle.domain import OrderStatus
from tests.livekit import settings_for
from tests.test_binance_lean import MARKETS, STAMPS, algo_updates, order_updates
from tests.test_ccxt_adapter import Collector

Pipe = tuple[CcxtExchange, Any, Any, _Tap | None]


def _pipe(tapped: bool) -> Pipe:
    """The adapter over its ccxt client (markets set, nothing connected), a WebSocket client object for ccxt's
    handlers to resolve on, and the adapter's tap of both user streams when `tapped`."""
    adapter = CcxtExchange(ExchangeSettings(exchange_id="binanceusdm"))
    client = _guarded(ccxtpro.binanceusdm, adapter)({"options": {"fetchCurrencies": False, "ordersLimit": 5000}})
    client.set_markets(copy.deepcopy(MARKETS))
    adapter.client = client
    ws = client.client("wss://fstream.example/ws/key")
    tap = None
    if tapped:
        tap = _Tap()
        adapter._taps = {"orders": [tap], "positions": [tap], "marks": [tap]}
    return adapter, client, ws, tap


@pytest.fixture(scope="module")
def pipes() -> Iterator[tuple[Pipe, Pipe]]:
    """A tapped pipe and a plain one, made once (a ccxt client takes ~0.2 s to make) on a loop of their own."""
    loop = asyncio.new_event_loop()

    async def make() -> tuple[Pipe, Pipe]:
        return _pipe(True), _pipe(False)

    both = loop.run_until_complete(make())
    yield both
    for pipe in both:
        loop.run_until_complete(pipe[1].close())
    loop.close()


def _compare(pipes: tuple[Pipe, Pipe], sequence: list[dict[str, Any]], *, fees_too: bool = False) -> int:
    """Each frame through both pipes (emptied first); the frames the tap read: what it read equals what the old
    way gave (the fee aside unless `fees_too`). How many snapshots the tap gave."""
    tapped_pipe, ccxt_pipe = pipes
    for adapter, client, _, tap in pipes:
        client.orders = client.positions = None
        client.tickers = {}
        adapter._fees = FeeBook()
        if tap is not None:
            tap.take()
    taken = 0
    for message in sequence:
        choked = ccxt_pipe[0]._drops.counts["handler_error"]
        expected = _through_ccxt(ccxt_pipe, message)
        got, handled_by_ccxt = _tapped(tapped_pipe, message)
        if ccxt_pipe[0]._drops.counts["handler_error"] > choked:
            # ccxt's handler choked on it (a fee without its asset, after one of the order's updates had one: ccxt
            # adds them with currencyToPrecision(None)): the old way dropped it, its cache holds the update before.
            continue
        if handled_by_ccxt:
            assert message["e"] not in ("ACCOUNT_UPDATE", "markPriceUpdate") or "mp" in message or not message.get(
                "E"), message  # every generated position list and mark with its time is read here
            continue  # left to ccxt whole: its watch delivers it, as before
        if fees_too:
            assert got == expected, message
        else:
            assert _without_fee(got) == _without_fee(expected), message
        taken += len(got)
    return taken


def _through_ccxt(pipe: Pipe, message: dict[str, Any]) -> list[Any]:
    """What the adapter made of one frame the old way: ccxt's handler, then `_order` of the order's cache entry;
    `_position` of each position ccxt's handler makes of an ACCOUNT_UPDATE."""
    adapter, client, ws, _ = pipe
    checked = _binance_frame_ok(copy.deepcopy(message), client.markets_by_id, lambda *_: None)
    client.handle_message(ws, copy.deepcopy(message))
    if message["e"] == "ACCOUNT_UPDATE":  # the positions ccxt's handler resolves the watch with, one per entry
        return [adapter._position({**client.parse_ws_position(copy.deepcopy(entry)), "timestamp": message["E"]})
                for entry in message["a"]["P"]]
    if not checked:
        return []  # dropped by the adapter's checks, either way
    if message["e"] == "markPriceUpdate":  # the ticker ccxt's handler keeps (and resolves the watch with)
        return [adapter._mark(client.tickers[client.safe_symbol(message["s"], None, None, "contract")])]
    o = message["o"]
    entry = (client.orders.hashmap if client.orders is not None else {}).get(
        client.safe_symbol(o["s"], None, None, "contract"), {}).get(str(o.get("i", o.get("aid"))))
    return [] if entry is None else [adapter._order(entry)]


def _tapped(pipe: Pipe, message: dict[str, Any]) -> tuple[list[Any], bool]:
    """The same frame through the tapped client: what the tap got, and whether ccxt handled it instead (it
    passed the adapter's checks and the tap got nothing)."""
    _, client, ws, tap = pipe
    assert tap is not None
    checked = _binance_frame_ok(copy.deepcopy(message), client.markets_by_id, lambda *_: None)
    client.handle_message(ws, copy.deepcopy(message))
    got = tap.take()
    return got, checked and not got and not (message["e"] == "ACCOUNT_UPDATE" and not message["a"]["P"])


def _without_fee(items: list[Any]) -> list[Any]:
    return [(i.__class__.__name__, {k: getattr(i, k) for k in i.__slots__ if k != "fee"}) for i in items]


@st.composite
def frames(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A few orders' updates in a row (ids reused, so ccxt's cache merges them), algo updates, ACCOUNT_UPDATEs."""
    out = []
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        kind = draw(st.sampled_from(["ORDER_TRADE_UPDATE", "ALGO_UPDATE", "ACCOUNT_UPDATE"]))
        stamp = draw(st.integers(min_value=1_600_000_000_000, max_value=1_900_000_000_000))
        if kind == "ACCOUNT_UPDATE":
            entries = [{"s": draw(st.sampled_from(["BTCUSDT", "ETHUSDT"])),
                        "pa": draw(st.sampled_from(["0", "0.000", "0.010", "-0.010", "1.5", "-3"])),
                        "ep": draw(st.sampled_from(["0", "0.00000", "95000.5", "2500.10", "1e-5"])),
                        "cr": "0", "up": "0", "mt": "cross", "iw": "0", "ps": "BOTH"}
                       for _ in range(draw(st.integers(min_value=0, max_value=3)))]
            out.append({"e": kind, "E": stamp, "T": stamp, "a": {"m": "ORDER", "B": [], "P": entries}})
            continue
        body = draw(order_updates() if kind == "ORDER_TRADE_UPDATE" else algo_updates())
        if kind == "ORDER_TRADE_UPDATE":
            body["i"] = draw(st.sampled_from([7, 8, 9]))  # the same orders again
        else:
            body["aid"] = draw(st.sampled_from([41, 42]))
        message = {"e": kind, "E": stamp, "o": body}
        if draw(st.booleans()):
            message["T"] = draw(STAMPS) or stamp
        out.append(message)
    return out


@st.composite
def mark_frames(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Mark-price updates as Binance sends them (`<symbol>@markPrice@1s`), with the prices' odd texts, and some of
    other shapes: a symbol nobody loaded, a price that is no number, no time, an options mark (`mp`)."""
    out = []
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        price = draw(st.one_of(
            st.sampled_from(["0", "0.00000000", "95000.10000000", "2500.1", "1e-8", "1E+3", "-1.5", "NaN", "x", "",
                             "0.1000000000000000055511151231257827"]),
            st.decimals(min_value=0, max_value=10**7, places=8, allow_nan=False).map(str)))
        symbol = draw(st.sampled_from(["BTCUSDT", "ETHUSDT", "XYZUSDT"]))
        message: dict[str, Any] = {"e": "markPriceUpdate", "s": symbol, "p": price, "i": "1.0", "P": "1.0",
                                   "r": "0.00010000", "T": 1796403600000}
        stamp = draw(st.one_of(STAMPS, st.just(0)))
        if stamp is not None:
            message["E"] = stamp
        if draw(st.integers(min_value=0, max_value=9)) == 0:
            message["mp"] = "7.5"
        out.append(message)
    return out


@settings(max_examples=300, deadline=None)
@given(sequence=mark_frames())
def test_generated_marks_read_straight_give_what_the_adapter_made_of_ccxts_ticker(
        pipes: tuple[Pipe, Pipe], sequence: list[dict[str, Any]]) -> None:
    _compare(pipes, sequence)


def test_the_simulators_marks_are_read_straight_and_give_what_ccxt_gave(pipes: tuple[Pipe, Pipe]) -> None:
    sent = [_mark_event(symbol, D(price)) for symbol, price in (("BTCUSDT", "95000.1"), ("ETHUSDT", "2500"),
                                                                 ("BTCUSDT", "0.00010"))]
    assert _compare(pipes, sent) == 3
    mark = mark_update(sent[2])
    assert mark is not None and (mark.symbol, mark.price) == ("BTCUSDT", D("0.0001"))


@pytest.mark.parametrize("message", [
    {"e": "markPriceUpdate", "s": "BTCUSDT", "p": "1"}, {"e": "markPriceUpdate", "E": 0, "s": "BTCUSDT", "p": "1"},
    {"e": "markPriceUpdate", "E": "1796400000000", "s": "BTCUSDT", "p": "1"},
    {"e": "markPriceUpdate", "E": 1796400000000, "s": "BTCUSDT", "p": 1.5},
    {"e": "markPriceUpdate", "E": 1796400000000, "s": "BTCUSDT", "p": "inf"},
    {"e": "markPriceUpdate", "E": 10**17, "s": "BTCUSDT", "p": "1"},
    {"e": "markPriceUpdate", "E": 1796400000000, "s": "BTCUSDT", "p": "1", "mp": "2"},
], ids=["no-time", "zero-time", "time-as-text", "number", "infinite", "time-out-of-range", "options-mark"])
def test_mark_frames_of_other_shapes_are_left_to_ccxt(message: dict[str, Any]) -> None:
    assert mark_update(message) is None


@settings(max_examples=500, deadline=None)
@given(sequence=frames())
def test_generated_frames_read_straight_give_what_the_adapter_made_of_ccxts_parsing(
        pipes: tuple[Pipe, Pipe], sequence: list[dict[str, Any]]) -> None:
    _compare(pipes, sequence)


def test_the_simulators_frames_are_read_straight_and_give_what_ccxt_gave(pipes: tuple[Pipe, Pipe]) -> None:
    """An entry's NEW and fill, a liquidation and its flat, and every status of a stop, as the simulator sends
    them: every one is read straight, and gives what the old way gave, the fees included."""
    venue = Venue()
    account = venue.add_account("frames")
    sent: list[dict[str, Any]] = []
    venue._emit = lambda account, event: sent.append(event)  # type: ignore[method-assign]
    venue.new_order(account, symbol="BTCUSDT", side="BUY", type_="MARKET", quantity=D("0.010"), price=None,
                    client_id="lc1-01a2b3c4d5e6f7a8b9c0-e", reduce_only=False)
    venue.force_close(account, "BTCUSDT", "liquidation")
    assert {m["e"] for m in sent} == {"ORDER_TRADE_UPDATE", "ACCOUNT_UPDATE"}
    for status in ("NEW", "TRIGGERED", "FINISHED", "CANCELED", "EXPIRED", "REJECTED"):
        algo = SimAlgo(algo_id=41, client_id="lc1-01a2b3c4d5e6f7a8b9c0-s1", symbol="BTCUSDT", side="SELL",
                       order_type="STOP_MARKET", qty=D("0.010"), trigger=D("95000"),
                       reduce_only=True, close_position=False, working_type="MARK_PRICE")
        algo.status = status
        sent.append({"e": "ALGO_UPDATE", "T": 1796400000000, "E": 1796400000000, "o": Venue.algo_event_body(algo)})
    every = sum(len(m["a"]["P"]) if m["e"] == "ACCOUNT_UPDATE" else 1 for m in sent)
    assert every >= 5 and _compare(pipes, sent, fees_too=True) == every  # all read here; fees too (one fill each)


def test_an_orders_fees_are_summed_over_its_fill_updates_per_currency() -> None:
    fees = FeeBook()
    base = {"s": "BTCUSDT", "c": "x", "S": "SELL", "o": "MARKET", "f": "GTC", "q": "0.030", "p": "0",
            "sp": "0", "i": 7, "T": 1796400000000, "ps": "BOTH", "R": True, "N": "USDT"}
    new = order_update("ORDER_TRADE_UPDATE", {"o": {**base, "x": "NEW", "X": "NEW", "z": "0", "ap": "0"}}, fees)
    first = order_update("ORDER_TRADE_UPDATE", {"o": {**base, "x": "TRADE", "X": "PARTIALLY_FILLED", "z": "0.010",
                                                      "ap": "100", "n": "0.02"}}, fees)
    second = order_update("ORDER_TRADE_UPDATE", {"o": {**base, "x": "TRADE", "X": "FILLED", "z": "0.030",
                                                       "ap": "100", "n": "0.04"}}, fees)
    assert new is not None and first is not None and second is not None
    assert (new.fee, first.fee, second.fee) == (None, D("0.02"), D("0.06"))
    assert second.status is OrderStatus.FILLED and second.filled == D("0.03")
    other = order_update("ORDER_TRADE_UPDATE", {"o": {**base, "i": 8, "x": "TRADE", "X": "FILLED", "z": "0.030",
                                                      "ap": "100", "n": "0.01", "N": "BNB"}}, fees)
    assert other is not None and other.fee == D("0.01")  # another order: its own sum
    mixed = order_update("ORDER_TRADE_UPDATE", {"o": {**base, "i": 8, "x": "TRADE", "X": "FILLED", "z": "0.030",
                                                      "ap": "100", "n": "0.01", "N": "USDT"}}, fees)
    assert mixed is not None and mixed.fee is None  # paid in two currencies: no single figure


def test_an_orders_realized_profit_is_the_sum_of_its_trades_each_counted_once(pipes: tuple[Pipe, Pipe]) -> None:
    """Binance's `rp` is the trade's own, like `n`: an order filled in two trades reported only the second trade's
    profit. Summed per order, each trade id once (a frame seen twice counts once), kept on the order's later updates,
    and the same through ccxt's path. The commission of a frame seen twice counts once too."""
    fees = FeeBook()
    base = {"s": "BTCUSDT", "c": "x", "S": "SELL", "o": "LIMIT", "f": "GTC", "q": "0.030", "p": "100",
            "sp": "0", "i": 9, "T": 1796400000000, "ps": "BOTH", "R": True, "N": "USDT", "ap": "100"}
    first_trade = {**base, "x": "TRADE", "X": "PARTIALLY_FILLED", "z": "0.010", "n": "0.02", "rp": "4", "t": 11}
    frames = [{**base, "x": "NEW", "X": "NEW", "z": "0", "ap": "0", "rp": "0"}, first_trade, first_trade,
              {**base, "x": "TRADE", "X": "PARTIALLY_FILLED", "z": "0.020", "n": "0.02", "rp": "-1.5", "t": 12},
              {**base, "x": "CANCELED", "X": "CANCELED", "z": "0.020", "rp": "0"}]
    got = [order_update("ORDER_TRADE_UPDATE", {"o": frame}, fees) for frame in frames]
    assert [g.realized_pnl if g is not None else "-" for g in got] == [D(0), D(4), D(4), D("2.5"), D("2.5")]
    assert [g.fee if g is not None else "-" for g in got] == [None, D("0.02"), D("0.02"), D("0.04"), D("0.04")]
    untraded = order_update("ORDER_TRADE_UPDATE", {"o": {**first_trade, "i": 10, "t": 0}}, fees)
    assert untraded is not None and untraded.realized_pnl == D(4)  # no trade id: the frame's own figure
    no_profit = {k: v for k, v in first_trade.items() if k != "rp"} | {"i": 11}
    twice = [order_update("ORDER_TRADE_UPDATE", {"o": no_profit}, fees) for _ in range(2)]
    assert [(t.fee, t.realized_pnl) for t in twice if t is not None] == [(D("0.02"), None)] * 2  # one trade, once
    messages = [{"e": "ORDER_TRADE_UPDATE", "E": 1796400000000, "T": 1796400000000, "o": frame} for frame in frames]
    assert _compare(pipes, messages) == len(frames)  # ccxt's path gives the same profits


def test_the_simulator_reports_each_trades_own_realized_profit() -> None:
    """As Binance does: `rp` (and `n`) of an ORDER_TRADE_UPDATE are the trade's, not the order's so far."""
    venue = Venue()
    account = venue.add_account("rp")
    sent: list[dict[str, Any]] = []
    venue._emit = lambda account, event: sent.append(event)  # type: ignore[method-assign]
    venue.new_order(account, symbol="BTCUSDT", side="BUY", type_="MARKET", quantity=D("0.010"), price=None,
                    client_id=None, reduce_only=False)
    entry = venue.position(account, "BTCUSDT").entry
    order = venue.new_order(account, symbol="BTCUSDT", side="SELL", type_="LIMIT", quantity=D("0.010"),
                            price=entry + 1000, client_id=None, reduce_only=True)
    venue.fill_partially(account, order.order_id, D("0.004"))
    venue.set_mark("BTCUSDT", entry + 1000)
    trades = [m["o"] for m in sent if m["e"] == "ORDER_TRADE_UPDATE" and m["o"]["i"] == order.order_id
              and m["o"]["x"] == "TRADE"]
    assert [D(t["rp"]) for t in trades] == [D("4.000"), D("6.000")]
    assert [D(t["rp"]) for t in trades] == [t.realized for t in account.trades if t.order_id == order.order_id]


@pytest.mark.parametrize("message", [
    {"o": {"s": "BTCUSDT", "X": "NEW_ADL", "i": 7, "T": 1, "ps": "BOTH", "o": "MARKET"}},  # a status we do not map
    {"o": {"s": "BTCUSDT", "X": "NEW", "i": 7, "T": 1, "ps": "BOTH", "o": "MARKET", "q": 0.01}},  # not text
    {"o": {"s": "BTCUSDT", "X": "NEW", "i": 7, "T": 1, "o": "MARKET"}},  # no position side: not a futures order
    {"o": {"s": "BTCUSDT", "X": "NEW", "i": 7, "ps": "BOTH", "o": "MARKET"}},  # no time
    {"o": {"s": "BTCUSDT", "X": "NEW", "i": 7, "T": 1, "ps": "BOTH"}},  # no type
    {"o": [{"s": "BTCUSDT"}]},  # the options shape
], ids=["status", "number", "no-ps", "no-time", "no-type", "list"])
def test_order_frames_of_other_shapes_are_left_to_ccxt(message: dict[str, Any]) -> None:
    assert order_update("ORDER_TRADE_UPDATE", message, FeeBook()) is None


@pytest.mark.parametrize("message", [
    {"E": 0, "a": {"P": []}}, {"E": 1, "a": {"P": [{"s": "BTCUSDT", "pa": 1}]}},
    {"E": 1, "a": {"P": [{"s": "BTCUSDT", "pa": "1", "ep": "NaN"}]}}, {"E": 1, "a": []},
], ids=["no-time", "number", "nan", "no-account"])
def test_position_frames_of_other_shapes_are_left_to_ccxt(message: dict[str, Any]) -> None:
    assert position_update(message) is None


async def test_through_the_simulator_the_streams_deliver_what_is_read_straight() -> None:
    """Against the simulator: order and position updates come through the taps (ccxt's caches stay empty)."""
    server = await SimServer().start()
    account = server.venue.add_account("tap")
    adapter = await CcxtExchange(settings_for(server, account)).start()
    orders, positions = Collector(adapter.order_updates()), Collector(adapter.position_updates())
    try:
        await orders.wait_for(lambda item: not isinstance(item, OrderSnapshot))
        await positions.wait_for(lambda item: not isinstance(item, OrderSnapshot))
        server.venue.new_order(account, symbol="BTCUSDT", side="BUY", type_="MARKET", quantity=D("0.010"),
                               price=None, client_id="lc1-01a2b3c4d5e6f7a8b9c0-e", reduce_only=False)
        filled = await orders.wait_for(lambda i: isinstance(i, OrderSnapshot) and i.status is OrderStatus.FILLED)
        assert filled.fee is not None and filled.filled == D("0.01")
        await positions.wait_for(lambda i: getattr(i, "amount", None) == D("0.010"))
        assert not (adapter.client.orders or []) and not any((adapter.client.positions or {}).values())
    finally:
        await orders.stop()
        await positions.stop()
        await adapter.close()
        await server.stop()


async def test_through_the_simulator_marks_come_through_the_tap_each_watch_its_own_symbols() -> None:
    """Against the simulator: two mark watches of one adapter (different symbols) each get their own symbols'
    marks through the tap, ccxt's ticker table stays empty; a frame the tap leaves to ccxt (an options mark
    `mp`, sent by hand) still arrives, through ccxt's watch and the sweep of its table."""
    server = await SimServer().start()
    account = server.venue.add_account("marks")
    adapter = await CcxtExchange(settings_for(server, account)).start()
    btc, eth = Collector(adapter.mark_prices(["BTCUSDT"])), Collector(adapter.mark_prices(["ETHUSDT"]))
    try:
        await btc.wait_for(lambda item: isinstance(item, Resynced))
        await eth.wait_for(lambda item: isinstance(item, Resynced))
        server.venue.set_mark("BTCUSDT", D("58900.5"))
        server.venue.set_mark("ETHUSDT", D("2400.25"))
        await btc.wait_for(lambda m: isinstance(m, MarkPrice) and m.price == D("58900.5"))
        await eth.wait_for(lambda m: isinstance(m, MarkPrice) and m.price == D("2400.25"))
        assert {m.symbol for m in btc.items if isinstance(m, MarkPrice)} == {"BTCUSDT"}
        assert {m.symbol for m in eth.items if isinstance(m, MarkPrice)} == {"ETHUSDT"}
        assert not adapter.client.tickers  # nothing went through ccxt's handler
        ws = next(iter(adapter.client.clients.values()))
        adapter.client.handle_message(ws, {"stream": "btcusdt@markPrice@1s", "data": {
            "e": "markPriceUpdate", "E": int(time.time() * 1000) + 10_000, "s": "BTCUSDT", "p": "1.0",
            "mp": "61000.5"}})
        await btc.wait_for(lambda m: isinstance(m, MarkPrice) and m.price == D("61000.5"))
        assert adapter._marks_to_ccxt == 1 and adapter.client.tickers
    finally:
        await btc.stop()
        await eth.stop()
        await adapter.close()
        await server.stop()


def test_a_liquidations_fill_carries_its_commission_as_ccxt_gave_it(pipes: tuple[Pipe, Pipe]) -> None:
    """Review of b586649: a liquidation's fill comes as execution type CALCULATED, not TRADE; its commission was
    not counted (fee None, so the closure had no net PnL), where ccxt's reading gave it."""
    liquidation = {"s": "BTCUSDT", "c": "autoclose-123", "S": "SELL", "o": "LIQUIDATION", "f": "IOC", "q": "0.030",
                   "p": "0", "ap": "100", "sp": "0", "x": "CALCULATED", "X": "FILLED", "i": 9, "z": "0.030",
                   "n": "0.01", "N": "USDT", "T": 1796400000000, "ps": "BOTH", "R": False, "rp": "-1.5"}
    message = {"e": "ORDER_TRADE_UPDATE", "E": 1796400000000, "T": 1796400000000, "o": liquidation}
    assert _compare(pipes, [message], fees_too=True) == 1
    snapshot = order_update("ORDER_TRADE_UPDATE", message, FeeBook())
    assert snapshot is not None and snapshot.fee == D("0.01")


def test_frames_with_a_time_out_of_range_go_to_ccxt_and_count_no_fee() -> None:
    """Review of b586649: such a frame raised out of the tap (dropped, not handed to ccxt), and an order's
    commission was counted before its time was read."""
    assert position_update({"E": 10**17, "a": {"P": []}}) is None
    fees = FeeBook()
    order = {"s": "BTCUSDT", "c": "x", "S": "SELL", "o": "MARKET", "q": "0.030", "ap": "100", "x": "TRADE",
             "X": "FILLED", "i": 7, "z": "0.030", "n": "0.5", "N": "USDT", "T": 10**17, "ps": "BOTH", "R": True}
    assert order_update("ORDER_TRADE_UPDATE", {"o": order}, fees) is None
    assert fees.of(("BTCUSDT", "7")) is None


def test_a_marks_tap_behind_its_consumer_keeps_the_newest_mark_of_each_symbol_not_every_one() -> None:
    """Review of 2e0d702: a consumer that awaits per mark let the tap's queue grow without bound (ccxt's ticker
    table kept the newest per symbol). Past a few marks per symbol of the watch, the tap keeps the newest of each."""
    tap = _Tap(frozenset({"BTCUSDT", "ETHUSDT"}))
    start = 1_796_400_000_000
    for i in range(1_000):
        tap.put([mark_update({"e": "markPriceUpdate", "E": start + i, "s": ("BTCUSDT", "ETHUSDT")[i % 2],
                              "p": f"{100 + i}"})])
    assert len(tap.items) <= 4 * 2 + 1
    newest = {m.symbol: m.price for m in tap.take()}
    assert newest == {"BTCUSDT": D("1098"), "ETHUSDT": D("1099")}
