"""The lean parsing of a futures order update (exchange/binance_lean.py) gives exactly ccxt's unified order, or
leaves the update to ccxt: on generated updates of every status, execution type and order type, on the shapes
the simulator sends, and through the adapter's client."""
from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from decimal import Decimal as D
from typing import Any

import ccxt.pro as ccxtpro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.binance_lean import lean_order, lean_position_risk
from exchange.ccxt_adapter import CcxtExchange, ExchangeSettings, _guarded
from exchange.secret import Secret
from exchange.sim.server import SimServer
from exchange.sim.venue import SimAlgo, Venue

MARKETS = [{
    "id": f"{base}USDT", "symbol": f"{base}/USDT:USDT", "base": base, "quote": "USDT", "settle": "USDT",
    "type": "swap", "spot": False, "swap": True, "future": False, "contract": True, "linear": True,
    "inverse": False, "contractSize": 1, "active": True, "precision": {"amount": 0.001, "price": 0.1},
    "limits": {}, "info": {},
} for base in ("BTC", "ETH")]

NUMBERS = st.sampled_from(["0", "0.000", "0.00000", "0.010", "0.005", "1", "3", "100000.5", "95000", "2500.10",
                           "0.40000000", "-1.2", "12345678.12345678", "0.00000001", "1e-5", "7E+2"])
MAYBE = st.one_of(st.none(), NUMBERS)
TEXTS = st.sampled_from(["", "lc1-01a2b3c4d5e6f7a8b9c0-s1", "lc1-01a2b3c4d5e6f7a8b9c0-e", "web_abc", "autoclose-1"])
STAMPS = st.one_of(st.none(), st.integers(min_value=1_600_000_000_000, max_value=1_900_000_000_000))


@pytest.fixture(scope="module")
def ccxt_binance() -> Iterator[Any]:
    ex = ccxtpro.binanceusdm({"options": {"fetchCurrencies": False}})
    ex.set_markets(copy.deepcopy(MARKETS))
    yield ex


def _put(body: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        body[key] = value


@st.composite
def order_updates(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "s": draw(st.sampled_from(["BTCUSDT", "ETHUSDT"])),
        "c": draw(TEXTS), "S": draw(st.sampled_from(["BUY", "SELL"])),
        "o": draw(st.sampled_from(["MARKET", "LIMIT", "STOP_MARKET", "STOP", "TAKE_PROFIT_MARKET", "TAKE_PROFIT",
                                   "LIMIT_MAKER", "TRAILING_STOP_MARKET", "LIQUIDATION"])),
        "f": draw(st.sampled_from(["GTC", "IOC", "FOK", "GTX", "GTD"])),
        "x": draw(st.sampled_from(["NEW", "TRADE", "CANCELED", "EXPIRED", "AMENDMENT", "CALCULATED"])),
        "X": draw(st.sampled_from(["NEW", "PARTIALLY_FILLED", "FILLED", "CANCELED", "EXPIRED", "EXPIRED_IN_MATCH"])),
        "i": draw(st.integers(min_value=0, max_value=10**12)), "ps": draw(st.sampled_from(["BOTH", "LONG", "SHORT"])),
        "R": draw(st.booleans()), "wt": "CONTRACT_PRICE", "m": False, "rp": draw(NUMBERS),
    }
    for key in ("q", "p", "ap", "sp", "z", "Z", "l", "L", "n", "P"):
        _put(body, key, draw(MAYBE))
    for key in ("T", "O"):
        _put(body, key, draw(STAMPS))
    _put(body, "N", draw(st.one_of(st.none(), st.sampled_from(["USDT", "BNB", "BUSD"]))))
    _put(body, "C", draw(st.one_of(st.none(), TEXTS)))
    return body


@st.composite
def algo_updates(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "caid": draw(TEXTS), "aid": draw(st.integers(min_value=1, max_value=10**12)), "at": "CONDITIONAL",
        "o": draw(st.sampled_from(["STOP_MARKET", "TAKE_PROFIT_MARKET", "STOP", "TAKE_PROFIT",
                                   "TRAILING_STOP_MARKET"])),
        "s": draw(st.sampled_from(["BTCUSDT", "ETHUSDT"])), "S": draw(st.sampled_from(["BUY", "SELL"])),
        "ps": "BOTH", "f": draw(st.sampled_from(["GTC", "IOC", "GTX"])),
        "X": draw(st.sampled_from(["NEW", "TRIGGERING", "TRIGGERED", "FINISHED", "CANCELED", "EXPIRED",
                                   "REJECTED"])),
        "ai": draw(st.sampled_from(["", "123456"])), "act": "0", "V": "EXPIRE_MAKER", "wt": "MARK_PRICE",
        "pm": "NONE", "cp": draw(st.booleans()), "pP": False, "R": draw(st.booleans()), "tt": 0, "gtd": 0,
        "rm": "",
    }
    for key in ("q", "ap", "aq", "tp", "p"):
        _put(body, key, draw(MAYBE))
    _put(body, "T", draw(STAMPS))
    return body


def _same(ex: Any, body: dict[str, Any]) -> bool:
    """True when the lean path took it (and gave ccxt's order); False when it left it to ccxt."""
    lean = lean_order(ex, copy.deepcopy(body))
    expected = ex.parse_ws_order(copy.deepcopy(body))
    if lean is None:
        return False
    # Compared by repr too: 0.0 == -0.0, but a negative zero is not what ccxt gives (review of 5475b0e).
    differ = {k: (lean.get(k), expected.get(k)) for k in {*lean, *expected}
              if lean.get(k) != expected.get(k) or repr(lean.get(k)) != repr(expected.get(k))}
    assert not differ, differ
    return True


@settings(max_examples=1500, deadline=None)
@given(body=st.one_of(order_updates(), algo_updates()))
def test_generated_updates_parse_as_ccxt_parses_them(ccxt_binance: Any, body: dict[str, Any]) -> None:
    _same(ccxt_binance, body)


def test_the_simulators_updates_take_the_lean_path_and_parse_as_ccxt_parses_them(ccxt_binance: Any) -> None:
    taken = 0
    for status in ("NEW", "TRIGGERED", "FINISHED", "CANCELED", "EXPIRED", "REJECTED"):
        algo = SimAlgo(algo_id=41, client_id="lc1-01a2b3c4d5e6f7a8b9c0-s1", symbol="BTCUSDT", side="SELL",
                       order_type="STOP_MARKET", qty=D("0.010"), trigger=D("95000"),
                       reduce_only=True, close_position=False, working_type="MARK_PRICE")
        algo.status = status
        taken += _same(ccxt_binance, {**Venue.algo_event_body(algo), "T": 1796400000000})
    assert taken == 6


def test_updates_of_other_shapes_are_left_to_ccxt(ccxt_binance: Any) -> None:
    base = {"s": "BTCUSDT", "c": "x", "S": "SELL", "o": "MARKET", "f": "GTC", "q": "0.010", "p": "0",
            "ap": "100000.5", "sp": "0", "x": "TRADE", "X": "FILLED", "i": 7, "z": "0.010", "T": 1796400000000,
            "ps": "BOTH", "R": True}
    assert _same(ccxt_binance, base)  # the usual shape is taken
    assert lean_order(ccxt_binance, {k: v for k, v in base.items() if k != "ps"}) is None  # spot: no position side
    assert lean_order(ccxt_binance, {**base, "e": "executionReport"}) is None  # a whole spot message
    assert lean_order(ccxt_binance, {**base, "q": 0.01}) is None  # a number that is not text
    assert lean_order(ccxt_binance, {**base, "ap": "abc"}) is None  # not a number at all: ccxt decides
    assert lean_order(ccxt_binance, ["not", "a", "dict"]) is None


async def test_the_adapters_client_parses_through_the_lean_path() -> None:
    adapter = CcxtExchange(ExchangeSettings(exchange_id="binanceusdm"))
    client = _guarded(ccxtpro.binanceusdm, adapter)({"options": {"fetchCurrencies": False}})  # as _new_client
    try:
        client.set_markets(copy.deepcopy(MARKETS))
        body = {"s": "ETHUSDT", "c": "x", "S": "BUY", "o": "LIMIT", "f": "GTX", "q": "3", "p": "2500.10",
                "ap": "0", "sp": "0", "x": "NEW", "X": "NEW", "i": 9, "z": "0", "T": 1796400000000, "ps": "BOTH",
                "R": False}
        calls: list[Any] = []
        base: Any = type(client).__mro__[1]  # ccxt's own class, under the adapter's subclass
        plain = base.parse_ws_order

        def counted(self: Any, order: Any, market: Any = None) -> Any:
            calls.append(order)
            return plain(self, order, market)

        base.parse_ws_order = counted
        try:
            parsed = client.parse_ws_order(copy.deepcopy(body))
        finally:
            base.parse_ws_order = plain
        assert not calls, "the adapter's client went through ccxt's own parsing"
        assert parsed == plain(client, copy.deepcopy(body))
        assert parsed["postOnly"] is True and parsed["timeInForce"] == "PO" and parsed["symbol"] == "ETH/USDT:USDT"
    finally:
        await client.close()


BASE = {"s": "BTCUSDT", "c": "x", "S": "SELL", "o": "LIMIT", "f": "GTC", "q": "0.010", "p": "100000", "ap": "0",
        "sp": "0", "x": "NEW", "X": "NEW", "i": 7, "z": "0", "T": 1796400000000, "ps": "BOTH", "R": True}
# Just above the midpoint between 1.0 and the next float: a product that needs ~100 digits to round right.
ABOVE_MIDPOINT = "1.00000000000000011102230246251565404236316680908203125" + "0" * 40 + "1"


@pytest.mark.parametrize("body", [
    {**BASE, "s": ""}, {**BASE, "X": ""},  # empty text is absent to ccxt
    {**BASE, "z": "-0", "ap": "100"}, {**BASE, "z": "0", "p": "-1.2"},  # no negative zero
    {**BASE, "x": "TRADE", "X": "FILLED", "z": "1", "ap": ABOVE_MIDPOINT},  # exact beyond 80 digits
], ids=["empty-symbol", "empty-status", "minus-zero-filled", "negative-price", "long-average"])
def test_the_reviews_cases_parse_as_ccxt_parses_them(ccxt_binance: Any, body: dict[str, Any]) -> None:
    """Cases the review of 5475b0e found where the lean parsing differed; each now matches or goes to ccxt."""
    _same(ccxt_binance, body)


# --- the positions list (REST): lean_position_risk --------------------------------------------------------------

RISK_NUMBERS = st.sampled_from(["0", "0.000", "0.00000", "-0.000", "0.010", "-0.010", "1", "-3", "100000.5",
                                "2500.10", "12345678.12345678", "0.00000001", "1e-5", "7E+2", "-1E-3"])
RISK_STAMPS = st.one_of(st.none(), st.just(0), st.integers(min_value=1_600_000_000_000, max_value=1_900_000_000_000))


@st.composite
def risk_entries(draw: st.DrawFn) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "symbol": draw(st.sampled_from(["BTCUSDT", "ETHUSDT"])), "positionSide": draw(st.sampled_from(
            ["BOTH", "LONG", "SHORT"])), "positionAmt": draw(RISK_NUMBERS), "entryPrice": draw(RISK_NUMBERS),
        "breakEvenPrice": "0", "markPrice": draw(RISK_NUMBERS), "unRealizedProfit": draw(RISK_NUMBERS),
        "liquidationPrice": "0", "isolatedMargin": "0", "notional": draw(RISK_NUMBERS), "marginAsset": "USDT",
        "isolatedWallet": "0", "initialMargin": "0", "maintMargin": "0", "positionInitialMargin": "0",
        "openOrderInitialMargin": "0", "adl": 0, "bidNotional": "0", "askNotional": "0",
    }
    _put(entry, "updateTime", draw(RISK_STAMPS))
    return entry


@pytest.fixture(scope="module")
def risk_client() -> Iterator[tuple[CcxtExchange, Any, list[Any]]]:
    """The adapter over its ccxt client (keys set, rate limiter off), whose HTTP layer answers what the test puts
    in the list's last place; the URLs asked are appended to it before."""
    adapter = CcxtExchange(ExchangeSettings(exchange_id="binanceusdm"))
    client = _guarded(ccxtpro.binanceusdm, adapter)({"options": {"fetchCurrencies": False}, "apiKey": "k" * 16,
                                                      "secret": "s" * 16, "enableRateLimit": False})
    client.set_markets(copy.deepcopy(MARKETS))
    client.options["leverageBrackets"] = {}  # (ccxt would load them once, over REST, for fields we do not read)
    exchange: list[Any] = [None]

    async def fetch(url: str, method: str = "GET", headers: Any = None, body: Any = None) -> Any:
        exchange.insert(-1, url)
        return copy.deepcopy(exchange[-1])

    client.fetch = fetch  # the HTTP layer under ccxt: the venue's answer
    adapter.client = client
    yield adapter, client, exchange
    asyncio.run(client.close())


def _positions_both_ways(risk_client: tuple[CcxtExchange, Any, list[Any]], answer: Any,
                         symbols: list[str] | None) -> tuple[Any, Any, list[str]]:
    """The adapter's `positions` on one REST answer, read the lean way and by ccxt; the URLs asked."""
    adapter, _, exchange = risk_client
    exchange[:] = [answer]
    outcomes: list[Any] = []
    for lean in (True, False):
        adapter._lean_positions = lean
        try:
            got = asyncio.run(adapter.positions(symbols))
            outcomes.append(sorted((p.symbol, p.amount, p.entry_price, p.at.timestamp()) for p in got))
        except Exception as e:  # noqa: BLE001 - compared: both ways fail alike
            outcomes.append(type(e).__name__)
    return outcomes[0], outcomes[1], exchange[:-1]


def _same_positions(lean: Any, ccxt_way: Any) -> None:
    if isinstance(ccxt_way, str):
        assert lean == ccxt_way
        return
    assert [p[:3] for p in lean] == [p[:3] for p in ccxt_way]
    # a position without an update time is stamped "now" both ways, a few milliseconds apart
    assert all(abs(a[3] - b[3]) < 5 for a, b in zip(lean, ccxt_way, strict=True))


@settings(max_examples=300, deadline=None)
@given(answer=st.lists(risk_entries(), max_size=6),
       symbols=st.sampled_from([None, ["BTCUSDT"], ["ETHUSDT"], ["BTCUSDT", "ETHUSDT"]]))
def test_generated_position_lists_read_as_ccxt_reads_them(risk_client: Any, answer: list[dict[str, Any]],
                                                          symbols: list[str] | None) -> None:
    lean, ccxt_way, asked = _positions_both_ways(risk_client, answer, symbols)
    _same_positions(lean, ccxt_way)
    assert "v3/positionRisk" in asked[0] and len(asked) == 2, asked  # the lean way asked once, then ccxt


@pytest.mark.parametrize("entry", [
    {"symbol": "DOGEUSDT", "positionAmt": "1", "entryPrice": "0.2"},  # a market the client does not list
    {"symbol": "BTCUSDT", "positionAmt": 1, "entryPrice": "100"},  # a number that is not text
    {"symbol": "BTCUSDT", "positionAmt": "1", "entryPrice": "abc"},  # not a number at all
    {"symbol": "BTCUSDT", "positionAmt": "NaN", "entryPrice": "100"},
    {"symbol": "BTCUSDT", "positionAmt": "1", "entryPrice": "100", "updateTime": "1796400000000"},
], ids=["unlisted", "number", "not-a-number", "nan", "text-time"])
def test_position_lists_of_other_shapes_are_left_to_ccxt(risk_client: Any, entry: dict[str, Any]) -> None:
    assert lean_position_risk([entry], {m["id"]: [m] for m in MARKETS}) is None
    lean, ccxt_way, asked = _positions_both_ways(risk_client, [entry], None)
    _same_positions(lean, ccxt_way)
    assert len(asked) == 3, asked  # the lean way asked, fell back to ccxt (asked again); then ccxt alone


async def test_the_simulators_positions_take_the_lean_path_and_read_as_ccxt_reads_them() -> None:
    server = await SimServer().start()
    account = server.venue.add_account("lean")
    adapter = await CcxtExchange(ExchangeSettings(api_key=Secret(account.api_key), secret=Secret(account.secret),
                                                  urls=server.ccxt_urls(), rate_limit=False)).start()
    try:
        assert adapter._lean_positions
        for symbol, side, quantity in (("BTCUSDT", "BUY", D("0.010")), ("ETHUSDT", "SELL", D("0.300"))):
            server.venue.new_order(account, symbol=symbol, side=side, type_="MARKET", quantity=quantity, price=None,
                                   client_id=f"lean-{symbol}", reduce_only=False)
        client: Any = adapter.client
        base: Any = type(client).__mro__[1]
        for symbols in (None, ["ETHUSDT"], ["BTCUSDT", "ETHUSDT"], ["SOLUSDT"]):
            lean = await adapter.positions(symbols)
            parsed = await base.fetch_positions(client, [adapter._unified(s) for s in symbols] if symbols else None)
            ccxt_way = [p for p in map(adapter._position, parsed) if p.amount != 0]
            assert sorted(lean, key=str) == sorted(ccxt_way, key=str), symbols
        assert {(p.symbol, p.amount) for p in await adapter.positions()} == {("BTCUSDT", D("0.010")),
                                                                           ("ETHUSDT", D("-0.300"))}
    finally:
        await adapter.close()
        await server.stop()
