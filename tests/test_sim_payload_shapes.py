"""The simulator's payloads have the field names and JSON types of Binance's documented examples.

Fixtures in tests/fixtures/binance/ are Binance's own examples (see SOURCES.md there). JSON does not
tell integers from decimals, so both compare as "number"; everything else compares exactly.
"""
from __future__ import annotations

import json
from collections.abc import Set as AbstractSet
from dataclasses import replace
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exchange.sim.server import SimServer
from tests.simclient import UserStream, keyed, signed

FIXTURES = Path(__file__).parent / "fixtures" / "binance"

# Documented fields a simulator has no honest value for, each with the reason it is absent.
NOT_SIMULATED: dict[str, set[str]] = {
    "leverage_bracket.json": {"notionalCoef"},  # "appears only when the user's bracket has been adjusted"
    "ws_order_trade_update.json": {"AP", "cr"},  # documented as "only pushed with TRAILING_STOP_MARKET order"
    "cancel_order.json": {"activatePrice", "priceRate"},  # "only return with TRAILING_STOP_MARKET order"
    "open_orders.json": {"activatePrice", "priceRate"},  # same
}


def shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(v, dict) and "filterType" in v for v in value):
            return {v["filterType"]: shape(v) for v in value}
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def differences(documented: Any, simulated: Any, path: str = "$", skip: AbstractSet[str] = frozenset()) -> list[str]:
    if isinstance(documented, dict) and isinstance(simulated, dict):
        out = []
        for key in documented.keys() - simulated.keys() - skip:
            out.append(f"{path}.{key}: documented, missing")
        for key in simulated.keys() - documented.keys():
            out.append(f"{path}.{key}: sent, not documented")
        for key in documented.keys() & simulated.keys():
            out += differences(documented[key], simulated[key], f"{path}.{key}", skip)
        return out
    if isinstance(documented, list) and isinstance(simulated, list):
        if not documented or not simulated:
            return [] if documented == simulated else [f"{path}: empty on one side"]
        return differences(documented[0], simulated[0], f"{path}[0]", skip)
    return [] if documented == simulated else [f"{path}: documented {documented}, sent {simulated}"]


def assert_like(fixture: str, payload: Any) -> None:
    documented = shape(json.loads((FIXTURES / fixture).read_text()))
    found = differences(documented, shape(payload), skip=NOT_SIMULATED.get(fixture, set()))
    assert found == [], f"{fixture}: {found}"


@pytest.fixture
async def world():
    sim = await SimServer().start()
    account = sim.venue.add_account("shapes")
    async with aiohttp.ClientSession() as session:
        stream = await UserStream().open(session, sim, account)
        yield sim, account, session, stream
        stream.close()
    await sim.stop()


async def test_rest_payloads_match_the_documented_examples(world) -> None:
    sim, account, session, _ = world
    public = await session.get(f"{sim.rest_url}/fapi/v1/exchangeInfo")
    info = await public.json()
    info["symbols"] = info["symbols"][:1]
    assert_like("exchange_info.json", info)
    assert_like("leverage_bracket.json", (await signed(session, sim, account, "GET", "/fapi/v1/leverageBracket"))[1])
    assert_like("listen_key.json", (await keyed(session, sim, account, "POST", "/fapi/v1/listenKey"))[1])
    status, order = await signed(session, sim, account, "POST", "/fapi/v1/order", symbol="BTCUSDT", side="BUY",
                                 type="MARKET", quantity="0.01")
    assert status == 200
    assert_like("new_order.json", order)
    assert_like("position_risk_v3.json", (await signed(session, sim, account, "GET", "/fapi/v3/positionRisk"))[1])
    assert_like("account_v3.json", (await signed(session, sim, account, "GET", "/fapi/v3/account"))[1])
    assert_like("user_trades.json", (await signed(session, sim, account, "GET", "/fapi/v1/userTrades",
                                                  symbol="BTCUSDT"))[1])
    _, limit = await signed(session, sim, account, "POST", "/fapi/v1/order", symbol="BTCUSDT", side="BUY",
                            type="LIMIT", quantity="0.01", price="50000", timeInForce="GTC")
    assert_like("open_orders.json", (await signed(session, sim, account, "GET", "/fapi/v1/openOrders"))[1])
    assert_like("cancel_order.json", (await signed(session, sim, account, "DELETE", "/fapi/v1/order",
                                                   symbol="BTCUSDT", orderId=limit["orderId"]))[1])
    status, algo = await signed(session, sim, account, "POST", "/fapi/v1/algoOrder", algoType="CONDITIONAL",
                                symbol="BTCUSDT", side="SELL", type="STOP_MARKET", quantity="0.01",
                                triggerPrice="55000", reduceOnly="true", clientAlgoId="shape-1")
    assert status == 200
    assert_like("new_algo_order.json", algo)
    assert_like("open_algo_orders.json", (await signed(session, sim, account, "GET", "/fapi/v1/openAlgoOrders"))[1])
    assert_like("cancel_algo_order.json", (await signed(session, sim, account, "DELETE", "/fapi/v1/algoOrder",
                                                        symbol="BTCUSDT", algoId=algo["algoId"]))[1])


async def test_stream_events_match_the_documented_examples(world) -> None:
    sim, account, session, stream = world
    await signed(session, sim, account, "POST", "/fapi/v1/order", symbol="ETHUSDT", side="BUY", type="MARKET",
                 quantity="0.1")
    await signed(session, sim, account, "POST", "/fapi/v1/algoOrder", algoType="CONDITIONAL", symbol="ETHUSDT",
                 side="SELL", type="STOP_MARKET", quantity="0.1", triggerPrice="2900", reduceOnly="true")
    assert_like("ws_account_update.json", await stream.wait_for(lambda e: e["e"] == "ACCOUNT_UPDATE"))
    assert_like("ws_order_trade_update.json", await stream.wait_for(lambda e: e["e"] == "ORDER_TRADE_UPDATE"))
    assert_like("ws_algo_update.json", await stream.wait_for(lambda e: e["e"] == "ALGO_UPDATE"))
    ws = await session.ws_connect(f"ws://127.0.0.1:{sim.ws_port}/market/ws/0")
    await ws.send_json({"method": "SUBSCRIBE", "params": ["ethusdt@markPrice@1s"], "id": 1})
    assert (await ws.receive_json()) == {"result": None, "id": 1}
    assert_like("ws_mark_price.json", await ws.receive_json())
    await ws.close()


@pytest.mark.parametrize("code", [-2021, -1022, -2015, -2011, -1003, -4120, -1125])
async def test_error_messages_are_binances(world, code: int) -> None:
    sim, account, session, _ = world
    documented = json.loads((FIXTURES / "errors.json").read_text())[str(code)]
    bad = type(account)("x", "not-a-key", "x", D(0))
    if code == -2021:
        status, body = await signed(session, sim, account, "POST", "/fapi/v1/algoOrder", algoType="CONDITIONAL",
                                    symbol="BTCUSDT", side="SELL", type="STOP_MARKET", quantity="0.01",
                                    triggerPrice="70000", reduceOnly="true")
    elif code == -1022:
        status, body = await signed(session, sim, replace(account, secret="wrong"), "GET", "/fapi/v3/account")
    elif code == -2015:
        status, body = await signed(session, sim, bad, "GET", "/fapi/v3/account")
    elif code == -2011:
        status, body = await signed(session, sim, account, "DELETE", "/fapi/v1/order", symbol="BTCUSDT", orderId=1)
    elif code == -1003:
        sim.set_faults(rate_limit=1)
        status, body = await signed(session, sim, account, "GET", "/fapi/v3/account")
    elif code == -4120:
        status, body = await signed(session, sim, account, "POST", "/fapi/v1/order", symbol="BTCUSDT", side="SELL",
                                    type="STOP_MARKET", quantity="0.01", stopPrice="50000")
    else:
        sim.expire_listen_keys()
        status, body = await keyed(session, sim, account, "PUT", "/fapi/v1/listenKey")
    assert body["code"] == code and status >= 400
    assert body["msg"].split("%s")[0].split(";")[0] == documented.split("%s")[0].split(";")[0]
