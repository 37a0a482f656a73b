"""Silences of the user-data stream and how the adapter ends them (listenKeyExpired, scheduled keepalive, the
public probe), dropped frames counted by reason, the start-time account checks and a key that stops working.

Everything runs against the venue simulator through the unmodified ccxt client.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from loguru import logger

from exchange import errors
from exchange.ccxt_adapter import CcxtExchange, ExchangeSettings, _FrameDrops
from exchange.port import PositionSnapshot, Resynced, StreamControl, StreamHealth
from exchange.secret import Secret
from exchange.sim.server import SimServer
from exchange.sim.venue import Account
from lifecycle.app.settings import ConfigError, load
from lifecycle.domain import Side
from tests.simclient import keyed, signed
from tests.test_ccxt_adapter import Collector, account, settings_for, sim, venue  # noqa: F401  (fixtures)
from tests.test_sim_payload_shapes import assert_like

PUT_KEY = "PUT /fapi/v1/listenKey"


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.005)


@pytest.fixture
def log() -> Iterator[list[tuple[str, str]]]:
    """(level, message) of every log line of INFO and above while the test runs."""
    lines: list[tuple[str, str]] = []
    sink = logger.add(lambda m: lines.append((m.record["level"].name, m.record["message"])), level="INFO")
    yield lines
    logger.remove(sink)


async def started(sim: SimServer, account: Account, **overrides: Any) -> CcxtExchange:
    return await CcxtExchange(settings_for(sim, account, **overrides)).start()


async def subscribed(adapter: CcxtExchange, *names: str) -> dict[str, Collector]:
    """Collectors for the named streams, each announced and subscribed."""
    streams = {"positions": adapter.position_updates, "orders": adapter.order_updates}
    out = {name: Collector(streams[name]()) for name in names}
    for name, c in out.items():
        await c.wait_for(lambda i: isinstance(i, Resynced))

        def healthy(n: str = name) -> bool:
            return adapter.health.get(n) is StreamHealth.HEALTHY

        await until(healthy, what=f"{name} healthy")
    return out


def position_frame(symbol: str, amount: str, at_ms: int | None = None, **entry: Any) -> str:
    at = at_ms if at_ms is not None else int(time.time() * 1000)
    position = {"s": symbol, "pa": amount, "ep": "0", "ps": "BOTH", **entry}
    return json.dumps({"e": "ACCOUNT_UPDATE", "E": at, "T": at, "a": {"m": "ORDER", "B": [], "P": [position]}})


# --- the four silences, as the simulator shows them (below ccxt) --------------------------------------


class RawUserStream:
    """One user-data connection read into a list; `closed` once the server closes it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.events = ws, []  # type: ignore[var-annotated]
        self.closed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.events.append(json.loads(msg.data))
        self.closed.set()

    async def through(self, sim: SimServer, account: Account) -> list[dict[str, Any]]:
        """Every event sent before a marker frame injected now (the simulator sends in order on a connection):
        what was not delivered by then never will be."""
        marker = {"e": "MARKER", "E": time.monotonic_ns()}
        sim.inject_user_text(account.api_key, json.dumps(marker))
        await until(lambda: marker in self.events, what="the marker")
        return self.events[:self.events.index(marker)]


@pytest.mark.parametrize("silence", ["expired, no notice", "expired, notice", "wedged socket",
                                     "dropped, reconnects refused"])
async def test_each_silence_is_reproducible_in_the_simulator(sim: SimServer, account: Account, silence: str) -> None:
    async with aiohttp.ClientSession() as session:
        _, body = await keyed(session, sim, account, "POST", "/fapi/v1/listenKey")
        url = f"ws://127.0.0.1:{sim.ws_port}/private/ws?listenKey={body['listenKey']}"
        stream = RawUserStream(await session.ws_connect(url))
        await until(lambda: bool(sim.user_subs.get(body["listenKey"])), what="the connection registered")
        if silence == "dropped, reconnects refused":
            sim.set_faults(user_stream_down=True)
            await sim.drop_streams()
            await asyncio.wait_for(stream.closed.wait(), 5)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url)
            assert refused.value.status == 503
            sim.set_faults(user_stream_down=False)
            again = RawUserStream(await session.ws_connect(url))  # the fault off: connections are taken again
            await signed(session, sim, account, "POST", "/fapi/v1/order", symbol="BTCUSDT", side="BUY",
                         type="MARKET", quantity="0.01")
            assert any(e["e"] == "ORDER_TRADE_UPDATE" for e in await again.through(sim, account))
            return
        if silence == "expired, no notice":
            sim.expire_listen_keys()
        elif silence == "expired, notice":  # through the control API, as a test in another process would
            async with session.post(f"{sim.rest_url}/_sim/expire_listen_keys", json={"notice": True}) as r:
                assert r.status == 200
        else:
            sim.set_faults(ws_silent=True)
        await signed(session, sim, account, "POST", "/fapi/v1/order", symbol="BTCUSDT", side="BUY", type="MARKET",
                     quantity="0.01")
        seen = [e["e"] for e in await stream.through(sim, account)]
        assert seen == (["listenKeyExpired"] if silence == "expired, notice" else [])  # the fill never arrives
        assert not stream.closed.is_set()  # the socket stays open in every one of them
        status, answer = await keyed(session, sim, account, "PUT", "/fapi/v1/listenKey")
        if silence == "wedged socket":
            assert status == 200 and answer == {"listenKey": body["listenKey"]}  # the key is alive
        else:
            assert answer["code"] == -1125
        sim.set_faults(ws_silent=False)
        await stream.ws.close()


# --- 1. listenKeyExpired: SILENT and a new key at once ------------------------------------------------


async def test_a_listen_key_expired_notice_marks_the_user_streams_silent_and_resubscribes_at_once(
        sim: SimServer, account: Account) -> None:
    # The idle probe and the scheduled keepalive are far away: only the notice can set this off.
    adapter = await started(sim, account, user_probe_after_s=600.0)
    streams = await subscribed(adapter, "positions", "orders")
    try:
        generation, reconnects = adapter.generation, dict(adapter.reconnects)
        sim.set_faults(rest_latency_ms=300)  # the new client's start takes a while: SILENT can be seen meanwhile
        sim.expire_listen_keys(notice=True)
        await until(lambda: adapter.health["positions"] is StreamHealth.SILENT
                    and adapter.health["orders"] is StreamHealth.SILENT, timeout=2, what="the user streams SILENT")
        assert adapter.health.get("marks") is None  # nothing else touched
        sim.set_faults(rest_latency_ms=0)
        for c in streams.values():
            await c.wait_for(lambda i: isinstance(i, Resynced) and i.reason == "reconnected", timeout=5)
        assert adapter.generation == generation + 1  # one new client for both streams
        assert all(adapter.reconnects[n] > reconnects[n] for n in ("positions", "orders"))
        await adapter.place_entry("BTCUSDT", Side.LONG, D("0.01"), "lc-after-notice")  # the new key delivers
        await streams["positions"].wait_for(lambda p: isinstance(p, PositionSnapshot) and p.amount == D("0.01"))
        assert sim.calls[PUT_KEY] == 0  # no probe was needed
    finally:
        for c in streams.values():
            await c.stop()
        await adapter.close()


# --- 2. the keepalive on a schedule, whatever the traffic --------------------------------------------


async def test_the_listen_key_is_kept_alive_on_schedule_while_the_stream_is_busy(sim: SimServer,
                                                                                account: Account) -> None:
    # ccxt's own keepalive timer is pushed out of the way: what keeps the key alive here is the adapter's.
    adapter = await started(sim, account, user_probe_after_s=600.0, listen_key_keepalive_s=0.3,
                            options={"listenKeyRefreshRate": 3_600_000})
    streams = await subscribed(adapter, "positions")
    stop = asyncio.Event()

    async def traffic() -> None:  # a user-data frame every 50 ms: the stream is never idle
        at = int(time.time() * 1000)
        while not stop.is_set():
            at += 1
            sim.inject_user_text(account.api_key, position_frame("BTCUSDT", "0", at))
            await asyncio.sleep(0.05)

    busy = asyncio.create_task(traffic())
    try:
        started_at = time.monotonic()
        await until(lambda: sim.calls[PUT_KEY] >= 3, timeout=5, what="three scheduled keepalives")
        took = time.monotonic() - started_at
        delivered = streams["positions"].count(lambda p: isinstance(p, PositionSnapshot))
        assert delivered >= took / 0.05 / 2  # the stream really was busy all along
        assert adapter.health["positions"] is StreamHealth.HEALTHY
    finally:
        stop.set()
        await busy
        await streams["positions"].stop()
        await adapter.close()


async def test_a_scheduled_keepalive_that_finds_the_key_expired_resubscribes(sim: SimServer,
                                                                             account: Account) -> None:
    adapter = await started(sim, account, user_probe_after_s=600.0, listen_key_keepalive_s=0.3,
                            options={"listenKeyRefreshRate": 3_600_000})
    streams = await subscribed(adapter, "orders")
    try:
        sim.expire_listen_keys()  # no notice: only a keepalive can tell
        await streams["orders"].wait_for(lambda i: isinstance(i, Resynced) and i.reason == "reconnected", timeout=5)
        await adapter.place_entry("BTCUSDT", Side.LONG, D("0.01"), "lc-after-keepalive")
        await streams["orders"].wait_for(lambda o: getattr(o, "client_id", None) == "lc-after-keepalive")
    finally:
        await streams["orders"].stop()
        await adapter.close()


def test_the_probe_and_keepalive_periods_are_settings_with_bounds(tmp_path: Path) -> None:
    def config(extra: str) -> Path:
        path = tmp_path / "lifecycle.toml"
        path.write_text(f'''
[[accounts]]
name = "main"
symbols = ["BTCUSDT"]
api_key_env = "K"
secret_env = "S"
{extra}
''', encoding="utf-8")
        return path

    settings = load(config("user_probe_after_s = 5\nlisten_key_keepalive_s = 600\nmarket_silent_after_s = 3"),
                    check_secrets=False)
    built = settings.exchange_settings(settings.accounts[0], {"K": "key", "S": "secret"})
    assert (built.user_probe_after_s, built.listen_key_keepalive_s, built.market_silent_after_s) == (5, 600, 3)
    defaults = load(config(""), check_secrets=False)
    built = defaults.exchange_settings(defaults.accounts[0], {"K": "key", "S": "secret"})
    assert (built.user_probe_after_s, built.listen_key_keepalive_s, built.market_silent_after_s) == (30, 1800, 10)
    for line, key in [("listen_key_keepalive_s = 0", "accounts.0.listen_key_keepalive_s"),
                      ("listen_key_keepalive_s = 3600", "accounts.0.listen_key_keepalive_s"),
                      ("user_probe_after_s = -1", "accounts.0.user_probe_after_s"),
                      ("market_silent_after_s = 0", "accounts.0.market_silent_after_s")]:
        with pytest.raises(ConfigError) as refused:
            load(config(line), check_secrets=False)
        assert str(refused.value).startswith(f"{key}: ")
    with pytest.raises(ValueError, match="listen_key_keepalive_s must be > 0"):
        ExchangeSettings(listen_key_keepalive_s=0)


async def test_ccxt_keeps_alive_on_our_period_and_its_timer_dies_with_a_replaced_client(
        sim: SimServer, account: Account) -> None:
    adapter = await started(sim, account, user_probe_after_s=600.0, listen_key_keepalive_s=0.25)
    streams = await subscribed(adapter, "positions")
    try:
        assert adapter.client.options["listenKeyRefreshRate"] == 250  # ccxt's own timer follows the setting
        old = adapter.client
        await adapter.recreate(adapter.generation, "test")
        await streams["positions"].wait_for(lambda i: isinstance(i, Resynced) and i.reason == "reconnected")
        before = sim.calls[PUT_KEY]
        await until(lambda: sim.calls[PUT_KEY] >= before + 4, what="keepalives on the new client")
        # The old client's timer fired meanwhile (it was due first): on a closed client ccxt 4.5.90 would
        # have reopened an aiohttp session that nobody closes.
        assert old.closed_by_user and old.session is None
    finally:
        await streams["positions"].stop()
        await adapter.close()


# --- 3. the public probe and the doubt -------------------------------------------------------------


async def test_probe_user_stream_alive_expired_and_unknown(sim: SimServer, account: Account,
                                                           log: list[tuple[str, str]]) -> None:
    adapter = await started(sim, account, user_probe_after_s=600.0)
    control: StreamControl = adapter  # what the engine may rely on
    streams = await subscribed(adapter, "positions", "orders")
    try:
        puts, generation = sim.calls[PUT_KEY], adapter.generation
        assert await control.probe_user_stream("REST shows BTCUSDT flat") is True
        assert sim.calls[PUT_KEY] == puts + 1 and adapter.generation == generation  # alive: nothing recreated
        assert adapter.doubted == {"positions": "REST shows BTCUSDT flat", "orders": "REST shows BTCUSDT flat"}
        await adapter.place_entry("BTCUSDT", Side.LONG, D("0.01"), "lc-probe")  # both streams deliver it
        await until(lambda: adapter.doubted == {}, what="the doubt lifted by deliveries")

        sim.set_faults(http_5xx=1)
        assert await control.probe_user_stream("REST again") is None  # the venue could not say
        assert adapter.generation == generation and set(adapter.doubted) == {"positions", "orders"}

        sim.expire_listen_keys()  # no notice
        reconnects = dict(adapter.reconnects)
        assert await control.probe_user_stream("REST shows ETHUSDT gone") is False
        assert adapter.generation == generation + 1  # recreated before the probe returned
        assert all(adapter.reconnects[n] == reconnects[n] + 1 for n in ("positions", "orders"))
        for c in streams.values():
            await c.wait_for(lambda i: isinstance(i, Resynced) and i.reason == "reconnected")
        await until(lambda: adapter.doubted == {}, what="the doubt lifted by the new subscription")
        assert all(adapter.health[n] is StreamHealth.HEALTHY for n in ("positions", "orders"))
        assert any("listen key expired" in m for _, m in log)
        # ccxt raises -1125 as an AuthenticationError: an expired listen key is still no refused API key.
        assert adapter.auth_failure is None and not [m for level, m in log if level == "CRITICAL"]
    finally:
        for c in streams.values():
            await c.stop()
        await adapter.close()


def test_an_expired_listen_key_is_retryable_though_ccxt_calls_it_an_authentication_error() -> None:
    import ccxt

    from exchange.ccxt_adapter import translate

    expired = translate(ccxt.AuthenticationError('binanceusdm {"code":-1125,"msg":"This listenKey does not exist."}'))
    assert type(expired) is errors.Retryable and expired.code == -1125
    refused = translate(ccxt.AuthenticationError('binanceusdm {"code":-2015,"msg":"Invalid API-key, IP, or '
                                                 'permissions for action."}'))
    assert type(refused) is errors.Fatal and refused.code == -2015


# --- 5. dropped frames --------------------------------------------------------------------------------


async def test_every_kind_of_bad_frame_is_dropped_counted_by_reason_and_the_stream_goes_on(
        venue: CcxtExchange, sim: SimServer, account: Account, log: list[tuple[str, str]]) -> None:
    positions = Collector(venue.position_updates())
    try:
        await positions.wait_for(lambda i: isinstance(i, Resynced))
        await until(lambda: venue.health.get("positions") is StreamHealth.HEALTHY)
        ts = int(time.time() * 1000)
        frames = [
            position_frame("BTCUSDT", "0.5", ts, pa=None),  # missing_field: ccxt would read it as flat
            position_frame("NOPEUSDT", "3", ts),  # unknown_symbol
            position_frame("BTCUSDT", "lots", ts),  # bad_value
            json.dumps({"e": "SOMETHING_NEW", "E": ts}),  # unknown_event
            "<html>502 Bad Gateway</html>",  # not_json: ccxt hands it on as a string
            '{"e": "ACCOUNT_UPDATE", "a": {',  # not_json: looks like JSON; ccxt's receive loop died on it
            json.dumps({"e": "ORDER_TRADE_UPDATE", "E": ts, "T": ts, "o": {"s": "BTCUSDT", "X": "NEW"}}),  # missing
        ]
        for text in frames:
            sim.inject_user_text(account.api_key, text)
        sim.inject_user_text(account.api_key, position_frame("ETHUSDT", "0", ts + 1))  # the marker: a good frame
        await positions.wait_for(lambda p: isinstance(p, PositionSnapshot) and p.symbol == "ETHUSDT")
        assert venue.dropped_frames == {"missing_field": 2, "unknown_symbol": 1, "bad_value": 1,
                                        "unknown_event": 1, "not_json": 2}
        assert venue.malformed_frames == 7
        shown = [p for p in positions.items if isinstance(p, PositionSnapshot)]
        assert [p.symbol for p in shown] == ["ETHUSDT"]  # no flat BTCUSDT, no NOPEUSDT
        await venue.place_entry("BTCUSDT", Side.LONG, D("0.01"), "lc-after-bad-frames")  # still alive
        await positions.wait_for(lambda p: isinstance(p, PositionSnapshot) and p.amount == D("0.01"))
        assert venue.health["positions"] is StreamHealth.HEALTHY
        dropped = [m for level, m in log if level == "WARNING" and "dropped a stream frame" in m]
        assert len(dropped) == 5  # one line per reason in the window; the second of a reason is suppressed
        assert any("missing_field" in m and "no pa" in m for m in dropped)
        assert any("unknown_symbol" in m and "NOPEUSDT" in m for m in dropped)
        assert any("SOMETHING_NEW" in m for m in dropped)
    finally:
        await positions.stop()


def test_dropped_frames_are_logged_once_per_reason_per_window_with_the_number_suppressed() -> None:
    now = [100.0]
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    try:
        drops = _FrameDrops("binanceusdm", ("SECRETKEY",), every_s=10.0, clock=lambda: now[0])
        for _ in range(4):
            drops.note("not_json", "a text frame of 12 characters")
        drops.note("unknown_symbol", "symbol 'XUSDT' with SECRETKEY in it")
        now[0] += 9.9
        drops.note("not_json", "a text frame of 3 characters")
        now[0] += 0.2
        drops.note("not_json", "a text frame of 5 characters")
    finally:
        logger.remove(sink)
    assert drops.counts == {"not_json": 6, "unknown_symbol": 1}
    assert len(lines) == 3
    assert lines[0].endswith("dropped a stream frame (not_json): a text frame of 12 characters")
    assert "SECRETKEY" not in lines[1] and "<redacted>" in lines[1]
    assert lines[2].endswith("(not_json): a text frame of 5 characters (4 more dropped for this reason since the "
                             "last line)")


# --- 6. start-time account checks --------------------------------------------------------------------


async def test_a_sound_account_passes_with_two_rest_calls(sim: SimServer, account: Account) -> None:
    adapter = await started(sim, account)
    try:
        before = dict(sim.calls)
        await adapter.check_account(["BTCUSDT", "ETHUSDT"])
        made = {k: v - before.get(k, 0) for k, v in sim.calls.items() if v != before.get(k, 0)}
        assert made == {"GET /fapi/v1/accountConfig": 1, "GET /fapi/v1/positionSide/dual": 1}
    finally:
        await adapter.close()


REFUSED_KEY = ("the venue refuses the API key (-2015 Invalid API-key, IP, or permissions for action.): it is unknown "
               "or disabled, lacks futures permission, or this IP is not allowed")


@pytest.mark.parametrize(("problem", "expected"), [
    ("unknown key", REFUSED_KEY),
    ("wrong secret", "the venue refuses the request signature (-1022 Signature for this request is not valid.): "
                     "the secret does not belong to the API key"),
    ("revoked key", REFUSED_KEY),
    ("cannot trade", "the account may not trade (canTrade is false): enable futures trading for the API key and "
                     "check the account for restrictions"),
    ("hedge mode", "hedge mode is not supported; switch the account to one-way mode"),
    ("unknown symbol", "NOPEUSDT is not listed on binanceusdm"),
    ("unknown symbols", "NOPEUSDT, ZZZUSDT are not listed on binanceusdm"),
])
async def test_an_account_the_engine_cannot_run_is_refused_with_one_line(sim: SimServer, account: Account,
                                                                         problem: str, expected: str) -> None:
    wrong_key, wrong_secret = "nobody-" + "k" * 25, "f" * 64
    overrides: dict[str, Any] = {}
    symbols = ["BTCUSDT"]
    if problem == "unknown key":
        overrides["api_key"] = Secret(wrong_key)
    elif problem == "wrong secret":
        overrides["secret"] = Secret(wrong_secret)
    elif problem == "revoked key":
        sim.revoke_key(account.api_key)
    elif problem == "cannot trade":
        sim.set_account(account.api_key, can_trade=False)
    elif problem == "hedge mode":
        sim.set_account(account.api_key, dual_side_position=True)
    else:
        symbols = ["BTCUSDT", "NOPEUSDT"] + (["ZZZUSDT"] if problem == "unknown symbols" else [])
    adapter = await started(sim, account, **overrides)  # exchange info is public: the start itself works
    try:
        with pytest.raises(errors.Fatal) as refused:
            await adapter.check_account(symbols)
        message = str(refused.value)
        assert message == expected
        for secret in (wrong_key, wrong_secret, account.api_key, account.secret):
            assert secret not in message and secret[:12] not in message
    finally:
        await adapter.close()


async def test_hedge_mode_on_the_simulator_refuses_one_way_orders(sim: SimServer, account: Account) -> None:
    adapter = await started(sim, account)
    try:
        sim.set_account(account.api_key, dual_side_position=True)
        with pytest.raises(errors.Rejected) as refused:
            await adapter.place_entry("BTCUSDT", Side.LONG, D("0.01"), "lc-hedge")
        assert refused.value.code == -4061
    finally:
        await adapter.close()


async def test_account_config_and_position_mode_have_binances_documented_shapes(sim: SimServer,
                                                                                account: Account) -> None:
    async with aiohttp.ClientSession() as session:
        status, config = await signed(session, sim, account, "GET", "/fapi/v1/accountConfig")
        assert status == 200 and config["canTrade"] is True and config["dualSidePosition"] is False
        assert_like("account_config.json", config)
        sim.set_account(account.api_key, dual_side_position=True, can_trade=False)
        status, mode = await signed(session, sim, account, "GET", "/fapi/v1/positionSide/dual")
        assert status == 200 and mode == {"dualSidePosition": True}
        assert_like("position_side_dual.json", mode)
        _, v2 = await signed(session, sim, account, "GET", "/fapi/v2/account")
        assert v2["canTrade"] is False and "assets" in v2
        async with session.post(f"{sim.rest_url}/_sim/account", json={"api_key": account.api_key,
                                                                      "dual_side_position": False}) as r:
            assert r.status == 200
        assert (await signed(session, sim, account, "GET", "/fapi/v1/positionSide/dual"))[1] == {
            "dualSidePosition": False}


# --- 7. a key that stops working after the start -----------------------------------------------------


async def test_a_key_revoked_after_the_start_is_reported_until_it_works_again(
        venue: CcxtExchange, sim: SimServer, account: Account, log: list[tuple[str, str]]) -> None:
    assert await venue.positions() == [] and venue.auth_failure is None
    async with (aiohttp.ClientSession() as session,  # the control action, as a test of another process would
                session.post(f"{sim.rest_url}/_sim/revoke_key", json={"api_key": account.api_key}) as r):
        assert r.status == 200
    for _ in range(3):
        with pytest.raises(errors.Fatal):
            await venue.positions()
    assert venue.auth_failure == "-2015 Invalid API-key, IP, or permissions for action."
    critical = [m for level, m in log if level == "CRITICAL"]
    assert len(critical) == 1 and "refuses the API key" in critical[0]  # once per minute, not per call
    with pytest.raises(errors.Fatal):
        await venue.open_orders()
    assert venue.auth_failure is not None and len([1 for level, _ in log if level == "CRITICAL"]) == 1
    sim.revoke_key(account.api_key, revoked=False)
    assert await venue.positions() == []
    assert venue.auth_failure is None
    assert any("accepts the API key again" in m for _, m in log)
    for _, message in log:
        assert account.api_key not in message and account.secret not in message


async def test_a_revoked_key_seen_by_the_keepalive_counts_too(sim: SimServer, account: Account) -> None:
    adapter = await started(sim, account, user_probe_after_s=600.0)
    streams = await subscribed(adapter, "positions")
    try:
        sim.revoke_key(account.api_key)
        assert await adapter.probe_user_stream("REST disagrees") is None  # not an expiry: nothing recreated
        assert adapter.auth_failure == "-2015 Invalid API-key, IP, or permissions for action."
    finally:
        await streams["positions"].stop()
        await adapter.close()

