"""The ccxt adapter, driving unmodified ccxt `binanceusdm` against the venue simulator."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import pytest

from exchange import errors
from exchange.ccxt_adapter import CcxtExchange, ExchangeSettings
from exchange.port import OrderSnapshot, PositionSnapshot, Resynced, StreamHealth
from exchange.secret import Secret
from exchange.sim.server import SimServer
from exchange.sim.venue import Account
from lifecycle.client_ids import make_client_id
from lifecycle.domain import OrderPurpose, OrderRef, OrderStatus, Side

PID = "0123456789abcdef0123"


def settings_for(sim: SimServer, account: Account, **overrides: Any) -> ExchangeSettings:
    base = ExchangeSettings(api_key=Secret(account.api_key), secret=Secret(account.secret), urls=sim.ccxt_urls(),
                            user_probe_after_s=0.5, market_silent_after_s=2.0, backoff_initial_s=0.05,
                            backoff_max_s=0.2, rate_limit=False)
    return replace(base, **overrides)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    server = await SimServer().start()
    yield server
    await server.stop()


@pytest.fixture
def account(sim: SimServer) -> Account:
    return sim.venue.add_account("alice")


@pytest.fixture
async def venue(sim: SimServer, account: Account) -> AsyncIterator[CcxtExchange]:
    adapter = await CcxtExchange(settings_for(sim, account)).start()
    yield adapter
    await adapter.close()


class Collector:
    """Drains one adapter stream into a list in the background."""

    def __init__(self, stream: AsyncIterator[Any]) -> None:
        self.items: list[Any] = []
        self.task = asyncio.create_task(self._run(stream))

    async def _run(self, stream: AsyncIterator[Any]) -> None:
        async for item in stream:
            self.items.append(item)

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for item in self.items:
                if predicate(item):
                    return item
            await asyncio.sleep(0.02)
        raise AssertionError(f"nothing matched in {self.items}")

    def count(self, predicate: Any) -> int:
        return sum(1 for item in self.items if predicate(item))

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_opens_protects_lists_and_cancels_through_the_algo_endpoints(venue: CcxtExchange, sim: SimServer,
                                                                            account: Account) -> None:
    entry = await venue.place_entry("BTCUSDT", Side.LONG, D("0.01"), make_client_id(PID, OrderPurpose.ENTRY))
    assert (entry.status, entry.filled, entry.client_id) == (OrderStatus.FILLED, D("0.01"), f"lc-{PID}-e0")
    at = (await venue.positions())[0].at
    assert await venue.positions() == [PositionSnapshot("BTCUSDT", D("0.01"), D(60000), at)]
    stop_id = make_client_id(PID, OrderPurpose.STOP)
    stop = await venue.place_stop("BTCUSDT", Side.LONG, D("0.01"), D(58000), stop_id)
    assert stop.is_conditional and stop.client_id == stop_id and stop.trigger_price == D(58000)
    algo = sim.venue.open_algos(account, "BTCUSDT")[0]
    assert (algo.order_type, algo.side, algo.reduce_only, algo.client_id) == ("STOP_MARKET", "SELL", True, stop_id)
    listed = await venue.open_orders("BTCUSDT")
    assert [(o.client_id, o.algo_id, o.status) for o in listed] == [(stop_id, stop.algo_id, OrderStatus.OPEN)]
    await venue.cancel_order(OrderRef(client_id=stop_id, position_id=PID, symbol="BTCUSDT",
                                      purpose=OrderPurpose.STOP, side="sell", quantity=D("0.01"),
                                      algo_id=stop.algo_id))
    assert await venue.open_orders("BTCUSDT") == []
    tp = await venue.place_stop("BTCUSDT", Side.LONG, D("0.01"), D(65000),
                                make_client_id(PID, OrderPurpose.TAKE_PROFIT), purpose=OrderPurpose.TAKE_PROFIT)
    assert sim.venue.open_algos(account, "BTCUSDT")[0].order_type == "TAKE_PROFIT_MARKET" and tp.is_conditional
    close = await venue.close_position("BTCUSDT", Side.LONG, D("0.01"), make_client_id(PID, OrderPurpose.CLOSE))
    assert close.status is OrderStatus.FILLED and await venue.positions() == []
    fills = await venue.fills("BTCUSDT", datetime.now(UTC) - timedelta(minutes=5))
    assert [(f.side, f.quantity) for f in fills] == [("buy", D("0.01")), ("sell", D("0.01"))]


async def test_streams_deliver_account_order_and_algo_updates(venue: CcxtExchange, sim: SimServer,
                                                              account: Account) -> None:
    positions, orders = Collector(venue.position_updates()), Collector(venue.order_updates())
    marks = Collector(venue.mark_prices(["BTCUSDT"]))
    try:
        for c in (positions, orders, marks):  # every stream announces its connection first
            assert isinstance(await c.wait_for(lambda i: True), Resynced)
        await marks.wait_for(lambda m: not isinstance(m, Resynced) and m.price == D(60000))
        await venue.place_entry("BTCUSDT", Side.LONG, D("0.02"), make_client_id(PID, OrderPurpose.ENTRY))
        stop = await venue.place_stop("BTCUSDT", Side.LONG, D("0.02"), D(59000), make_client_id(PID, OrderPurpose.STOP))
        await positions.wait_for(lambda p: isinstance(p, PositionSnapshot) and p.amount == D("0.02"))
        sim.venue.set_mark("BTCUSDT", D(58900))
        flat = await positions.wait_for(lambda p: isinstance(p, PositionSnapshot) and p.amount == 0)
        assert flat.symbol == "BTCUSDT"
        triggered = await orders.wait_for(lambda o: isinstance(o, OrderSnapshot) and o.algo_id == stop.algo_id
                                          and o.exchange_order_id is not None)
        assert (triggered.status, triggered.filled) == (OrderStatus.OPEN, 0)  # TRIGGERED placed an order; no fill yet
        fired = await orders.wait_for(lambda o: isinstance(o, OrderSnapshot) and o.algo_id == stop.algo_id
                                      and o.status is OrderStatus.FILLED)
        assert (fired.client_id, fired.filled, fired.exchange_order_id) == (f"lc-{PID}-s0", D("0.02"),
                                                                            triggered.exchange_order_id)
        assert stop.algo_id is not None
        assert sim.venue.open_algos(account, "BTCUSDT") == []
        assert account.algos[int(stop.algo_id)].working_type == "MARK_PRICE"
        fill = await orders.wait_for(lambda o: isinstance(o, OrderSnapshot) and o.algo_id is None
                                     and o.client_id == f"lc-{PID}-s0" and o.status is OrderStatus.FILLED)
        assert fill.average_price == D(58900) and fill.type == "MARKET"
        await marks.wait_for(lambda m: not isinstance(m, Resynced) and m.price == D(58900))
        assert venue.health == {"positions": StreamHealth.HEALTHY, "orders": StreamHealth.HEALTHY,
                                "marks": StreamHealth.HEALTHY}
    finally:
        for c in (positions, orders, marks):
            await c.stop()


async def _error_of(call: Any) -> errors.ExchangeError:
    with pytest.raises(errors.ExchangeError) as caught:
        await call
    assert isinstance(caught.value.__cause__, Exception)  # raised from the ccxt error
    return caught.value


async def test_venue_errors_arrive_as_domain_errors_without_secrets(venue: CcxtExchange, sim: SimServer,
                                                                    account: Account) -> None:
    await venue.place_entry("BTCUSDT", Side.LONG, D("0.01"), "lc-x")
    crossed = await _error_of(venue.place_stop("BTCUSDT", Side.LONG, D("0.01"), D(61000), "lc-y"))
    assert type(crossed) is errors.StopWouldTrigger and crossed.code == -2021
    gone = await _error_of(venue.cancel_order(OrderRef(client_id="n", position_id=PID, symbol="BTCUSDT",
                                                       purpose=OrderPurpose.STOP, side="sell", quantity=D(1),
                                                       algo_id="999999")))
    assert type(gone) is errors.OrderNotFound
    reduce = await _error_of(venue.close_position("ETHUSDT", Side.LONG, D(1), "lc-z"))
    assert type(reduce) is errors.ReduceOnlyRejected
    sim.set_faults(rate_limit=1)
    assert type(await _error_of(venue.positions())) is errors.RateLimited
    sim.set_faults(ip_ban=1)
    assert type(await _error_of(venue.positions())) is errors.RateLimited
    sim.set_faults(http_5xx=2)
    assert type(await _error_of(venue.positions())) is errors.Retryable  # HTML 503
    assert type(await _error_of(venue.positions())) is errors.Retryable  # JSON -1001
    assert await venue.positions()  # and the faults are off again
    for e in (crossed, gone, reduce):
        text = str(e)
        assert account.api_key not in text and account.secret not in text
        assert "signature=" not in text.replace("signature=<redacted>", "")


async def test_a_bad_key_or_signature_is_fatal_and_names_no_secret(sim: SimServer, account: Account) -> None:
    wrong_secret = settings_for(sim, account, secret=Secret("f" * 64))
    with pytest.raises(errors.Fatal) as bad_sig:
        await _start_and_call(wrong_secret)
    assert bad_sig.value.code == -1022
    wrong_key = settings_for(sim, account, api_key=Secret("nobody-" + "k" * 20))
    with pytest.raises(errors.Fatal) as bad_key:
        await _start_and_call(wrong_key)
    assert bad_key.value.code == -2015
    for e in (bad_sig.value, bad_key.value):
        assert "f" * 64 not in str(e) and "k" * 20 not in str(e) and account.secret not in str(e)
    assert "***" in repr(wrong_secret.secret) and account.secret not in repr(settings_for(sim, account))


async def _start_and_call(settings: ExchangeSettings) -> None:
    adapter = await CcxtExchange(settings).start()
    try:
        await adapter.positions()
    finally:
        await adapter.close()


async def test_the_sandbox_switch_is_applied_and_url_overrides_still_win(sim: SimServer, account: Account) -> None:
    adapter = await CcxtExchange(settings_for(sim, account, sandbox=True)).start()
    try:
        assert adapter.client.isSandboxModeEnabled
        assert adapter.client.urls["api"]["fapiPrivate"].startswith(sim.rest_url)
        assert adapter.client.urls["api"]["ws"]["linear"] == sim.ws_url
        assert await adapter.positions() == []
    finally:
        await adapter.close()


def test_client_ids_encode_position_and_purpose_and_refuse_what_is_not_ours() -> None:
    from lifecycle.client_ids import parse_client_id

    cid = make_client_id(PID, OrderPurpose.TAKE_PROFIT, 12)
    assert cid == f"lc-{PID}-t12" and len(cid) <= 36
    parsed = parse_client_id(cid)
    assert parsed is not None
    assert (parsed.position_id, parsed.purpose, parsed.attempt) == (PID, OrderPurpose.TAKE_PROFIT, 12)
    for foreign in ("autoclose-1700000000000", "adl_autoclose", "web_abc", "x-cvBPrNm9", None, f"lc-{PID}-z1"):
        assert parse_client_id(foreign) is None
    with pytest.raises(ValueError):
        make_client_id("not-hex", OrderPurpose.STOP)


def test_translation_of_codes_and_ccxt_classes_and_redaction() -> None:
    import ccxt

    from exchange.ccxt_adapter import translate

    cases = [
        (ccxt.InvalidOrder('binanceusdm {"code":-4116,"msg":"ClientOrderId is duplicated."}'), errors.DuplicateOrder),
        (ccxt.ExchangeError('binanceusdm {"code":-1125,"msg":"This listenKey does not exist."}'), errors.Retryable),
        (ccxt.ExchangeClosedByUser("Connection closed by the user"), errors.Retryable),
        (ccxt.ExchangeError('binanceusdm {"code": -2021, "msg": "Order would immediately trigger."}'),
         errors.StopWouldTrigger),
        (ccxt.DDoSProtection("binanceusdm 418"), errors.RateLimited),
        (ccxt.AuthenticationError('{"code":-2015}'), errors.Fatal),
        (ccxt.ExchangeError("something new"), errors.Rejected),
    ]
    for raw, kind in cases:
        assert type(translate(raw)) is kind, raw
    leaky = ccxt.NetworkError("GET http://x/private/ws?listenKey=pqia91ma19a5s61cv6a81va65sdf19v8 and "
                              "https://x/fapi/v1/order?timestamp=1&signature=0a1b2c3d4e apiKey=SECRETKEY123")
    out = translate(leaky, hide=("SECRETKEY123",))
    for text in (str(out), str(leaky)):  # the chained ccxt error is scrubbed too
        assert "pqia91ma19" not in text and "0a1b2c3d4e" not in text and "SECRETKEY123" not in text


async def test_a_recreate_from_outside_the_streams_resubscribes_them(venue: CcxtExchange, sim: SimServer) -> None:
    positions = Collector(venue.position_updates())
    try:
        await positions.wait_for(lambda i: isinstance(i, Resynced))
        await venue.recreate(venue.generation, "reconciliation suspects a wedge")  # closes the old client
        await positions.wait_for(lambda i: isinstance(i, Resynced) and i.reason == "reconnected")
        assert not positions.task.done()  # the stream survived its watch being cancelled under it
    finally:
        await positions.stop()


async def test_the_accounts_of_one_process_share_one_copy_of_the_markets(sim: SimServer) -> None:
    """Issue 14: many accounts per process cheaply. The second account's client takes the first one's markets
    (no exchangeInfo call, the same objects); once the adapter that loaded them closes, the next loads anew."""
    alice, bob, carol = (sim.venue.add_account(n) for n in ("alice", "bob", "carol"))
    info = "GET /fapi/v1/exchangeInfo"
    first = await CcxtExchange(settings_for(sim, alice)).start()
    second = await CcxtExchange(settings_for(sim, bob)).start()
    try:
        assert sim.calls[info] == 1
        assert second.client.markets is first.client.markets
        assert second.client.markets_by_id is first.client.markets_by_id
        await second.check_account(["BTCUSDT"])  # the shared markets serve real calls (it raises otherwise)
        assert second.tick_size("BTCUSDT") == first.tick_size("BTCUSDT") is not None
    finally:
        await first.close()
    third = await CcxtExchange(settings_for(sim, carol)).start()
    try:
        assert sim.calls[info] == 2 and third.client.markets is not second.client.markets
    finally:
        await second.close()
        await third.close()


async def test_a_protective_request_goes_ahead_of_the_requests_waiting_for_the_rate_limiter(
        sim: SimServer, account: Account) -> None:
    """ccxt's rate limiter is first come, first served: an initial stop waited 4-7 s behind a burst of entries
    (bench.burst, 50 positions opened at once). Requests made inside `protective()` go ahead of every waiting
    request that is not, in their own order; others (a take-profit here) keep their place; the pace is unchanged."""
    from exchange.port import protective
    from tests.waiting import until

    venue = await CcxtExchange(settings_for(sim, account, rate_limit=True)).start()
    try:
        entry = make_client_id(PID, OrderPurpose.ENTRY)
        await venue.place_entry("BTCUSDT", Side.LONG, D("0.03"), entry)
        finished: list[str] = []

        async def timed(name: str, call: Any, first: bool = False) -> None:
            with protective(first):
                await call
            finished.append(name)

        throttler = venue.client.throttler
        reads = [asyncio.create_task(timed(f"read{i}", venue.order_by_client_id("BTCUSDT", entry)))
                 for i in range(10)]
        await until(lambda: len(throttler.queue) >= 8, what="the reads waiting for the rate limiter")
        stop = asyncio.create_task(timed("stop", venue.place_stop(
            "BTCUSDT", Side.LONG, D("0.03"), D(58000), make_client_id(PID, OrderPurpose.STOP)), first=True))
        tp = asyncio.create_task(timed("tp", venue.place_stop(
            "BTCUSDT", Side.LONG, D("0.03"), D(65000), make_client_id(PID, OrderPurpose.TAKE_PROFIT),
            OrderPurpose.TAKE_PROFIT)))
        close = asyncio.create_task(timed("close", venue.close_position(
            "BTCUSDT", Side.LONG, D("0.01"), make_client_id(PID, OrderPurpose.CLOSE)), first=True))
        await asyncio.gather(stop, tp, close, *reads)
        # The reads sent before the stop was asked for (at most one released meanwhile) finish before it; every
        # other read finishes after both protective requests, which keep their own order; the take-profit last.
        assert finished.index("stop") <= 2 and finished.index("close") == finished.index("stop") + 1, finished
        assert finished[-1] == "tp", finished
        assert len(await venue.open_orders("BTCUSDT")) == 2  # the stop and the take-profit
    finally:
        await venue.close()


async def test_protective_requests_keep_their_order_when_one_in_the_middle_is_given_up() -> None:
    """ccxt's own throttler: a protective request whose caller was cancelled stays in the queue until the loop
    reaches it; the protective ones behind it must not be overtaken by the next one (review: the scan stopped
    at the given-up entry and put the newest protective request before an older one)."""
    from ccxt.async_support.base.throttler import Throttler

    from exchange.ccxt_adapter import _ahead

    throttler = Throttler({"refillRate": 1 / 20, "delay": 0.001, "capacity": 1.0, "tokens": 0, "cost": 1.0})
    released: list[str] = []

    def note(name: str, future: asyncio.Future[None]) -> asyncio.Future[None]:
        future.add_done_callback(lambda f: None if f.cancelled() else released.append(name))
        return future

    plain = [note(f"plain{i}", throttler(1)) for i in range(3)]
    first = note("first", _ahead(throttler, 1))
    given_up = _ahead(throttler, 1)
    second = note("second", _ahead(throttler, 1))
    given_up.cancel()
    await asyncio.sleep(0)  # one turn of the loop: the cancelled future's callbacks run (it leaves the set)
    third = note("third", _ahead(throttler, 1))
    await asyncio.wait_for(asyncio.gather(first, second, third, *plain), 5)
    assert released.index("first") < released.index("second") < released.index("third") < released.index("plain2")
