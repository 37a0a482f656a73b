"""The simulator's network face: Binance USDⓈ-M REST on one port, WebSocket streams on another.

REST: /fapi/v1|v2|v3/... as ccxt's binanceusdm calls them, HMAC-SHA256 signed like Binance.
WebSocket: /private/ws?listenKey=... (user data), /market/ws and /public/ws (SUBSCRIBE to
<symbol>@markPrice). Control (not Binance): /_sim/... on the REST port, used by tests and the demo.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web

from exchange.sim.faults import Faults
from exchange.sim.venue import Account, SimAlgo, SimError, SimOrder, Venue, fmt, now_ms

Handler = Callable[[web.Request, Account | None, dict[str, str]], Awaitable[Any]]

# Where `python -m exchange.sim` listens unless told otherwise (`lifecycle init --sim` writes these URLs), and
# the variables its account's key and secret are taken from when set (the service reads the same ones).
DEFAULT_HOST, DEFAULT_REST_PORT, DEFAULT_WS_PORT = "127.0.0.1", 8710, 8711
KEY_ENV, SECRET_ENV = "SIM_API_KEY", "SIM_SECRET"


def ccxt_urls(rest_url: str, ws_url: str) -> dict[str, str]:
    """URL overrides for ccxt's binanceusdm pointing at a simulator with these REST and WebSocket roots
    (`http://host:port`, `ws://host:port/ws`): urls['api'][key] = value (and ['ws']['linear'])."""
    out = {k: f"{rest_url}/fapi/{v}" for k, v in {
        "fapiPublic": "v1", "fapiPublicV2": "v2", "fapiPublicV3": "v3",
        "fapiPrivate": "v1", "fapiPrivateV2": "v2", "fapiPrivateV3": "v3"}.items()}
    out["fapiData"] = f"{rest_url}/futures/data"
    out["ws.linear"] = ws_url
    return out


@dataclass
class ListenKey:
    key: str
    account: str
    expired: bool = False


@dataclass
class _Subscriber:
    ws: web.WebSocketResponse
    held: list[str] = field(default_factory=list)  # for reordering


class SimServer:
    def __init__(self, venue: Venue | None = None, *, host: str = "127.0.0.1", mark_interval_s: float = 1.0) -> None:
        self.venue = venue or Venue()
        self.host = host
        self.faults = Faults()
        self.listen_keys: dict[str, ListenKey] = {}
        self.user_subs: dict[str, list[_Subscriber]] = {}  # listen key -> connections
        self.mark_subs: dict[web.WebSocketResponse, set[str]] = {}
        self._stale: dict[str, list[dict[str, Any]]] = {}  # api key -> frozen positionRisk answer
        self._stale_until = 0.0
        self._runners: list[web.AppRunner] = []
        self.rest_port = 0
        self.ws_port = 0
        self.requests = 0
        self.calls: Counter[str] = Counter()  # REST requests per "METHOD /path"
        self.symbol_calls: Counter[str] = Counter()  # the same, for calls naming a symbol
        self.signalled: list[tuple[str, str, str, int]] = []  # (method, path, when, signal) sent
        # Requests that change an account's orders (any method but GET on an order path), per account name,
        # with the loop time they arrived: who acted on an account, and when (tests of leases and takeovers).
        self.order_requests: dict[str, list[tuple[float, str, str]]] = {}
        self.venue.user_listeners.append(self._on_user_event)
        self.venue.mark_listeners.append(self._on_mark)
        self._walk: asyncio.Task[None] | None = None
        self.mark_interval_s = mark_interval_s
        self._ticker: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, rest_port: int = 0, ws_port: int = 0) -> SimServer:
        rest = web.Application(middlewares=[self._faults_middleware])
        rest.router.add_route("*", "/fapi/{version}/{path:.*}", self._dispatch)
        rest.router.add_route("*", "/_sim/{action}", self._control)
        ws = web.Application()
        ws.router.add_get("/private/ws", self._user_stream)
        ws.router.add_get("/ws/{listen_key}", self._user_stream)
        for path in ("/market/ws", "/public/ws", "/ws"):  # ccxt appends a connection index: /market/ws/0
            ws.router.add_get(path, self._market_stream)
            ws.router.add_get(path + "/{n:[0-9]+}", self._market_stream)
        self.rest_port = await self._serve(rest, rest_port)
        self.ws_port = await self._serve(ws, ws_port)
        self._ticker = asyncio.get_running_loop().create_task(self._tick_marks())
        return self

    async def _tick_marks(self) -> None:
        """Like <symbol>@markPrice@1s: every subscribed mark is pushed each interval, changed or not."""
        while True:
            await asyncio.sleep(self.mark_interval_s)
            for ws, symbols in list(self.mark_subs.items()):
                for symbol in symbols:
                    await _safe_send(ws, json.dumps(_mark_event(symbol, self.venue.marks[symbol])))

    async def _serve(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, port)
        await site.start()
        self._runners.append(runner)
        return runner.addresses[0][1]

    async def stop(self) -> None:
        for task in (self._walk, self._ticker):
            if task is not None:
                task.cancel()
        for ws in [s.ws for subs in self.user_subs.values() for s in subs] + list(self.mark_subs):
            await ws.close()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.ws_port}/ws"

    def ccxt_urls(self) -> dict[str, str]:
        """URL overrides for ccxt's binanceusdm: urls['api'][key] = value (and ['ws']['linear'])."""
        return ccxt_urls(self.rest_url, self.ws_url)

    def start_random_walk(self, *, interval_s: float = 1.0, volatility: float = 0.001, seed: int = 7) -> None:
        rng = random.Random(seed)

        async def walk() -> None:
            while True:
                await asyncio.sleep(interval_s)
                for symbol, mark in list(self.venue.marks.items()):
                    self.venue.set_mark(symbol, mark * Decimal(str(1 + rng.gauss(0, volatility))))

        self._walk = asyncio.get_running_loop().create_task(walk())

    def play_path(self, steps: list[tuple[float, str, Decimal]]) -> asyncio.Task[None]:
        """Move marks along a script: (seconds to wait, symbol, price) per step."""

        async def play() -> None:
            for delay_s, symbol, price in steps:
                await asyncio.sleep(delay_s)
                self.venue.set_mark(symbol, price)

        return asyncio.get_running_loop().create_task(play())

    # --- REST ----------------------------------------------------------------------------------

    @web.middleware
    async def _faults_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await handler(request)
        self.requests += 1
        self.calls[f"{request.method} {request.path}"] += 1
        if "symbol" in request.query:  # one symbol's list weighs less than every symbol's on Binance
            self.symbol_calls[f"{request.method} {request.path}"] += 1
        f = self.faults
        if f.signal_on and f.signal_pid and f"{request.method} {request.path}" == f.signal_on:
            if f.signal_skip > 0:
                f.signal_skip -= 1
            else:
                return await self._signal_client(request, handler)
        if f.rest_latency_ms:
            await asyncio.sleep(f.rest_latency_ms / 1000)
        if f.timeouts > 0:
            f.timeouts -= 1
            await asyncio.sleep(f.timeout_s)
            return web.Response(status=503, text="<html><body>timeout</body></html>", content_type="text/html")
        if f.ip_ban > 0:
            f.ip_ban -= 1
            return _error(418, -1003, f"Way too many requests; IP(127.0.0.1) banned until {now_ms() + 60000}. "
                                      "Please use the websocket for live updates to avoid bans.")
        if f.rate_limit > 0:
            f.rate_limit -= 1
            return _error(429, -1003, "Too many requests; current limit is 2400 requests per minute. Please use "
                                      "the websocket for live updates to avoid polling the API.")
        if f.http_5xx > 0:
            f.http_5xx -= 1
            if f.http_5xx % 2:
                return web.Response(status=503, text="<html><body><h1>503 Service Unavailable</h1></body></html>",
                                    content_type="text/html")
            return _error(503, -1001, "Internal error; unable to process your request. Please try again.")
        if f.lost_answers > 0 and (not f.lost_answers_on or f.lost_answers_on == f"{request.method} {request.path}"):
            f.lost_answers -= 1
            await handler(request)  # done on the venue; the client never learns it
            return web.Response(status=504, text="<html><body>504 Gateway Time-out</body></html>",
                                content_type="text/html")
        return await handler(request)

    async def _signal_client(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The `signal_on` fault: signal the client process around this call (a crash at a chosen step)."""
        f = self.faults
        pid, num, when = f.signal_pid, f.signal_num, f.signal_when
        f.signal_on = ""  # once
        self.signalled.append((request.method, request.path, when, num))
        if when == "before":
            os.kill(pid, num)
            if num == signal.SIGKILL:  # the call died with its sender: never carried out
                return web.Response(status=504, text="<html><body>504 Gateway Time-out</body></html>",
                                    content_type="text/html")
            await asyncio.sleep(0.1)  # let the signal land while the call is in flight
            return await handler(request)
        response = await handler(request)
        os.kill(pid, num)
        await asyncio.sleep(0.1)
        return response

    async def _dispatch(self, request: web.Request) -> web.Response:
        route = self._routes().get((request.method, request.match_info["version"], request.match_info["path"]))
        if route is None:
            return _error(404, -5000, f"Path {request.path}, Method {request.method} is invalid")
        handler, signed = route
        try:
            params, account = await self._authenticate(request, signed)
            if account is not None and request.method != "GET" and "rder" in request.match_info["path"]:
                self.order_requests.setdefault(account.name, []).append(
                    (asyncio.get_running_loop().time(), request.method, request.match_info["path"]))
            return web.json_response(await handler(request, account, params), dumps=_dumps)
        except SimError as e:
            return _error(e.status, e.code, e.msg)

    async def _authenticate(self, request: web.Request, signed: bool) -> tuple[dict[str, str], Account | None]:
        body = await request.text() if request.can_read_body else ""
        query = request.query_string
        params = dict(parse_qsl(query, keep_blank_values=True))
        params.update(parse_qsl(body, keep_blank_values=True))
        api_key = request.headers.get("X-MBX-APIKEY")
        account = self.venue.account(api_key) if api_key else None
        if account is not None and account.revoked:  # as Binance answers a deleted or disabled key
            raise SimError(-2015, "Invalid API-key, IP, or permissions for action.", 401)
        if not signed:
            if request.match_info["path"] == "listenKey" and account is None:  # keyed, not signed
                raise SimError(-2015, "Invalid API-key, IP, or permissions for action.", 401)
            return params, account
        if account is None:
            raise SimError(-2015, "Invalid API-key, IP, or permissions for action.", 401)
        signature = params.pop("signature", None)
        payload = _strip_signature(query) + _strip_signature(body)
        expected = hmac.new(account.secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if signature is None or not hmac.compare_digest(signature, expected):
            raise SimError(-1022, "Signature for this request is not valid.")
        timestamp = int(params.get("timestamp", "0") or 0)
        if abs(now_ms() - timestamp) > int(params.get("recvWindow", "5000")) + 1000:
            raise SimError(-1021, "Timestamp for this request is outside of the recvWindow.")
        return params, account

    def _routes(self) -> dict[tuple[str, str, str], tuple[Handler, bool]]:
        return {
            ("GET", "v1", "exchangeInfo"): (self._exchange_info, False),
            ("GET", "v1", "time"): (self._time, False),
            ("GET", "v1", "ping"): (self._ping, False),
            ("GET", "v1", "premiumIndex"): (self._premium_index, False),
            ("GET", "v1", "leverageBracket"): (self._leverage_bracket, True),
            ("GET", "v3", "positionRisk"): (self._position_risk, True),
            ("GET", "v2", "positionRisk"): (self._position_risk, True),
            ("GET", "v3", "account"): (self._account, True),
            ("GET", "v2", "account"): (self._account_v2, True),
            ("GET", "v1", "accountConfig"): (self._account_config, True),
            ("GET", "v1", "positionSide/dual"): (self._position_mode, True),
            ("GET", "v3", "balance"): (self._balance, True),
            ("GET", "v2", "balance"): (self._balance, True),
            ("POST", "v1", "order"): (self._new_order, True),
            ("DELETE", "v1", "order"): (self._cancel_order, True),
            ("GET", "v1", "order"): (self._get_order, True),
            ("GET", "v1", "openOrders"): (self._open_orders, True),
            ("POST", "v1", "algoOrder"): (self._new_algo, True),
            ("DELETE", "v1", "algoOrder"): (self._cancel_algo, True),
            ("GET", "v1", "openAlgoOrders"): (self._open_algos, True),
            ("GET", "v1", "userTrades"): (self._user_trades, True),
            ("POST", "v1", "listenKey"): (self._listen_key_new, False),
            ("PUT", "v1", "listenKey"): (self._listen_key_keepalive, False),
            ("DELETE", "v1", "listenKey"): (self._listen_key_delete, False),
        }

    async def _ping(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        return {}

    async def _time(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        return {"serverTime": now_ms()}

    async def _exchange_info(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        symbols = []
        for s in self.venue.specs.values():
            symbols.append({
                "symbol": s.symbol, "pair": s.symbol, "contractType": "PERPETUAL", "deliveryDate": 4133404800000,
                "onboardDate": 1569398400000, "status": "TRADING", "maintMarginPercent": "2.5000",
                "requiredMarginPercent": "5.0000", "baseAsset": s.base, "quoteAsset": "USDT", "marginAsset": "USDT",
                "pricePrecision": _places(s.tick), "quantityPrecision": _places(s.step), "baseAssetPrecision": 8,
                "quotePrecision": 8, "underlyingType": "COIN", "underlyingSubType": ["Layer-1"], "settlePlan": 0,
                "triggerProtect": "0.0500", "liquidationFee": "0.012500", "marketTakeBound": "0.05",
                "filters": [
                    {"filterType": "PRICE_FILTER", "minPrice": fmt(s.tick), "maxPrice": "10000000",
                     "tickSize": fmt(s.tick)},
                    {"filterType": "LOT_SIZE", "stepSize": fmt(s.step), "maxQty": "1000000", "minQty": fmt(s.min_qty)},
                    {"filterType": "MARKET_LOT_SIZE", "stepSize": fmt(s.step), "maxQty": "1000000",
                     "minQty": fmt(s.min_qty)},
                    {"filterType": "MAX_NUM_ORDERS", "limit": 200},
                    {"filterType": "MIN_NOTIONAL", "notional": "5"},
                    {"filterType": "PERCENT_PRICE", "multiplierUp": "1.0500", "multiplierDown": "0.9500",
                     "multiplierDecimal": "4"},
                ],
                "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET",
                               "TRAILING_STOP_MARKET"],
                "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
            })
        return {"timezone": "UTC", "serverTime": now_ms(),
                "rateLimits": [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                                "limit": 2400}],
                "exchangeFilters": [],
                "assets": [{"asset": "USDT", "marginAvailable": True, "autoAssetExchange": "-10000"}],
                "symbols": symbols}

    async def _premium_index(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        rows = [{"symbol": s, "markPrice": fmt(m), "indexPrice": fmt(m), "estimatedSettlePrice": fmt(m),
                 "lastFundingRate": "0.00010000", "interestRate": "0.00010000", "nextFundingTime": now_ms() + 3600_000,
                 "time": now_ms()} for s, m in self.venue.marks.items()]
        if "symbol" in p:
            return next((r for r in rows if r["symbol"] == p["symbol"]), None) or _raise(-1121, "Invalid symbol.")
        return rows

    async def _leverage_bracket(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        return [{"symbol": s, "notionalCoef": 1.0, "brackets": [
            {"bracket": 1, "initialLeverage": 125, "notionalCap": 50000, "notionalFloor": 0,
             "maintMarginRatio": 0.004, "cum": 0.0},
            {"bracket": 2, "initialLeverage": 100, "notionalCap": 10_000_000, "notionalFloor": 50000,
             "maintMarginRatio": 0.005, "cum": 50.0},
        ]} for s in self.venue.specs]

    def _position_rows(self, account: Account, only: str | None = None) -> list[dict[str, Any]]:
        rows = []
        for symbol, pos in account.positions.items():
            if pos.amount == 0 or (only is not None and symbol != only):
                continue
            mark = self.venue.marks[symbol]
            notional = mark * pos.amount
            upnl = (mark - pos.entry) * pos.amount
            margin = abs(notional) / self.venue.config.leverage
            liquidation = self.venue.liquidation_price(account, symbol)
            rows.append({
                "symbol": symbol, "positionSide": "BOTH", "positionAmt": fmt(pos.amount), "entryPrice": fmt(pos.entry),
                "breakEvenPrice": fmt(pos.entry), "markPrice": fmt(mark), "unRealizedProfit": fmt(upnl),
                "liquidationPrice": fmt(liquidation or Decimal(0)), "isolatedMargin": "0", "notional": fmt(notional),
                "marginAsset": "USDT", "isolatedWallet": "0", "initialMargin": fmt(margin),
                "maintMargin": fmt(abs(notional) * self.venue.config.maint_margin_rate),
                "positionInitialMargin": fmt(margin),
                "openOrderInitialMargin": "0", "adl": 1, "bidNotional": "0",
                "askNotional": "0", "updateTime": pos.updated,
            })
        return rows

    async def _position_risk(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        if time.monotonic() < self._stale_until and account.api_key in self._stale:
            rows = self._stale[account.api_key]
        else:
            rows = self._position_rows(account, p.get("symbol"))
        return [r for r in rows if "symbol" not in p or r["symbol"] == p["symbol"]]

    async def _account(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        upnl = sum((Decimal(r["unRealizedProfit"]) for r in self._position_rows(account)), Decimal(0))
        wallet = fmt(account.wallet)
        return {
            "totalInitialMargin": "0", "totalMaintMargin": "0", "totalWalletBalance": wallet,
            "totalUnrealizedProfit": fmt(upnl), "totalMarginBalance": fmt(account.wallet + upnl),
            "totalPositionInitialMargin": "0", "totalOpenOrderInitialMargin": "0", "totalCrossWalletBalance": wallet,
            "totalCrossUnPnl": fmt(upnl), "availableBalance": wallet, "maxWithdrawAmount": wallet,
            "assets": [{"asset": "USDT", "walletBalance": wallet, "unrealizedProfit": fmt(upnl),
                        "marginBalance": fmt(account.wallet + upnl), "maintMargin": "0", "initialMargin": "0",
                        "positionInitialMargin": "0", "openOrderInitialMargin": "0", "crossWalletBalance": wallet,
                        "crossUnPnl": fmt(upnl), "availableBalance": wallet, "maxWithdrawAmount": wallet,
                        "updateTime": now_ms()}],
            "positions": [{"symbol": r["symbol"], "positionSide": "BOTH", "positionAmt": r["positionAmt"],
                           "unrealizedProfit": r["unRealizedProfit"], "isolatedMargin": "0", "notional": r["notional"],
                           "isolatedWallet": "0", "initialMargin": r["initialMargin"], "maintMargin": r["maintMargin"],
                           "updateTime": r["updateTime"]} for r in self._position_rows(account)],
        }

    async def _account_v2(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        """v2 is v3 plus the account's flags (feeTier, canTrade, ...), as Binance documents it."""
        assert account is not None
        return {**_account_flags(account), **(await self._account(request, account, p))}

    async def _account_config(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        flags = _account_flags(account)
        return {"feeTier": flags["feeTier"], "canTrade": flags["canTrade"], "canDeposit": True, "canWithdraw": True,
                "dualSidePosition": account.dual_side_position, "updateTime": 0, "multiAssetsMargin": False,
                "tradeGroupId": -1}

    async def _position_mode(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        return {"dualSidePosition": account.dual_side_position}

    async def _balance(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        wallet = fmt(account.wallet)
        return [{"accountAlias": account.name, "asset": "USDT", "balance": wallet, "crossWalletBalance": wallet,
                 "crossUnPnl": "0", "availableBalance": wallet, "maxWithdrawAmount": wallet, "marginAvailable": True,
                 "updateTime": now_ms()}]

    async def _new_order(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        _refuse_in_hedge_mode(account, p)
        if self.faults.reject_orders > 0:
            self.faults.reject_orders -= 1
            raise SimError(-2019, "Margin is insufficient.")
        order = self.venue.new_order(
            account, symbol=p.get("symbol", ""), side=p.get("side", ""), type_=p.get("type", ""),
            quantity=_dec(p, "quantity"), price=_dec(p, "price", None), client_id=p.get("newClientOrderId"),
            reduce_only=p.get("reduceOnly", "false").lower() == "true", time_in_force=p.get("timeInForce"))
        return _order_json(order)

    async def _cancel_order(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        order_id = int(p["orderId"]) if p.get("orderId") else None
        return _order_json(self.venue.cancel_order(account, p.get("symbol", ""), order_id, p.get("origClientOrderId")))

    async def _get_order(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        order_id = int(p["orderId"]) if p.get("orderId") else None
        order = self.venue._find_order(account, p.get("symbol", ""), order_id, p.get("origClientOrderId"))
        if order is None:
            raise SimError(-2013, "Order does not exist.")
        return _order_json(order, listing=True)

    async def _open_orders(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        return [_order_json(o, listing=True) for o in self.venue.open_orders(account, p.get("symbol"))]

    async def _new_algo(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        if p.get("algoType") != "CONDITIONAL":
            raise SimError(-1102, "Mandatory parameter 'algoType' was not sent, was empty/null, or malformed.")
        _refuse_in_hedge_mode(account, p)
        if self.faults.reject_stops > 0:
            self.faults.reject_stops -= 1
            if self.faults.reject_stops_code == -2021:
                raise SimError(-2021, "Order would immediately trigger.")
            raise SimError(self.faults.reject_stops_code, "Order rejected (simulated).")
        if self.faults.single_stop and p.get("type") == "STOP_MARKET" and any(
                a.order_type == "STOP_MARKET" for a in self.venue.open_algos(account, p.get("symbol", ""))):
            raise SimError(-4045, "Reach max stop order limit.")
        algo = self.venue.new_algo(
            account, symbol=p.get("symbol", ""), side=p.get("side", ""), order_type=p.get("type", ""),
            quantity=_dec(p, "quantity", None), trigger=_dec(p, "triggerPrice"), client_id=p.get("clientAlgoId"),
            reduce_only=p.get("reduceOnly", "false").lower() == "true",
            close_position=p.get("closePosition", "false").lower() == "true",
            working_type=p.get("workingType", "CONTRACT_PRICE"))
        return _algo_json(algo)

    async def _cancel_algo(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        algo_id = int(p["algoId"]) if p.get("algoId") else None
        algo = self.venue.cancel_algo(account, algo_id, p.get("clientAlgoId"))
        return {"algoId": algo.algo_id, "clientAlgoId": algo.client_id, "code": "200", "msg": "success"}

    async def _open_algos(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        return [_algo_json(a, listing=True) for a in self.venue.open_algos(account, p.get("symbol"))]

    async def _user_trades(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        start, end = int(p.get("startTime", 0)), int(p.get("endTime", 2**62))
        trades = [t for t in account.trades if t.symbol == p.get("symbol") and start <= t.time <= end]
        rows = [{"buyer": t.side == "BUY", "commission": fmt(t.fee), "commissionAsset": "USDT", "id": t.trade_id,
                 "maker": t.maker, "orderId": t.order_id, "price": fmt(t.price), "qty": fmt(t.qty),
                 "quoteQty": fmt(t.price * t.qty), "realizedPnl": fmt(t.realized), "side": t.side,
                 "positionSide": "BOTH", "symbol": t.symbol, "time": t.time} for t in trades]
        return rows[-int(p.get("limit", 500)):]

    async def _listen_key_new(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        live = next((k for k in self.listen_keys.values() if k.account == account.api_key and not k.expired), None)
        if live is None:  # Binance returns the account's live key if it has one
            live = ListenKey(secrets.token_urlsafe(48), account.api_key)
            self.listen_keys[live.key] = live
        return {"listenKey": live.key}

    async def _listen_key_keepalive(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        key = next((k for k in self.listen_keys.values() if k.account == account.api_key and not k.expired), None)
        if key is None:
            raise SimError(-1125, "This listenKey does not exist. Please use POST /fapi/v1/listenKey to recreate "
                                  "listenKey")
        return {"listenKey": key.key}

    async def _listen_key_delete(self, request: web.Request, account: Account | None, p: dict[str, str]) -> Any:
        assert account is not None
        for key in self.listen_keys.values():
            if key.account == account.api_key:
                key.expired = True
        return {}

    # --- WebSocket -----------------------------------------------------------------------------

    async def _user_stream(self, request: web.Request) -> web.StreamResponse:
        key = request.query.get("listenKey") or request.match_info.get("listen_key", "")
        if self.faults.user_stream_down:
            return web.Response(status=503, text="<html><body>503 Service Unavailable</body></html>",
                                content_type="text/html")
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        listen = self.listen_keys.get(key)
        if listen is None or listen.expired:
            await ws.send_str(json.dumps({"e": "listenKeyExpired", "E": now_ms(), "listenKey": key}))
            await ws.close()
            return ws
        sub = _Subscriber(ws)
        self.user_subs.setdefault(key, []).append(sub)
        try:
            async for _ in ws:
                pass
        finally:
            self.user_subs.get(key, []).remove(sub) if sub in self.user_subs.get(key, []) else None
        return ws

    async def _market_stream(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        self.mark_subs[ws] = set()
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    req = json.loads(msg.data)
                except json.JSONDecodeError:
                    continue
                streams = {s.split("@")[0].upper() for s in req.get("params", []) if "@markPrice" in s}
                if req.get("method") == "SUBSCRIBE":
                    self.mark_subs[ws] |= streams
                elif req.get("method") == "UNSUBSCRIBE":
                    self.mark_subs[ws] -= streams
                await ws.send_str(json.dumps({"result": None, "id": req.get("id")}))
                for symbol in streams if req.get("method") == "SUBSCRIBE" else ():
                    await ws.send_str(json.dumps(_mark_event(symbol, self.venue.marks[symbol])))
        finally:
            self.mark_subs.pop(ws, None)
        return ws

    def _on_user_event(self, account_name: str, event: dict[str, Any]) -> None:
        account = next((a for a in self.venue.accounts.values() if a.name == account_name), None)
        if account is None or self.faults.ws_silent:
            return
        delay = self.faults.delay_fill_updates_s
        if delay > 0 and event.get("e") == "ORDER_TRADE_UPDATE" and (event.get("o") or {}).get("x") == "TRADE":
            # A fill update arriving late (after the position update, and after the engine stopped waiting).
            asyncio.get_running_loop().call_later(delay, self._deliver, account, json.dumps(event))
            return
        self._deliver(account, json.dumps(event))

    def _deliver(self, account: Account, text: str) -> None:
        for key, subs in self.user_subs.items():
            listen = self.listen_keys.get(key)
            if listen is None or listen.expired or listen.account != account.api_key:
                continue
            for sub in subs:
                self._send(sub, text)

    def _send(self, sub: _Subscriber, text: str) -> None:
        if self.faults.reorder_events:
            sub.held.append(text)
            if len(sub.held) < 2:  # held back; sent late if no second event comes to swap with
                asyncio.get_running_loop().call_later(0.05, self._flush_held, sub)
                return
            batch, sub.held = list(reversed(sub.held)), []
        else:
            batch, sub.held = [*sub.held, text], []
        if self.faults.duplicate_events:
            batch = [t for t in batch for _ in range(2)]
        for item in batch:
            asyncio.get_running_loop().create_task(_safe_send(sub.ws, item))

    def _flush_held(self, sub: _Subscriber) -> None:
        batch, sub.held = sub.held, []
        for item in batch:
            asyncio.get_running_loop().create_task(_safe_send(sub.ws, item))

    def _on_mark(self, symbol: str, price: Decimal) -> None:
        text = json.dumps(_mark_event(symbol, price))
        for ws, symbols in list(self.mark_subs.items()):
            if symbol in symbols:
                asyncio.get_running_loop().create_task(_safe_send(ws, text))

    async def drop_streams(self) -> None:
        """Close every WebSocket connection abruptly (clients must reconnect)."""
        for ws in [s.ws for subs in self.user_subs.values() for s in subs] + list(self.mark_subs):
            await ws.close(code=1011, message=b"simulated drop")

    def expire_listen_keys(self, *, notice: bool = False) -> None:
        """Expire every listen key: connections stay open but receive nothing; keepalive answers -1125.

        With `notice`, Binance's `listenKeyExpired` event is pushed first on every open user-data connection
        (which stays open); without it nothing says so (a key can lapse unnoticed).
        """
        for key in self.listen_keys.values():
            if notice and not key.expired and not self.faults.ws_silent:  # a wedged socket delivers nothing
                text = json.dumps({"e": "listenKeyExpired", "E": now_ms(), "listenKey": key.key})
                for sub in self.user_subs.get(key.key, []):
                    asyncio.get_running_loop().create_task(_safe_send(sub.ws, text))
            key.expired = True

    def revoke_key(self, api_key: str, revoked: bool = True) -> None:
        """The API key stops working (deleted or disabled on the venue): every keyed request answers -2015,
        streams already open stay open. `revoked=False` restores it."""
        self.set_account(api_key, revoked=revoked)

    def set_account(self, api_key: str, **flags: Any) -> Account:
        """Change an account's flags: `can_trade`, `dual_side_position` (hedge mode), `revoked`."""
        account = self.venue.account(api_key)
        if account is None:
            raise KeyError("unknown api_key")
        known = {"can_trade", "dual_side_position", "revoked"}
        if set(flags) - known:
            raise ValueError(f"unknown account flag(s): {sorted(set(flags) - known)}; known: {sorted(known)}")
        for name, value in flags.items():
            setattr(account, name, bool(value))
        return account

    def set_faults(self, **changes: Any) -> None:
        """Switch faults on or off (see Faults); stale_positions_s freezes the current snapshot."""
        self.faults.update(changes)
        self.venue.keep_stops_when_flat = self.faults.keep_stops_when_flat
        if "stale_positions_s" in changes:
            self.freeze_positions(float(changes["stale_positions_s"]))

    def inject_user_text(self, api_key: str, text: str) -> None:
        """Send a raw frame on the account's user-data connections (malformed payloads, for tests)."""
        for key, subs in self.user_subs.items():
            listen = self.listen_keys.get(key)
            if listen is not None and listen.account == api_key:
                for sub in subs:
                    asyncio.get_running_loop().create_task(_safe_send(sub.ws, text))

    def freeze_positions(self, seconds: float) -> None:
        """positionRisk keeps answering the current snapshot for `seconds` (REST lagging a close)."""
        self._stale = {a.api_key: self._position_rows(a) for a in self.venue.accounts.values()}
        self._stale_until = time.monotonic() + seconds

    # --- control API (not Binance) -------------------------------------------------------------

    def _burst(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """Flatten many positions of one account at once, in one go of the event loop: a cascade. `stop`
        moves the mark 5 % down (up for a short) through the position's stop; the others close it as
        `force_close` does. Answers each close's venue time (ms)."""
        account = self.venue.account(data["api_key"])
        if account is None:
            raise KeyError("unknown api_key")
        closed = []
        for close in data["closes"]:
            symbol, kind = close["symbol"], close["kind"]
            if kind == "stop":
                amount = self.venue.position(account, symbol).amount
                mark = self.venue.marks[symbol]
                self.venue.set_mark(symbol, mark * (Decimal("0.95") if amount > 0 else Decimal("1.05")))
            else:
                self.venue.force_close(account, symbol, kind)
            closed.append({"symbol": symbol, "kind": kind, "at_ms": now_ms()})
        return closed

    async def _control(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        data = await request.json() if request.can_read_body else {}
        try:
            if action == "state":
                return web.json_response({"marks": {s: fmt(m) for s, m in self.venue.marks.items()},
                                          "faults": self.faults.as_dict()})
            if action == "mark":
                self.venue.set_mark(data["symbol"], Decimal(str(data["price"])))
            elif action == "faults":
                self.set_faults(**data)
            elif action in {"liquidation", "adl", "settlement", "manual"}:
                account = self.venue.account(data["api_key"])
                if account is None:
                    return web.json_response({"error": "unknown api_key"}, status=404)
                order = self.venue.force_close(account, data["symbol"], action)
                return web.json_response({"orderId": order.order_id, "clientOrderId": order.client_id})
            elif action == "symbols":
                return web.json_response({"symbols": [s.symbol for s in self.venue.config.symbols]})
            elif action == "burst":  # {"api_key", "closes": [{"symbol", "kind": liquidation|adl|manual|stop}]}
                return web.json_response({"closed": self._burst(data)})
            elif action == "drop_streams":
                await self.drop_streams()
            elif action == "expire_listen_keys":  # {"notice": true}: push listenKeyExpired first
                self.expire_listen_keys(notice=bool(data.get("notice", False)))
            elif action == "revoke_key":  # {"api_key": ..., "revoked": true|false}
                self.revoke_key(data["api_key"], bool(data.get("revoked", True)))
            elif action == "account":  # {"api_key": ..., "can_trade": bool, "dual_side_position": bool, ...}
                self.set_account(data.pop("api_key"), **data)
            else:
                return web.json_response({"error": f"unknown action {action}"}, status=404)
        except (KeyError, ValueError, SimError) as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response({"ok": True})


async def _safe_send(ws: web.WebSocketResponse, text: str) -> None:
    if not ws.closed:
        try:
            await ws.send_str(text)
        except (ConnectionError, RuntimeError):
            pass


def _mark_event(symbol: str, price: Decimal) -> dict[str, Any]:
    return {"e": "markPriceUpdate", "E": now_ms(), "s": symbol, "p": fmt(price), "ap": fmt(price), "P": fmt(price),
            "i": fmt(price), "r": "0.00010000", "T": now_ms() + 3600_000}


def _order_json(o: SimOrder, *, listing: bool = False) -> dict[str, Any]:
    """An order as Binance answers it: listings (openOrders, GET order) carry `time` and no `cumQty`;
    new and cancel answers the other way round."""
    body: dict[str, Any] = {
        "orderId": o.order_id, "symbol": o.symbol, "status": o.shown_status, "clientOrderId": o.client_id,
        "price": fmt(o.price), "avgPrice": fmt(o.avg), "origQty": fmt(o.qty), "executedQty": fmt(o.filled),
        "cumQuote": fmt(o.filled * o.avg), "timeInForce": "GTC", "type": o.type,
        "reduceOnly": o.reduce_only, "closePosition": False, "side": o.side, "positionSide": "BOTH",
        "stopPrice": fmt(o.stop_price), "workingType": "CONTRACT_PRICE", "priceProtect": False,
        "origType": o.orig_type or o.type, "priceMatch": "NONE", "selfTradePreventionMode": "EXPIRE_TAKER",
        "goodTillDate": 0, "updateTime": o.update,
    }
    if listing:
        body["time"] = o.time
    else:
        body["cumQty"] = fmt(o.filled)
    return body


def _algo_json(a: SimAlgo, *, listing: bool = False) -> dict[str, Any]:
    """An algo order as Binance answers it: the create answer and listings differ in a few fields."""
    body: dict[str, Any] = {
        "algoId": a.algo_id, "clientAlgoId": a.client_id, "algoType": "CONDITIONAL", "orderType": a.order_type,
        "symbol": a.symbol, "side": a.side, "positionSide": "BOTH", "timeInForce": "GTC", "quantity": fmt(a.qty),
        "algoStatus": a.status, "triggerPrice": fmt(a.trigger), "price": "0", "icebergQuantity": None,
        "selfTradePreventionMode": "EXPIRE_MAKER", "workingType": a.working_type, "priceMatch": "NONE",
        "closePosition": a.close_position, "priceProtect": False, "reduceOnly": a.reduce_only,
        "createTime": a.created, "updateTime": a.updated, "triggerTime": a.triggered, "goodTillDate": 0,
    }
    if listing:
        body.update({"actualOrderId": str(a.actual_order_id or ""), "actualPrice": fmt(a.avg_price),
                     "tpTriggerPrice": "0", "tpPrice": "0", "slTriggerPrice": "0", "slPrice": "0", "tpOrderType": ""})
    else:
        body.update({"activatePrice": "", "callbackRate": ""})
    return body


def _account_flags(account: Account) -> dict[str, Any]:
    return {"feeTier": 0, "feeBurn": True, "canTrade": account.can_trade, "canDeposit": True, "canWithdraw": True,
            "updateTime": 0, "multiAssetsMargin": False, "tradeGroupId": -1}


def _refuse_in_hedge_mode(account: Account, p: dict[str, str]) -> None:
    """Hedge mode wants LONG or SHORT on every order; the simulator nets one-way only, so it refuses the rest."""
    if account.dual_side_position and p.get("positionSide", "BOTH") == "BOTH":
        raise SimError(-4061, "Order's position side does not match user's setting.")


def _error(status: int, code: int, msg: str) -> web.Response:
    return web.json_response({"code": code, "msg": msg}, status=status)


def _raise(code: int, msg: str) -> Any:
    raise SimError(code, msg)


def _dec(params: dict[str, str], name: str, default: Any = ...) -> Any:
    raw = params.get(name)
    if raw in (None, ""):
        if default is ...:
            raise SimError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")
        return default
    try:
        return Decimal(raw)
    except InvalidOperation:
        raise SimError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.") from None


def _places(step: Decimal) -> int:
    return max(0, -step.normalize().as_tuple().exponent)  # type: ignore[operator]


def _strip_signature(text: str) -> str:
    parts = [p for p in text.split("&") if p and not p.startswith("signature=")]
    return "&".join(parts)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
