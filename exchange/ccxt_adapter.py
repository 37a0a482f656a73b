"""The exchange port implemented with ccxt (async REST + ccxt.pro WebSocket), for any ccxt exchange id.

Binance USDⓈ-M (`binanceusdm`) is the one tested end to end, against the venue simulator. Errors are
translated here into `exchange.errors`; nothing of ccxt crosses the port.
"""
from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from itertools import islice
from typing import Any, TypeVar

import ccxt
import ccxt.pro as ccxtpro
from loguru import logger

from exchange import errors
from exchange.binance_lean import POSITION_OPTIONS, lean_order, lean_position_risk
from exchange.binance_user_stream import (
    ALGO_STATUS,
    FILL_EXECUTIONS,
    ORDER_STATUS,
    FeeBook,
    mark_update,
    order_trade,
    order_update,
    position_update,
    trade_id,
)
from exchange.port import (
    Fill,
    MarkPrice,
    OrderRules,
    OrderSnapshot,
    PositionSnapshot,
    Resynced,
    StreamHealth,
    is_protective,
)
from exchange.secret import Secret as Secret  # re-exported: chaos/world.py, bench/ and a test import it from here
from lifecycle.domain import OrderPurpose, OrderRef, OrderStatus, Side

T = TypeVar("T")


# The first client of each venue (exchange, testnet, URLs) whose markets loaded, with the adapter that owns it:
# the clients of later accounts of this process take their markets from it (ccxt's set_markets_from_exchange)
# when they start, until that adapter closes. A recreated client (a stream wedged or dropped) loads the
# markets afresh, as before (new filters and listings); the owner's recreated client becomes the source.
_LOADED_MARKETS: dict[tuple[Any, ...], tuple[Any, Any]] = {}
# Updates ccxt may hold for our stream consumers between two of their turns. Not larger: ccxt finds an updated
# order in its cache by a linear search (2.7 ms per update at 100,000 entries, which a long-running service
# reaches, 0.18 ms at 5,000); a cascade that overflows it is noticed and resynced from REST (_Fresh.take).
STREAM_CACHE = 5_000


@dataclass(frozen=True)
class ExchangeSettings:
    exchange_id: str = "binanceusdm"
    api_key: Secret = field(default_factory=lambda: Secret(""))
    secret: Secret = field(default_factory=lambda: Secret(""))
    sandbox: bool = False  # the exchange's testnet, through ccxt's set_sandbox_mode
    urls: Mapping[str, str] = field(default_factory=dict)  # urls['api'] overrides; "ws.linear" for nested keys
    options: Mapping[str, Any] = field(default_factory=dict)
    user_probe_after_s: float = 30.0  # no user-data event this long: check the listen key is alive
    # Binance expires a listen key 60 min after its last keepalive: keep it alive this often, whatever the traffic
    listen_key_keepalive_s: float = 1800.0
    market_silent_after_s: float = 10.0  # no mark price this long (they tick every second): silent
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # ccxt paces requests by the venue's published weights (an all-symbol open-orders list weighs 40 on
    # Binance, about a second of budget). Keep it on against a real venue; tests on the simulator turn it off.
    rate_limit: bool = True

    def __post_init__(self) -> None:
        for name in ("user_probe_after_s", "listen_key_keepalive_s", "market_silent_after_s", "backoff_initial_s",
                     "backoff_max_s"):
            value = getattr(self, name)
            if not value > 0:  # NaN too
                raise ValueError(f"{name} must be > 0, got {value}")


USER_STREAMS = ("positions", "orders")  # the streams that ride on the listen key
KEY_REFUSED = (-1022, -2014, -2015)  # bad signature, malformed key, key unknown / IP or permission refused
AUTH_LOG_EVERY_S = 60.0  # a refused key is logged CRITICAL at most this often while it lasts
KEEPALIVE_RETRY_S = 60.0  # a scheduled keepalive that failed (not -1125) is tried again this soon
DROP_LOG_EVERY_S = 10.0  # at most one log line per reason of dropped stream frames in this window


# --- error translation ----------------------------------------------------------------------------

_CODE = re.compile(r'"code"\s*:\s*"?(-?\d+)')
_MSG = re.compile(r'"msg"\s*:\s*"([^"]{1,200})"')


def translate(e: Exception, *, hide: tuple[str, ...] = ()) -> errors.ExchangeError:
    """Map a ccxt exception to our hierarchy; `hide` lists strings (credentials) to redact."""
    message = _redact(f"{type(e).__name__}: {e}", hide)
    match = _CODE.search(str(e))
    code = int(match.group(1)) if match else None
    # The ccxt error stays chained as __cause__ for debugging; scrub it too, a traceback prints it.
    e.args = tuple(_redact(str(arg), hide) for arg in e.args)
    kind: type[errors.ExchangeError]
    if code == -2021 or isinstance(e, ccxt.OrderImmediatelyFillable):
        kind = errors.StopWouldTrigger
    elif code == -2022:
        kind = errors.ReduceOnlyRejected
    elif code == -4116:
        kind = errors.DuplicateOrder
    elif code in (-2011, -2013) or isinstance(e, ccxt.OrderNotFound):
        kind = errors.OrderNotFound
    elif code == -2019 or isinstance(e, ccxt.InsufficientFunds):
        kind = errors.InsufficientMargin
    elif code == -1125:  # an expired listen key (ccxt 4.5.90 raises AuthenticationError): reconnect, not fatal
        kind = errors.Retryable
    elif code in KEY_REFUSED or isinstance(
        e, (ccxt.AuthenticationError, ccxt.PermissionDenied, ccxt.AccountSuspended, ccxt.BadSymbol, ccxt.NotSupported)
    ):
        kind = errors.Fatal
    elif code == -1003 or isinstance(e, (ccxt.DDoSProtection, ccxt.RateLimitExceeded)):
        kind = errors.RateLimited
    elif code in (-1001, -1021, -1125) or isinstance(
        e, (ccxt.NetworkError, ccxt.OperationFailed, ccxt.ExchangeClosedByUser)
    ):
        # -1021: clock skew (ccxt's adjustForTimeDifference fixes it); -1125: expired listen key (reconnect);
        # ExchangeClosedByUser: the client was recreated under a call in flight.
        kind = errors.Retryable
    else:
        kind = errors.Rejected
    out = kind(message)
    out.code = code
    return out


def _redact(text: str, hide: tuple[str, ...]) -> str:
    text = re.sub(r"signature=[0-9a-fA-F]+", "signature=<redacted>", text)
    text = re.sub(r"listenKey[=/:\s\"']+[A-Za-z0-9_-]{8,}", "listenKey=<redacted>", text)
    for secret in hide:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text


# --- conversions ----------------------------------------------------------------------------------


def _dec(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    return Decimal(str(value))


def _ms(value: Any) -> datetime:
    ms = int(value) if value else int(time.time() * 1000)
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _risk_position(entry: dict[str, Any]) -> PositionSnapshot:
    """One entry of Binance's positionRisk answer as `lean_position_risk` kept it: what `_position` reads of the
    unified position ccxt would have made of it (its market id, `positionAmt`, `entryPrice`, `updateTime`)."""
    return PositionSnapshot(entry["symbol"], Decimal(entry["positionAmt"]), Decimal(entry["entryPrice"]),
                            _ms(entry.get("updateTime")))


_UNIFIED_STATUS = {"open": OrderStatus.OPEN, "closed": OrderStatus.FILLED, "canceled": OrderStatus.CANCELED,
                   "expired": OrderStatus.EXPIRED, "rejected": OrderStatus.REJECTED}
_STATUS_RANK = {OrderStatus.NEW: 0, OrderStatus.OPEN: 1}  # every final status ranks 2


class CcxtExchange:
    """ExchangePort over one ccxt client, recreated whole when a stream wedges or drops."""

    def __init__(self, settings: ExchangeSettings) -> None:
        self.settings = settings
        self.client: Any = None
        self.generation = 0  # increments each time the client is (re)created
        self.health: dict[str, StreamHealth] = {}
        self.reconnects: dict[str, int] = {}
        self._recreate_lock = asyncio.Lock()
        self._hide = (settings.api_key.reveal(), settings.secret.reveal())
        self._drops = _FrameDrops(settings.exchange_id, self._hide)
        self.dropped_frames: Counter[str] = self._drops.counts  # stream frames dropped, by reason
        # stream -> why REST showed what it did not deliver; cleared when it delivers or is resubscribed
        self.doubted: dict[str, str] = {}
        self.auth_failure: str | None = None  # why the venue refused the key on the last private call; None: fine
        self._auth_logged_at = float("-inf")
        self._keepalive_at = 0.0  # loop time of the listen key's creation or last successful keepalive
        self._keepalive_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._binance = settings.exchange_id.startswith("binance")
        # Binance's user-stream events and marks read straight into snapshots (exchange/binance_user_stream.py): the
        # taps of the running order, position and mark streams, by stream; the fees of the orders' fills seen.
        self._taps: dict[str, list[_Tap]] = {}
        self._marks_to_ccxt = 0  # mark frames handed to ccxt's handler (not tapped): its ticker table changed
        self._fees = FeeBook()
        # USDⓈ-M with ccxt's default endpoint for positions: the answer is read without ccxt's parsing
        # (exchange/binance_lean.py lean_position_risk).
        self._lean_positions = settings.exchange_id == "binanceusdm" and not POSITION_OPTIONS & set(settings.options)
        self._closed = False
        # Several processes on one database (issue 14): asked before every request that changes the venue (any
        # method but GET, listen keys aside), at the moment it is sent (after ccxt's rate limiter); False:
        # refused with NotOwner. None: this process alone acts on the account.
        self.may_act: Callable[[], bool] | None = None

    @property
    def malformed_frames(self) -> int:
        """Every stream frame dropped, whatever the reason (the total of `dropped_frames`)."""
        return sum(self.dropped_frames.values())

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> CcxtExchange:
        await self._create()
        return self

    async def close(self) -> None:
        self._closed = True  # streams end instead of reconnecting
        for venue, (owner, _client) in list(_LOADED_MARKETS.items()):
            if owner is self:  # the next client of this venue loads the markets again (the venue may differ by
                del _LOADED_MARKETS[venue]  # then: a simulator restarted on the same port with other symbols)
        background = [*self._tasks, *([self._keepalive_task] if self._keepalive_task else [])]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def _create(self) -> None:
        self.client = await self._new_client()
        self.generation += 1
        self._keepalive_at = asyncio.get_running_loop().time()  # its first watch creates a fresh listen key

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _new_client(self, *, share: bool = True) -> Any:
        base = getattr(ccxtpro, self.settings.exchange_id, None)
        if base is None:
            raise errors.Fatal(f"ccxt has no WebSocket-capable exchange {self.settings.exchange_id!r}")
        cls = _guarded(base, self)
        # fetchCurrencies: futures only, no spot-wallet calls. watchPositions.fetchPositionsSnapshot: ccxt's own
        # snapshot is loaded lazily and races live updates (a flat was lost with watch_orders on the same
        # connection); the adapter's own snapshot rides on Resynced instead.
        # fetchOpenOrders.warnWithoutSymbol: the snapshot after a reconnect lists every symbol on purpose.
        # listenKeyRefreshRate: ccxt keeps the listen key alive itself (20 min by default), on our schedule
        # instead; the adapter's own keepalive (`_keep_alive_on_schedule`) is the guarantee, see there.
        # ordersLimit / tradesLimit: ccxt keeps the order updates not yet handed to watch_orders in a cache of
        # 1,000 by default; a cascade of hundreds of positions (a fill, a NEW, an expired stop each) within
        # one turn of our consumer overflowed it, and the oldest updates were never delivered (bench/burst.py).
        # ws.compress 0: no permessage-deflate on the streams. The frames are small and the link is a server's;
        # inflating every frame was CPU taken from the cascade (bench.burst) on both ends.
        extra = dict(self.settings.options)
        options = {"fetchCurrencies": False, "watchPositions": {"fetchPositionsSnapshot": False},
                   "ws": {"compress": 0, **(extra.pop("ws", None) or {})},
                   "fetchOpenOrders": {"warnWithoutSymbol": False},
                   "ordersLimit": STREAM_CACHE, "tradesLimit": STREAM_CACHE,
                   "listenKeyRefreshRate": int(self.settings.listen_key_keepalive_s * 1000),
                   **extra}
        client = cls({"apiKey": self.settings.api_key.reveal(), "secret": self.settings.secret.reveal(),
                      "enableRateLimit": self.settings.rate_limit, "options": options})
        if self.settings.sandbox:
            client.set_sandbox_mode(True)
        for key, url in self.settings.urls.items():
            target = client.urls["api"]
            *path, last = key.split(".")
            for part in path:
                target = target[part]
            target[last] = url
        venue = self._markets_key()
        owner, source = _LOADED_MARKETS.get(venue, (None, None))
        try:
            if share and source is not None:
                # Markets loaded by another client of this process for the same venue: shared, not loaded again
                # (one copy of every market per process however many accounts; no exchangeInfo call either).
                client.set_markets_from_exchange(source)
            else:
                await self._call_on(client.load_markets)
                if source is None or owner is self:  # the newest markets of this venue, for the next account
                    _LOADED_MARKETS[venue] = (self, client)
        except BaseException:
            await _close_quietly(client)
            raise
        return client

    def _markets_key(self) -> tuple[Any, ...]:
        """The venue a client talks to: its exchange, testnet or not, and its URL overrides."""
        return (self.settings.exchange_id, self.settings.sandbox, tuple(sorted(self.settings.urls.items())))

    async def recreate(self, seen_generation: int, reason: str) -> None:
        """Replace the client, once per generation however many streams ask. The new client is built
        first and swapped in only when it works; on failure the old one stays and the error propagates
        (the supervisors retry with backoff). Calls in flight on the old client end as Retryable."""
        async with self._recreate_lock:
            if self.generation != seen_generation:
                return
            logger.warning("{}: recreating the exchange client: {}", self.settings.exchange_id, reason)
            new = await self._new_client(share=False)  # a recreate loads the markets afresh (new filters, listings)
            old, self.client = self.client, new
            self.generation += 1
            self._keepalive_at = asyncio.get_running_loop().time()
        await _close_quietly(old)

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """A private REST call on the current client (the key's standing is tracked: `auth_failure`)."""
        return await self._call_on(fn, *args, private=True, **kwargs)

    async def _call_on(self, fn: Callable[..., Awaitable[T]], *args: Any, private: bool = False, **kwargs: Any) -> T:
        try:
            result = await fn(*args, **kwargs)
        except ccxt.BaseError as e:
            out = translate(e, hide=self._hide)
            if private and isinstance(out, errors.Fatal) and (
                    out.code in KEY_REFUSED or isinstance(e, ccxt.AuthenticationError)):
                self._key_refused(out)  # PermissionDenied and AccountSuspended are AuthenticationErrors too
            raise out from e
        if private and self.auth_failure is not None:
            logger.warning("{}: the venue accepts the API key again", self.settings.exchange_id)
            self.auth_failure = None
            self._auth_logged_at = float("-inf")
        return result

    def _key_refused(self, error: errors.ExchangeError) -> None:
        """A private call was refused for the key: say so (CRITICAL, at most once a minute) until one succeeds."""
        self.auth_failure = _refusal(error)
        now = time.monotonic()
        if now - self._auth_logged_at >= AUTH_LOG_EVERY_S:
            self._auth_logged_at = now
            logger.critical("{}: the venue refuses the API key ({}): nothing can be queried or sent until it is "
                            "fixed", self.settings.exchange_id, self.auth_failure)

    # --- start-time checks ---------------------------------------------------------------------

    async def check_account(self, symbols: list[str]) -> None:
        """Refuse an account this engine cannot run: `errors.Fatal` with one line naming the problem (the key
        refused, no permission to trade, hedge mode, a symbol the venue does not list); never the key or secret.

        Binance: two REST calls (accountConfig for canTrade, positionSide/dual for the mode); the symbols are
        checked against the markets loaded at start. A transient failure (Retryable) propagates as it is: the
        caller waits and asks again. Another exchange: its balance is fetched (the key works) and its position
        mode when ccxt can tell it.
        """
        client = self.client
        try:
            if hasattr(client, "fapiPrivateGetAccountConfig"):
                config = await self._call(client.fapiPrivateGetAccountConfig)
                if isinstance(config, dict) and config.get("canTrade") is False:
                    raise errors.Fatal("the account may not trade (canTrade is false): enable futures trading "
                                       "for the API key and check the account for restrictions")
            else:
                await self._call(client.fetch_balance)
            if (client.has or {}).get("fetchPositionMode"):
                mode = await self._call(client.fetch_position_mode)
                if (mode or {}).get("hedged"):
                    raise errors.Fatal("hedge mode is not supported; switch the account to one-way mode")
        except errors.Fatal as e:
            if e.code not in KEY_REFUSED and not isinstance(e.__cause__, ccxt.AuthenticationError):
                raise  # ours above, or another Fatal (e.g. an endpoint this exchange does not have)
            if e.code == -1022:
                raise errors.Fatal(f"the venue refuses the request signature ({self.auth_failure}): the secret "
                                   "does not belong to the API key") from e
            raise errors.Fatal(f"the venue refuses the API key ({self.auth_failure}): it is unknown or disabled, "
                               "lacks futures permission, or this IP is not allowed") from e
        # Only the venue's own ids (BTCUSDT): streams and marks are keyed by them, a unified name
        # (BTC/USDT:USDT) would quietly never match.
        unknown = [s for s in symbols if s not in (client.markets_by_id or {})]
        if unknown:
            where = f"{self.settings.exchange_id}{' (testnet)' if self.settings.sandbox else ''}"
            raise errors.Fatal(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not listed on {where}")

    def _unified(self, symbol: str) -> str:
        return self.client.markets_by_id[symbol][0]["symbol"] if symbol in self.client.markets_by_id else symbol

    def _market_id(self, unified: str) -> str:
        return self.client.market(unified)["id"] if unified in self.client.markets else unified

    def tick_size(self, symbol: str) -> Decimal:
        """The price increment of a market (from the markets loaded at start); stops are rounded to it."""
        unified = self._unified(symbol)
        market = self.client.markets.get(unified) if self.client is not None else None
        tick = _dec(((market or {}).get("precision") or {}).get("price"))
        if tick is None or tick <= 0:
            raise errors.Fatal(f"{self.settings.exchange_id}: no price tick known for {symbol}")
        return tick

    def order_rules(self, symbol: str) -> OrderRules:
        """The market's price and quantity limits as loaded at start (checked before an order is sent)."""
        market = self.client.markets.get(self._unified(symbol)) if self.client is not None else None
        if market is None:
            raise errors.Fatal(f"{self.settings.exchange_id}: {symbol} is not a market of this exchange")
        limits = market.get("limits") or {}
        amount, price, cost = (limits.get(k) or {} for k in ("amount", "price", "cost"))
        return OrderRules(tick=self.tick_size(symbol), step=_dec((market.get("precision") or {}).get("amount")),
                          min_quantity=_dec(amount.get("min")), max_quantity=_dec(amount.get("max")),
                          min_price=_dec(price.get("min")), max_price=_dec(price.get("max")),
                          min_notional=_dec(cost.get("min")))

    # --- REST ----------------------------------------------------------------------------------

    async def positions(self, symbols: list[str] | None = None) -> list[PositionSnapshot]:
        """Open positions (amount != 0), of every symbol or only of `symbols` (a targeted query).

        For one symbol the venue is asked for that symbol only (Binance's `symbol` parameter): ccxt would
        otherwise fetch and parse every position and filter after, which made each targeted query cost
        O(positions) and a recovery with many lost stops quadratic (measured: bench/recovery.py).
        """
        unified = [self._unified(s) for s in symbols] if symbols else None
        params = {"symbol": self._market_id(unified[0])} if unified and len(unified) == 1 else {}
        if self._lean_positions:
            client = self.client
            entries = lean_position_risk(await self._call(client.fapiPrivateV3GetPositionRisk, params),
                                         client.markets_by_id)
            if entries is not None:
                wanted = {self._market_id(u) for u in unified} if unified else None
                return [p for p in map(_risk_position, entries)
                        if p.amount != 0 and (wanted is None or p.symbol in wanted)]
            # an answer of a shape the lean reading does not know: ccxt asks and reads it itself
        raw = await self._call(self.client.fetch_positions, unified, params)
        return [p for p in (self._position(r) for r in raw) if p.amount != 0]

    async def order_by_client_id(self, symbol: str, client_id: str) -> OrderSnapshot:
        """One regular order by our client id; OrderNotFound when the venue never received it."""
        return self._order(await self._call(self.client.fetch_order, None, self._unified(symbol),
                                            {"origClientOrderId": client_id}))

    async def order(self, symbol: str, exchange_order_id: str) -> OrderSnapshot:
        """One regular order by its exchange id (to learn who placed a fill: its client id)."""
        return self._order(await self._call(self.client.fetch_order, exchange_order_id, self._unified(symbol)))

    async def open_orders(self, symbol: str | None = None) -> list[OrderSnapshot]:
        unified = self._unified(symbol) if symbol else None
        regular = await self._call(self.client.fetch_open_orders, unified)
        conditional = await self._call(self.client.fetch_open_orders, unified, None, None, {"trigger": True})
        return [self._order(o) for o in [*regular, *conditional]]

    async def place_entry(self, symbol: str, side: Side, quantity: Decimal, client_id: str,
                          price: Decimal | None = None) -> OrderSnapshot:
        order_side = side.entry_order_side
        kind = "limit" if price is not None else "market"
        raw = await self._call(self.client.create_order, self._unified(symbol), kind, order_side, float(quantity),
                               float(price) if price is not None else None, {"newClientOrderId": client_id})
        return self._order(raw)

    async def place_stop(self, symbol: str, position_side: Side, quantity: Decimal, trigger_price: Decimal,
                         client_id: str, purpose: OrderPurpose = OrderPurpose.STOP) -> OrderSnapshot:
        """A reduce-only conditional market order (Binance: the Algo Service, /fapi/v1/algoOrder)."""
        closing_side = position_side.exit_order_side
        trigger_param = "takeProfitPrice" if purpose is OrderPurpose.TAKE_PROFIT else "stopLossPrice"
        raw = await self._call(self.client.create_order, self._unified(symbol), "market", closing_side,
                               float(quantity), None,
                               {trigger_param: str(trigger_price), "reduceOnly": True, "clientAlgoId": client_id,
                                "newClientOrderId": client_id,
                                # trigger on the mark, the price the safe-side guard checks (Binance's
                                # default, CONTRACT_PRICE, is the last trade)
                                "workingType": "MARK_PRICE"})
        return self._order(raw)

    async def cancel_order(self, order: OrderRef) -> None:
        unified = self._unified(order.symbol)
        if order.algo_id is not None:
            await self._call(self.client.cancel_order, order.algo_id, unified, {"trigger": True})
        elif order.exchange_order_id is not None:
            await self._call(self.client.cancel_order, order.exchange_order_id, unified)
        else:
            await self._call(self.client.cancel_order, None, unified, {"clientOrderId": order.client_id})

    async def close_position(self, symbol: str, position_side: Side, quantity: Decimal,
                             client_id: str) -> OrderSnapshot:
        closing_side = position_side.exit_order_side
        raw = await self._call(self.client.create_order, self._unified(symbol), "market", closing_side,
                               float(quantity), None, {"reduceOnly": True, "newClientOrderId": client_id})
        return self._order(raw)

    async def fills(self, symbol: str, since: datetime) -> list[Fill]:
        raw = await self._call(self.client.fetch_my_trades, self._unified(symbol), int(since.timestamp() * 1000))
        return [Fill(symbol=self._market_id(t["symbol"]), order_id=str(t["order"]), side=t["side"],
                     price=_dec(t["price"]) or Decimal(0), quantity=_dec(t["amount"]) or Decimal(0),
                     realized_pnl=_dec((t.get("info") or {}).get("realizedPnl")) or Decimal(0),
                     fee=_dec((t.get("fee") or {}).get("cost")) or Decimal(0), at=_ms(t["timestamp"]))
                for t in raw]

    # --- streams -------------------------------------------------------------------------------

    def position_updates(self) -> AsyncIterator[PositionSnapshot | Resynced]:
        return self._supervise("positions", "positions", lambda c: c.watch_positions(), self._position,
                               key=lambda p: (p.symbol, p.amount, p.entry_price, p.at),
                               order=lambda p: (p.symbol, p.at), probe=self._listen_key_alive,
                               quiet_s=self.settings.user_probe_after_s, cached=lambda c: _cached(c.positions),
                               snapshot=self.positions, tapped=True)

    def order_updates(self) -> AsyncIterator[OrderSnapshot | Resynced]:
        return self._supervise("orders", "orders", lambda c: c.watch_orders(), self._order, key=lambda o: o.key,
                               order=_order_progress, late=_late_trade, probe=self._listen_key_alive,
                               quiet_s=self.settings.user_probe_after_s, cached=lambda c: _cached(c.orders),
                               snapshot=self.open_orders, tapped=True)

    def mark_prices(self, symbols: list[str]) -> AsyncIterator[MarkPrice | Resynced]:
        def watch(client: Any) -> Awaitable[Any]:
            return client.watch_mark_prices([self._unified(s) for s in symbols])

        swept = -1  # self._marks_to_ccxt at the last sweep

        def latest(client: Any) -> list[list[Any]]:
            # ccxt keeps the newest mark per symbol in `tickers`; a burst between two watches resolves
            # only its first frame, so the sweep picks up the newest (the key drops repeats). One part,
            # like `_cached` gives. Tapped (Binance), ccxt's table changes only with a frame the tap left to
            # ccxt: no such frame since the last sweep, nothing to walk (500 symbols: ~0.4 ms a sweep).
            nonlocal swept
            if self._binance:
                if swept == self._marks_to_ccxt:
                    return []
                swept = self._marks_to_ccxt
            tickers = getattr(client, "tickers", None) or {}
            return [[tickers[u] for u in (self._unified(s) for s in symbols) if u in tickers]]

        return self._supervise("marks", "markPrice", lambda c: _values(watch(c)), self._mark,
                               key=lambda m: (m.symbol, m.price, m.at), order=lambda m: (m.symbol, m.at),
                               probe=None, quiet_s=self.settings.market_silent_after_s, cached=latest,
                               snapshot=None, tapped=True, tap_symbols=frozenset(symbols))

    async def probe_user_stream(self, reason: str) -> bool | None:
        """REST showed what the user-data streams did not deliver: doubt them (`doubted`, until they deliver or
        are resubscribed) and keep the listen key alive now. True: the key is alive (the socket may still be
        wedged: the caller decides whether to recreate). False: the key had expired (-1125); the user streams
        are marked SILENT and resubscribed with a new key before this returns. None: the venue could not say
        (network, 5xx, a refused key: logged; `auth_failure` says which) or the exchange has no listen key."""
        self.doubt(reason)
        client, generation = self.client, self.generation
        if client is None or not hasattr(client, "fapiPrivatePutListenKey"):
            return None
        outcome = await self._keepalive(client, "probe")
        if outcome == "expired":
            await self._renew_listen_key(generation, f"the listen key expired (probed: {reason})")
            return False
        return True if outcome == "alive" else None

    def doubt(self, reason: str, streams: tuple[str, ...] = USER_STREAMS) -> None:
        """Mark running streams doubted (REST showed what they did not deliver) until they deliver again."""
        for name in streams:
            if name in self.health:
                if name not in self.doubted:
                    logger.info("{} stream doubted: {}", name, reason)
                self.doubted[name] = reason

    def _heard(self, name: str, why: str) -> None:
        if self.doubted.pop(name, None) is not None:
            logger.info("{} stream no longer doubted: {}", name, why)

    async def _keepalive(self, client: Any, why: str) -> str:
        """PUT the listen key on `client`: 'alive', 'expired' (-1125) or 'error' (anything else; logged)."""
        try:
            await self._call_on(client.fapiPrivatePutListenKey, private=True)
        except errors.ExchangeError as e:
            if e.code == -1125:
                logger.warning("user-data stream: the listen key expired ({} keepalive answered -1125)", why)
                return "expired"
            logger.warning("user-data stream: listen key keepalive ({}) failed: {}", why, e)
            return "error"
        if client is self.client:
            self._keepalive_at = asyncio.get_running_loop().time()
        return "alive"

    async def _listen_key_alive(self, client: Any) -> bool:
        """The idle probe (Binance): keep the listen key alive; -1125 or no answer: the stream is silent."""
        if not hasattr(client, "fapiPrivatePutListenKey"):
            return True
        return await self._keepalive(client, "idle") == "alive"

    def _ensure_keepalive(self) -> None:
        if self._keepalive_task is None and not self._closed and hasattr(self.client, "fapiPrivatePutListenKey"):
            self._keepalive_task = asyncio.ensure_future(self._keep_alive_on_schedule())

    async def _keep_alive_on_schedule(self) -> None:
        """Keep the listen key alive every `listen_key_keepalive_s`, however busy the streams are (the idle
        probe only runs when they are quiet). ccxt keeps it alive too, but not dependably: its timer chain
        ends whenever a keepalive finds the stream between two connections, and a failed one only rejects the
        watches. -1125 here: the key is gone, the user streams are SILENT and resubscribed at once."""
        loop = asyncio.get_running_loop()
        period = self.settings.listen_key_keepalive_s
        while not self._closed:
            try:
                wait = self._keepalive_at + period - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                client, generation = self.client, self.generation
                if client is None or not any(self.health.get(n) is StreamHealth.HEALTHY for n in USER_STREAMS):
                    await asyncio.sleep(min(period, 1.0))  # not subscribed now: the reconnection brings a new key
                    continue
                outcome = await self._keepalive(client, "scheduled")
                if outcome == "expired":
                    await self._renew_listen_key(generation, "the listen key expired (scheduled keepalive)")
                elif outcome == "error":
                    await asyncio.sleep(min(period, KEEPALIVE_RETRY_S))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the schedule must outlive any surprise
                logger.exception("listen key keepalive schedule: {}: {}", type(e).__name__, e)
                await asyncio.sleep(min(period, 1.0))

    def _listen_key_expired(self, client: Any) -> None:
        """Binance pushed listenKeyExpired on this client's user-data socket: nothing more will arrive on it."""
        if client is self.client and not self._closed:  # an old client's notice: it is replaced already
            self._spawn(self._renew_listen_key(self.generation, "the venue sent listenKeyExpired"))

    async def _renew_listen_key(self, generation: int, why: str) -> None:
        """The listen key is gone: mark the user streams SILENT and recreate the client now (its first watch
        creates a new key), not after a backoff. A failed recreate is logged; the supervisors' idle probe and
        backoff take over from there."""
        if generation != self.generation or self._closed:
            return  # already recreated since
        for name in USER_STREAMS:
            if name in self.health:
                self.health[name] = StreamHealth.SILENT
                self.reconnects[name] += 1
        logger.warning("{}: user-data streams silent: {}; subscribing with a new listen key",
                       self.settings.exchange_id, why)
        try:
            await self.recreate(generation, f"user-data streams silent: {why}")
        except errors.ExchangeError as e:
            logger.error("user-data streams: could not recreate the exchange client: {}", e)

    async def _reconnect(self, name: str, generation: int, why: str, backoff: float) -> float:
        """Wait a jittered backoff, then recreate the client; a failed attempt is logged and retried by
        the caller's loop after a longer wait. Returns the next backoff."""
        delay = backoff * (0.5 + random.random())
        logger.warning("{} stream {}: reconnecting in {:.2f} s", name, why, delay)
        await asyncio.sleep(delay)
        try:
            await self.recreate(generation, f"{name} stream {why}")
        except errors.ExchangeError as e:
            logger.error("{} stream: could not recreate the exchange client: {}", name, e)
        return min(backoff * 2, self.settings.backoff_max_s)

    async def _subscribed(self, client: Any, hint: str, watching: asyncio.Future[Any] | None = None,
                          timeout_s: float = 10.0) -> bool:
        """Wait until ccxt's WebSocket for this stream is connected and waiting for `hint` messages (not
        past the watch itself failing, e.g. a refused connection: the caller's loop reconnects then)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if watching is not None and watching.done():
                return not watching.cancelled() and watching.exception() is None
            for ws in list(getattr(client, "clients", {}).values()):
                connected = getattr(ws, "connected", None)
                if connected is None or not connected.done() or connected.cancelled() or connected.exception():
                    continue
                if any(hint in k for k in [*ws.futures, *ws.subscriptions]):
                    return True
            await asyncio.sleep(0.01)
        return False

    async def _supervise(self, name: str, hint: str, watch: Callable[[Any], Awaitable[Any]],
                         convert: Callable[[Any], T], *,
                         key: Callable[[T], Any] | None, order: Callable[[T], Any] | None,
                         late: Callable[[T], T | None] | None = None,
                         probe: Callable[[Any], Awaitable[bool]] | None, quiet_s: float,
                         cached: Callable[[Any], list[Any]] | None,  # the cache's parts (see _cached)
                         snapshot: Callable[[], Awaitable[list[Any]]] | None,
                         tapped: bool = False, tap_symbols: frozenset[str] | None = None) -> AsyncIterator[Any]:
        """Watch forever: reconnect with backoff and jitter, announce every (re)connection with a
        Resynced marker once the new subscription is live, notice silence, drop duplicates and
        updates older than ones already seen.

        ccxt resolves a watch only for a caller already waiting: an update that lands while the previous
        batch is being handled stays in ccxt's cache until the next message. So after every batch, and
        every SWEEP_S while idle, the cache is swept for states not yielded yet (the key de-duplicates).

        `tapped` (Binance's order, position and mark streams): the frames the adapter's client reads straight into
        snapshots (`_tap`) come through a tap of this stream instead of ccxt's watch, and count as its messages
        (health, silence); frames of any other shape still reach ccxt, and its watch and cache, as before.
        `tap_symbols`: the tap takes the updates of these symbols only (the marks this watch subscribed to).
        """
        fresh = _Fresh(name, convert, key, order, self._drops.note, late)
        tap = _Tap(tap_symbols) if tapped and self._binance else None
        if tap is not None:
            self._taps.setdefault(name, []).append(tap)
        if probe is not None:
            self._ensure_keepalive()
        backoff = self.settings.backoff_initial_s
        generation = 0
        pending: asyncio.Task[Any] | None = None
        loop = asyncio.get_running_loop()
        last_message = loop.time()
        soon = False  # right after a batch: sweep again within milliseconds (the re-watch window)
        self.health[name] = StreamHealth.CONNECTING
        self.reconnects.setdefault(name, 0)
        try:
            while True:
                if self.client is None:
                    await asyncio.sleep(0.05)
                    continue
                client = self.client
                if generation != self.generation:
                    if tap is not None and tap.items:  # read before the change: before its Resynced, in order
                        for item in fresh.take((), ready=tap.take()):
                            yield item
                    if pending is not None:
                        if pending.done() and not pending.cancelled() and pending.exception() is None:
                            for item in fresh.take(pending.result()):  # finished on the old client: keep it
                                yield item
                        pending.cancel()
                    # Subscribe first, announce after: a snapshot taken on Resynced then misses nothing.
                    pending = asyncio.ensure_future(watch(client))
                    subscribed = await self._subscribed(client, hint, pending)
                    if pending.done() and (pending.cancelled() or pending.exception() is not None):
                        # The subscription itself failed (e.g. a refused connection): nothing to announce;
                        # the failure is handled below like any other (backoff, reconnect).
                        generation = self.generation
                    else:
                        if subscribed:
                            self.health[name] = StreamHealth.HEALTHY  # live, even if nothing happens
                        else:
                            logger.warning("{} stream: subscription not confirmed in time; announcing anyway",
                                           name)
                        reason = "connected" if generation == 0 else "reconnected"
                        generation = self.generation
                        state: tuple[Any, ...] | None = None
                        if snapshot is not None:
                            try:
                                state = tuple(await snapshot())
                            except errors.ExchangeError as e:
                                logger.warning("{} stream: REST snapshot after {} failed: {}", name, reason, e)
                        last_message = loop.time()
                        self._heard(name, f"subscribed anew ({reason})")
                        yield Resynced(name, reason, state)
                if pending is None:
                    pending = asyncio.ensure_future(watch(client))
                if tap is None:
                    await asyncio.wait({pending}, timeout=RESWEEP_S if soon else SWEEP_S)
                else:
                    await tap.until_news(pending, RESWEEP_S if soon else SWEEP_S)
                soon = False
                if tap is not None and tap.news:
                    backoff = self.settings.backoff_initial_s
                    last_message = loop.time()
                    self.health[name] = StreamHealth.HEALTHY
                    self._heard(name, "it delivers again")
                    for item in fresh.take((), cached(client) if cached else (), ready=tap.take()):
                        yield item
                    soon = cached is not None
                    if fresh.overflowed:
                        fresh.overflowed = False
                        yield await self._overflow_resync(name, snapshot)
                    if not pending.done():
                        continue
                if not pending.done():
                    for item in fresh.take((), cached(client) if cached else ()):
                        yield item
                    if fresh.overflowed:
                        fresh.overflowed = False
                        yield await self._overflow_resync(name, snapshot)
                    if loop.time() - last_message >= quiet_s:
                        last_message = loop.time()
                        if probe is None or not await probe(client):
                            self.health[name] = StreamHealth.SILENT
                            self.reconnects[name] += 1
                            logger.warning("{} stream silent for {:.1f} s: reconnecting", name, quiet_s)
                            backoff = await self._reconnect(name, generation, "silent", backoff)
                    continue
                task, pending = pending, None
                if task.cancelled():
                    # ccxt cancels a client's futures when it is closed: the client was replaced (by a
                    # recreate from elsewhere) or closed under this watch. Resubscribe; not our own cancel.
                    if self._closed:
                        return  # the adapter was closed: the stream ends
                    if generation == self.generation:
                        self.health[name] = StreamHealth.RECONNECTING
                        self.reconnects[name] += 1
                        backoff = await self._reconnect(name, generation, "watch cancelled", backoff)
                    continue
                try:
                    batch = task.result()
                except (TimeoutError, ccxt.BaseError, OSError) as e:
                    self.health[name] = StreamHealth.RECONNECTING
                    self.reconnects[name] += 1
                    shown = translate(e, hide=self._hide) if isinstance(e, ccxt.BaseError) else repr(e)
                    logger.warning("{} stream failed: {}", name, shown)
                    backoff = await self._reconnect(name, generation, "failed", backoff)
                    continue
                backoff = self.settings.backoff_initial_s
                last_message = loop.time()
                self.health[name] = StreamHealth.HEALTHY
                self._heard(name, "it delivers again")
                for item in fresh.take(batch, cached(client) if cached else ()):
                    yield item
                soon = cached is not None
                if fresh.overflowed:
                    fresh.overflowed = False
                    yield await self._overflow_resync(name, snapshot)
        finally:
            if pending is not None:
                pending.cancel()
            if tap is not None:
                self._taps[name].remove(tap)

    def _tap(self, client: Any, event: str, body: dict[str, Any]) -> bool:
        """A checked Binance user-stream or mark frame of the current client, read straight into snapshots for the
        taps of the stream it belongs to; False (ccxt handles it) when nobody taps that stream (a mark: of that
        symbol) or its shape is not the one `exchange/binance_user_stream.py` reads."""
        name = _TAPPED[event]
        taps = self._taps.get(name)
        if not taps or client is not self.client:
            return False
        items: list[Any] | None
        if event == "ACCOUNT_UPDATE":
            items = position_update(body)
        elif name == "marks":
            if not any(tap.wants(body.get("s")) for tap in taps):
                return False
            mark = mark_update(body)
            items = None if mark is None else [mark]
        else:
            order = order_update(event, body, self._fees)
            items = None if order is None else [order]
        if items is None:
            return False
        for tap in taps:
            tap.put(items)
        return True

    async def _overflow_resync(self, name: str,
                               snapshot: Callable[[], Awaitable[list[Any]]] | None) -> Resynced:
        """ccxt's cache of this stream filled up between two of our turns: what it dropped is unknown, so the
        engine gets a REST snapshot as after a reconnection (positions missing from it are confirmed by
        reconciliation, stops missing are put back; a flat whose fill was dropped takes its cause from REST)."""
        logger.warning("{} stream: more updates at once than ccxt's cache holds ({}); some may be lost, "
                       "resyncing from REST", name, STREAM_CACHE)
        state: tuple[Any, ...] | None = None
        if snapshot is not None:
            try:
                state = tuple(await snapshot())
            except errors.ExchangeError as e:
                logger.warning("{} stream: REST snapshot after an overflow failed: {}", name, e)
        return Resynced(name, "cache overflow", state)

    # --- conversions ---------------------------------------------------------------------------

    def _position(self, raw: dict[str, Any]) -> PositionSnapshot:
        info = raw.get("info") or {}
        amount = _dec(info.get("positionAmt", info.get("pa")))
        if amount is None:  # not Binance: unified fields
            contracts = _dec(raw.get("contracts")) or Decimal(0)
            amount = -contracts if raw.get("side") == "short" else contracts
        entry = _dec(info.get("entryPrice", info.get("ep"))) or _dec(raw.get("entryPrice")) or Decimal(0)
        return PositionSnapshot(self._market_id(raw["symbol"]), amount, entry,
                                _ms(raw.get("timestamp") or info.get("updateTime")))

    def _mark(self, raw: dict[str, Any]) -> MarkPrice:
        """A ticker of ccxt's mark-price watch (`binance_user_stream.mark_update` reads Binance's frame the same)."""
        return MarkPrice(self._market_id(raw["symbol"]), _dec(raw.get("markPrice")) or Decimal(0),
                         _ms(raw.get("timestamp")))

    def _order(self, raw: dict[str, Any]) -> OrderSnapshot:
        info: Any = raw.get("info") or {}  # Binance's own payload, as ccxt passes it on
        algo_id = info.get("algoId", info.get("aid"))
        if algo_id is not None:
            status = ALGO_STATUS.get(info.get("algoStatus", info.get("X")), OrderStatus.OPEN)
            actual = info.get("actualOrderId", info.get("ai"))
            order_type = info.get("orderType", info.get("o")) or "STOP_MARKET"
            # ccxt infers `filled` as the whole amount once an algo is "closed"; Binance's aq is the truth.
            filled = _dec(info.get("aq")) or Decimal(0)
            average = _dec(info.get("ap")) or None
        else:
            raw_status = info.get("X", info.get("status"))
            status = (ORDER_STATUS.get(raw_status)
                      or _UNIFIED_STATUS.get(raw.get("status") or "", OrderStatus.OPEN))
            actual = raw.get("id")
            order_type = info.get("o", info.get("type")) or str(raw.get("type", "")).upper()
            filled = _dec(raw.get("filled")) or Decimal(0)
            average = _dec(raw.get("average"))
        return OrderSnapshot(
            symbol=self._market_id(raw["symbol"]),
            client_id=raw.get("clientOrderId") or info.get("clientAlgoId") or info.get("caid"),
            exchange_order_id=str(actual) if actual not in (None, "") else None,
            algo_id=str(algo_id) if algo_id is not None else None,
            side=str(raw.get("side") or "").lower(),
            type=order_type,
            status=status,
            quantity=_dec(raw.get("amount")) or Decimal(0),
            filled=filled,
            average_price=average,
            trigger_price=_dec(raw.get("triggerPrice")),
            reduce_only=bool(raw.get("reduceOnly")),
            at=_ms(raw.get("lastUpdateTimestamp") or raw.get("timestamp")),
            realized_pnl=self._realized(raw, info, algo_id),
            fee=_dec((raw.get("fee") or {}).get("cost")),
            trade=order_trade(info) if algo_id is None else None,
        )

    def _realized(self, raw: dict[str, Any], info: Any, algo_id: Any) -> Decimal | None:
        """The order's realized profit over its trades seen on the stream (Binance's `rp` is the trade's own),
        summed in the fee book as `binance_user_stream` sums it for the frames it reads."""
        realized = _dec(info.get("rp"))
        order_id = raw.get("id")
        if algo_id is not None or order_id in (None, "") or not raw.get("symbol"):
            return realized
        key = (self._market_id(raw["symbol"]), str(order_id))
        trade = trade_id(info.get("t"))
        if info.get("x") in FILL_EXECUTIONS and realized is not None and trade is not None:
            self._fees.add_realized(key, trade, realized)
        return self._fees.realized_of(key, realized)


def _guarded(base: type, owner: CcxtExchange) -> type:
    """The ccxt exchange class with the changes a long-running stream needs; ccxt's files stay untouched.

    * A frame ccxt's handler chokes on is skipped, not fatal: in ccxt 4.5 an exception from the exchange's
      `handle_message` (a JSON payload with a non-numeric amount) escapes a callback of the receive loop,
      which then stops for good and every pending watch hangs.
    * The same for a frame that looks like JSON and is not (`{...` cut short): ccxt's WebSocket client
      parses it in the same callback, outside `handle_message`, so its own `handle_text_or_binary_message`
      is wrapped per connection. Text that is not JSON at all is handed to `handle_message` as a string by
      ccxt; Binance never sends such text, and ccxt's binance would take one with an "a" and a "b" in it
      for a bookTicker, so for Binance it is dropped and counted.
    * Binance frames are checked before ccxt sees them: an unknown symbol, a missing or non-numeric field
      (ccxt reads a position without `pa` as flat) drops the frame (or one position entry of an
      ACCOUNT_UPDATE); an event type nobody documented is counted and handed on (ccxt ignores it).
    * `listenKeyExpired`, which ccxt ignores, tells the adapter to resubscribe with a new key at once.
    * ccxt's listen-key timer outlives a closed client, and firing on one it opens an aiohttp session that
      nobody closes: it does nothing on a client that is closed or replaced.

    Every drop is counted by reason (`CcxtExchange.dropped_frames`) and logged by event type and field only
    (a frame can carry a listen key), at most once per reason per DROP_LOG_EVERY_S.
    """
    binance = owner._binance

    class Guarded(base):
        def handle_message(self, client: Any, message: Any) -> Any:
            try:
                if binance and isinstance(message, dict):
                    body = _binance_body(message)
                    if body.get("e") == "listenKeyExpired":
                        owner._listen_key_expired(self)
                        return None
                    if not _binance_frame_ok(body, self.markets_by_id or {}, owner._drops.note):
                        return None
                    event = body.get("e")
                    if event in _TAPPED:
                        if owner._tap(self, event, body):
                            return None
                        if event == "markPriceUpdate":
                            owner._marks_to_ccxt += 1
                return super().handle_message(client, message)
            except Exception as e:  # noqa: BLE001 - a frame ccxt cannot handle is dropped and counted
                kind = _event_of(message)
                owner._drops.note("handler_error", f"{kind}: ccxt could not handle it: {type(e).__name__}: {e}")
                return None

        if binance:
            # Parts of ccxt's user-stream handling whose results nobody reads: we watch neither balances nor
            # liquidations through ccxt (the balance is fetched over REST when it is needed; a liquidation is
            # known by its order's client id). In a cascade they were a tenth of ccxt's work per frame.
            def handle_balance(self, client: Any, message: Any) -> None:
                return None

            def handle_my_liquidation(self, client: Any, message: Any) -> None:
                return None

            def parse_ws_order(self, order: Any, market: Any = None) -> Any:
                # The same unified order, a third of the work (exchange/binance_lean.py); ccxt's for the rest.
                lean = lean_order(self, order) if market is None else None
                return lean if lean is not None else super().parse_ws_order(order, market)

        def client(self, url: str) -> Any:
            ws = super().client(url)
            if not getattr(ws, "_lc_guarded", False):
                ws._lc_guarded = True
                ws.handle_text_or_binary_message = _guard_text(ws.handle_text_or_binary_message, owner, binance)
            return ws

        async def throttle(self, cost: Any = None) -> Any:
            if is_protective() and self.throttler is not None:
                return await _ahead(self.throttler, cost)
            return await super().throttle(cost)

        async def fetch(self, url: str, method: str = "GET", headers: Any = None, body: Any = None) -> Any:
            gate = owner.may_act
            if gate is not None and method != "GET" and "listenKey" not in url and not gate():
                raise errors.NotOwner(f"{owner.settings.exchange_id}: {method} {url.split('?', 1)[0]} not sent: "
                                      "this process no longer holds the account's lease")
            return await super().fetch(url, method, headers, body)

        if hasattr(base, "keep_alive_listen_key"):
            async def keep_alive_listen_key(self, params: dict[str, Any] | None = None) -> Any:
                if self.closed_by_user or owner.client is not self:
                    return None
                return await super().keep_alive_listen_key(params or {})

    Guarded.__name__ = Guarded.__qualname__ = base.__name__
    return Guarded


def _ahead(throttler: Any, cost: Any) -> asyncio.Future[None]:
    """Queue a protective request in ccxt's rate limiter behind the protective ones already waiting and ahead
    of every other (`exchange.port.protective`). The limiter's loop takes the head of its queue and either
    releases it at once or sleeps and looks again, so an entry put at the head while it sleeps is the next
    one released; the pace (tokens, window) is untouched. With nothing waiting it is ccxt's own path."""
    queue = throttler.queue
    future: asyncio.Future[None]
    if queue:
        future = asyncio.get_running_loop().create_future()
        # Right behind the last protective one waiting: they stay in their own order even when one in the middle
        # was given up (its caller cancelled: out of the set, still in the queue until the loop reaches it).
        index = 0
        for position, (waiting, _) in enumerate(queue):
            if waiting in _PROTECTIVE_WAITING:
                index = position + 1
        queue.insert(index, (future, cost))
    else:
        future = throttler(cost)
    _PROTECTIVE_WAITING.add(future)
    future.add_done_callback(_PROTECTIVE_WAITING.discard)
    return future


_PROTECTIVE_WAITING: set[asyncio.Future[None]] = set()  # the limiter's protective entries not yet released


def _guard_text(original: Callable[[Any], Any], owner: CcxtExchange, binance: bool) -> Callable[[Any], Any]:
    """Wrap one ccxt WebSocket connection's frame decoder: a frame that is not JSON is dropped and counted."""

    def handle(data: Any) -> Any:
        if isinstance(data, str) and (len(data) < 2 or data[0] not in "{["):
            if binance:
                owner._drops.note("not_json", f"a text frame of {len(data)} characters")
                return None
            return original(data)  # other exchanges send plain text on purpose (e.g. "pong")
        try:
            return original(data)
        except ValueError as e:  # json / orjson decode errors: raised in ccxt's receive-loop callback
            owner._drops.note("not_json", f"a frame of {len(data)} characters that does not parse: "
                                          f"{type(e).__name__}")
            return None

    return handle


# The events read straight into snapshots when their stream is tapped (CcxtExchange._tap): event -> stream.
_TAPPED = {"ORDER_TRADE_UPDATE": "orders", "ALGO_UPDATE": "orders", "ACCOUNT_UPDATE": "positions",
           "markPriceUpdate": "marks"}
# Binance USDⓈ-M events (user data and market streams): anything else is counted as unknown and handed on.
_BINANCE_EVENTS = frozenset({
    "ACCOUNT_UPDATE", "ORDER_TRADE_UPDATE", "ALGO_UPDATE", "TRADE_LITE", "MARGIN_CALL", "ACCOUNT_CONFIG_UPDATE",
    "STRATEGY_UPDATE", "GRID_UPDATE", "CONDITIONAL_ORDER_TRIGGER_REJECT", "listenKeyExpired", "eventStreamTerminated",
    "markPriceUpdate", "forceOrder", "kline", "continuous_kline", "aggTrade", "trade", "depthUpdate", "bookTicker",
    "24hrTicker", "24hrMiniTicker", "markPrice_kline", "indexPrice_kline", "compositeIndex", "contractInfo",
    "assetIndexUpdate",
})
# (fields that must be there and not empty, fields that must be numbers when given) per checked object
_ORDER_FIELDS = (("s", "i", "X", "S", "q", "z"), ("q", "z", "l", "ap", "L", "p", "sp", "rp", "n"))
_ALGO_FIELDS = (("s", "aid", "X", "S"), ("q", "tp", "aq", "ap"))
_POSITION_FIELDS = (("s", "pa"), ("pa", "ep"))
_MARK_FIELDS = (("s", "p"), ("p",))


def _binance_body(message: dict[str, Any]) -> dict[str, Any]:
    """The event inside a combined-stream wrapper ({"stream": ..., "data": {...}}), or the message itself."""
    data = message.get("data")
    return data if "stream" in message and isinstance(data, dict) else message


def _event_of(message: Any) -> str:
    if isinstance(message, dict):
        return str(_binance_body(message).get("e", "?"))[:40]
    return type(message).__name__


def _binance_frame_ok(body: dict[str, Any], markets_by_id: Mapping[str, Any],
                      drop: Callable[[str, str], None]) -> bool:
    """Check one Binance event before ccxt sees it; False drops it. An ACCOUNT_UPDATE loses only its bad
    position entries (trimmed in place), the rest of it goes on."""
    event = body.get("e")
    if not isinstance(event, str):
        return True  # subscription answers and the like: ccxt's business
    if event not in _BINANCE_EVENTS:
        drop("unknown_event", f"event type {event[:40]!r}")
        return True  # ccxt ignores what it does not know; nothing is lost by handing it on
    if event == "ACCOUNT_UPDATE":
        account = body.get("a")
        entries = account.get("P", []) if isinstance(account, dict) else None
        if not isinstance(entries, list):
            drop("missing_field", "ACCOUNT_UPDATE without its a.P list")
            return False
        kept = []
        for entry in entries:
            problem = _problem(entry, *_POSITION_FIELDS, markets_by_id)
            if problem is None:
                kept.append(entry)
            else:
                drop(problem[0], f"a position of an ACCOUNT_UPDATE: {problem[1]}")
        if len(kept) != len(entries):
            assert isinstance(account, dict)  # `entries` is a list only if it came from a dict
            account["P"] = kept
        return True
    checked = {"ORDER_TRADE_UPDATE": (body.get("o"), _ORDER_FIELDS), "ALGO_UPDATE": (body.get("o"), _ALGO_FIELDS),
               "markPriceUpdate": (body, _MARK_FIELDS)}.get(event)
    if checked is None:
        return True
    problem = _problem(checked[0], *checked[1], markets_by_id)
    if problem is not None:
        drop(problem[0], f"{event}: {problem[1]}")
        return False
    return True


def _problem(entry: Any, required: tuple[str, ...], numeric: tuple[str, ...],
             markets_by_id: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, detail) of what is wrong with one object of a frame, or None."""
    if not isinstance(entry, dict):
        return "missing_field", "no object where one belongs"
    missing = [k for k in required if entry.get(k) in (None, "")]
    if missing:
        return "missing_field", f"no {', '.join(missing)}"
    symbol = entry.get("s")
    if not isinstance(symbol, str) or symbol not in markets_by_id:
        return "unknown_symbol", f"symbol {str(symbol)[:40]!r} is not a market loaded at start"
    bad = [k for k in numeric if entry.get(k) not in (None, "") and not _is_number(entry[k])]
    if bad:
        return "bad_value", f"{symbol}: {', '.join(bad)} not a number"
    return None


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))  # faster than Decimal; stricter at the edges (1e400 is not finite)
    except (TypeError, ValueError, OverflowError):
        return False


def _refusal(error: errors.ExchangeError) -> str:
    """A short reason for a refused key, from the venue's code and message (never the key: already redacted)."""
    text = str(error)
    match = _MSG.search(text)
    message = match.group(1) if match else text.split(":", 1)[0]  # the ccxt class name
    return " ".join(part for part in (str(error.code) if error.code is not None else "", message) if part)[:160]


class _FrameDrops:
    """Dropped stream frames counted by reason, logged at most once per reason per DROP_LOG_EVERY_S with the
    number suppressed since the last line."""

    def __init__(self, exchange_id: str, hide: tuple[str, ...], *, every_s: float = DROP_LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.exchange_id, self.hide, self.every_s, self.clock = exchange_id, hide, every_s, clock
        self.counts: Counter[str] = Counter()
        self._logged_at: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def note(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        now = self.clock()
        if now - self._logged_at.get(reason, float("-inf")) < self.every_s:
            self._suppressed[reason] += 1
            return
        self._logged_at[reason] = now
        more = self._suppressed.pop(reason, 0)
        tail = f" ({more} more dropped for this reason since the last line)" if more else ""
        logger.warning("{}: dropped a stream frame ({}): {}{}", self.exchange_id, reason, _redact(detail, self.hide),
                       tail)


MEMORY = 50_000  # updates remembered for de-duplication (ccxt's own caches hold 1,000 orders by default)
SWEEP_S = 0.25  # how often an idle stream looks into ccxt's cache for updates it did not hand over
# An update that lands between handing over a batch and the next watch registering is only in the
# cache: look again this soon after every batch.
RESWEEP_S = 0.001


class _Fresh:
    """Converts raw updates and keeps only new ones: not seen before, not older than one already seen."""

    def __init__(self, name: str, convert: Callable[[Any], Any], key: Callable[[Any], Any] | None,
                 order: Callable[[Any], Any] | None, drop: Callable[[str, str], None],
                 late: Callable[[Any], Any] | None = None) -> None:
        self.name, self.convert, self.key, self.order, self.drop = name, convert, key, order, drop
        self.late = late  # an update older than one already seen that still carries news: what to pass on
        self.seen: OrderedDict[Any, int] = OrderedDict()  # key -> the turn it was first seen in
        self.turn = 0  # one per take(): a batch and the sweep of the cache after it
        self.recent = 0  # entries items() found new or first seen in this turn
        self.latest: OrderedDict[Any, Any] = OrderedDict()
        self.failed: OrderedDict[int, None] = OrderedDict()  # ids of cached updates that did not convert
        # id() of a ccxt cache entry -> (its fingerprint, the turn it was converted in). Compared by value: an
        # id reused by a new entry skips it only if its content is the same. Bounded near the cache's size.
        self.raw_seen: OrderedDict[int, tuple[tuple[Any, ...], int]] = OrderedDict()
        self.malformed = 0
        self.overflowed = False  # a take read a full ccxt cache to its end: updates may have been dropped

    def items(self, raws: Any) -> list[Any]:
        out = []
        for raw in raws:
            # ccxt updates a cached entry in place with the new message's `info`: the same entry with the same
            # `info` (and top-level fields) was converted before, by this very take or an earlier one. Not
            # converting it again is most of a sweep's cost in a cascade (bench.burst: every take walks at
            # least one chunk of the cache).
            mark = _fingerprint(raw)
            if mark is not None:
                prior = self.raw_seen.get(id(raw))
                if prior is not None and prior[0] == mark:
                    self.recent += prior[1] == self.turn
                    continue
                self.raw_seen[id(raw)] = (mark, self.turn)
                self.raw_seen.move_to_end(id(raw))
                if len(self.raw_seen) > 2 * STREAM_CACHE:
                    self.raw_seen.popitem(last=False)
                # The entry changed since the last look, whatever its key says (an algo's TRIGGERING has the
                # key of its NEW): the walk back through the cache goes on past it.
                self.recent += 1
            try:
                item = self.convert(raw)
            except (KeyError, TypeError, ValueError, ArithmeticError) as e:  # bad fields: skip, count, go on
                if id(raw) not in self.failed:  # it stays in ccxt's cache: counted once, not at every sweep
                    self.recent += 1
                    self.failed[id(raw)] = None
                    if len(self.failed) > SWEEP_TAIL * 4:
                        self.failed.popitem(last=False)
                    self.malformed += 1
                    self.drop("bad_value", f"a {self.name} update ccxt parsed but we could not read: "
                                           f"{type(e).__name__}: {e}")
                continue
            if (news := self.admit(item)) is not None:
                out.append(news)
        return out

    def admit(self, item: Any) -> Any | None:
        """A converted update if it is new: not seen before (its key), not older than one already seen (one that
        is still carries news of its own, `late`: what that makes of it), else None."""
        if self.key is not None:
            k = self.key(item)
            if k in self.seen:
                self.seen.move_to_end(k)  # still in ccxt's cache: keep remembering it
                self.recent += self.seen[k] == self.turn
                return None
            self.seen[k] = self.turn
            if len(self.seen) > MEMORY:
                self.seen.popitem(last=False)
        if self.order is not None:
            ident, progress = self.order(item)
            if ident in self.latest and progress < self.latest[ident]:
                # An older update arriving late: dropped, unless it carries news (an order's earlier trade).
                late = self.late(item) if self.late is not None else None
                if late is not None:
                    self.recent += 1
                return late
            self.latest[ident] = progress
            self.latest.move_to_end(ident)
            if len(self.latest) > MEMORY:
                self.latest.popitem(last=False)
        self.recent += 1
        return item

    def take(self, batch: Any, parts: Any = (), ready: Any = ()) -> list[Any]:
        """What a watch returned, then what ccxt's cache holds that no watch handed over.

        ccxt moves an updated entry to the end of its cache (positions by symbol and side, orders by id), so
        what changed since the last look is a suffix: the cache is walked back from its end a chunk at a
        time and the walk stops at the first chunk with nothing new in it (nothing unseen, nothing this very
        batch brought). A quiet stream costs one chunk per look; a cascade of hundreds of updates between
        two turns of the consumer is read whole (a fixed tail of 64 lost every flat beyond it:
        bench/burst.py with 500 positions)."""
        self.turn += 1
        out = [news for item in ready if (news := self.admit(item)) is not None]  # read from the frames (`_Tap`)
        out.extend(self.items(batch))
        for part in parts:
            if not hasattr(part, "_deque"):  # not one of ccxt's caches (the marks: by symbol, not by recency)
                out.extend(self.items(part))
                continue
            newest_first = reversed(part)
            older: list[list[Any]] = []
            size = SWEEP_FIRST
            while True:
                chunk = list(islice(newest_first, size))
                size = min(size * 4, SWEEP_TAIL)
                if not chunk:
                    # Read to its oldest entry and everything was new: if the cache is full, ccxt may have
                    # dropped older updates nobody read. Said once per take; the stream resyncs from REST.
                    limit = getattr(getattr(part, "_deque", None), "maxlen", None)
                    if self.recent and limit is not None and len(part) >= limit:
                        self.overflowed = True
                    break
                self.recent = 0
                got = self.items(chunk[::-1])
                if got:
                    older.append(got)
                if self.recent == 0:
                    break
            for got in reversed(older):
                out.extend(got)
        return out


class _Tap:
    """The updates `CcxtExchange._tap` read from the frames for one running stream, until its supervisor takes
    them. `news`: a frame came since the last take, even one with nothing in it (an ACCOUNT_UPDATE of balances
    only: the stream is alive, as ccxt's watch said when it resolved with no position); `until_news` returns then."""

    def __init__(self, symbols: frozenset[str] | None = None) -> None:
        self.symbols = symbols  # None: every symbol's updates
        self.items: list[Any] = []
        self.news = False
        self._waiter: asyncio.Future[None] | None = None

    def wants(self, symbol: Any) -> bool:
        return self.symbols is None or symbol in self.symbols

    def put(self, items: list[Any]) -> None:
        if self.symbols is not None:
            items = [item for item in items if item.symbol in self.symbols]
            if not items:
                return  # another watch's symbol: not a message of this one
            if len(self.items) >= TAP_MARKS_PER_SYMBOL * len(self.symbols):
                # A consumer that falls behind (one that awaits per mark) gets the newest mark of each symbol, as
                # ccxt's ticker table gave it, not an ever longer queue (review of 2e0d702).
                self.items = list({item.symbol: item for item in self.items}.values())
        self.items.extend(items)
        self.news = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def until_news(self, watch: asyncio.Future[Any], timeout_s: float) -> None:
        """Until this tap has news, `watch` (ccxt's watch of the stream) is done, or `timeout_s` passed. `put`
        answers the future awaited here itself, so the stream's supervisor wakes in the loop's next turn;
        `asyncio.wait` over a tap's future and the watch woke it a turn later (its own callback ran first), on
        every frame of the user stream (bench.closure_latency)."""
        if self.news or watch.done():
            return
        loop = asyncio.get_running_loop()
        woke = self._waiter = loop.create_future()

        def wake(_: object = None) -> None:
            if not woke.done():
                woke.set_result(None)

        watch.add_done_callback(wake)
        timer = loop.call_later(timeout_s, wake)
        try:
            await woke
        finally:
            timer.cancel()
            watch.remove_done_callback(wake)
            self._waiter = None

    def take(self) -> list[Any]:
        items, self.items, self.news = self.items, [], False
        return items


TAP_MARKS_PER_SYMBOL = 4  # marks a tap holds per symbol of its watch before it keeps only the newest of each


def _fingerprint(raw: Any) -> tuple[Any, ...] | None:
    """What tells one state of a ccxt cache entry from another without converting it: the message it came
    from (`info`, a new object with every update) and the fields ccxt sets itself. None: not a dict."""
    if not isinstance(raw, dict):
        return None
    get = raw.get
    return (get("info"), get("status"), get("filled"), get("contracts"), get("timestamp"), get("symbol"),
            get("markPrice"))


SWEEP_TAIL = 64  # cache entries read per chunk of a sweep, newest first (see _Fresh.take)
# The first chunk is smaller: most looks find one new entry or none, and every entry looked at costs its
# fingerprint. The chunks then grow to SWEEP_TAIL; the walk stops at the first chunk with nothing new whatever
# its size (what changed since the last look is a suffix of the cache: ccxt moves an updated entry to its end).
# Not covered: SWEEP_FIRST verbatim repeats of frames already read, arriving after newer updates, would end the
# walk early (neither Binance nor the simulator repeats a frame that way; 64 tolerated more of them).
SWEEP_FIRST = 4


def _cached(cache: Any) -> list[Any]:
    """The parts of a ccxt cache, each in its own order: a list-like ArrayCache, or a dict of them (binance
    keys by market type). Not copied: `_Fresh.take` reads each from its end only as far as it must
    (converting the whole cache after every update made each update cost milliseconds)."""
    if cache is None:
        return []
    return [part for part in (cache.values() if isinstance(cache, dict) else [cache]) if part]


def _late_trade(o: OrderSnapshot) -> OrderSnapshot | None:
    """An order's update older than one already seen is still news when it carries a trade: an order filled in
    parts whose first trade's update comes after the second's. It goes on, marked `late`: its trade is booked,
    the order's state is not set back (review of f7ec545)."""
    return replace(o, late=True) if o.trade is not None else None


def _order_progress(o: OrderSnapshot) -> tuple[tuple[str, str, str], tuple[int, Decimal]]:
    """An order only moves forward: open before final, filled quantity never shrinks. Ids are only
    unique per symbol (and algo ids are a namespace of their own), so both are part of the identity."""
    kind = "algo" if o.algo_id is not None else "order"
    return ((o.symbol, kind, o.algo_id or o.exchange_order_id or o.client_id or ""),
            (_STATUS_RANK.get(o.status, 2), o.filled))


async def _close_quietly(client: Any) -> None:
    if client is None:
        return
    try:
        await client.close()
    except Exception as e:  # noqa: BLE001 - a wedged client may not close cleanly; it is dropped anyway
        logger.debug("closing an exchange client failed: {}", e)


async def _values(awaitable: Awaitable[Any]) -> list[Any]:
    result = await awaitable
    return list(result.values()) if isinstance(result, dict) else list(result)
