"""The exchange port implemented with ccxt (async REST + ccxt.pro WebSocket), for any ccxt exchange id.

Binance USDⓈ-M (`binanceusdm`) is the one tested end to end, against the venue simulator. Errors are
translated here into `exchange.errors`; nothing of ccxt crosses the port.
"""
from __future__ import annotations

import asyncio
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, TypeVar

import ccxt
import ccxt.pro as ccxtpro
from loguru import logger

from exchange import errors
from exchange.port import Fill, MarkPrice, OrderRules, OrderSnapshot, PositionSnapshot, Resynced, StreamHealth
from lifecycle.domain import OrderPurpose, OrderRef, OrderStatus, Side

T = TypeVar("T")


class Secret:
    """A credential that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class ExchangeSettings:
    exchange_id: str = "binanceusdm"
    api_key: Secret = field(default_factory=lambda: Secret(""))
    secret: Secret = field(default_factory=lambda: Secret(""))
    sandbox: bool = False  # the exchange's testnet, through ccxt's set_sandbox_mode
    urls: Mapping[str, str] = field(default_factory=dict)  # urls['api'] overrides; "ws.linear" for nested keys
    options: Mapping[str, Any] = field(default_factory=dict)
    user_probe_after_s: float = 30.0  # no user-data event this long: check the listen key is alive
    market_silent_after_s: float = 10.0  # no mark price this long (they tick every second): silent
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # ccxt paces requests by the venue's published weights (an all-symbol open-orders list weighs 40 on
    # Binance, about a second of budget). Keep it on against a real venue; tests on the simulator turn it off.
    rate_limit: bool = True


# --- error translation ----------------------------------------------------------------------------

_CODE = re.compile(r'"code"\s*:\s*"?(-?\d+)')


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
    elif code in (-1022, -2014, -2015) or isinstance(
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
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


# TRIGGERED means the algo placed its order, not that anything filled: still working until FINISHED.
_BINANCE_ALGO_STATUS = {
    "NEW": OrderStatus.OPEN, "TRIGGERING": OrderStatus.OPEN, "TRIGGERED": OrderStatus.OPEN,
    "FINISHED": OrderStatus.FILLED, "CANCELED": OrderStatus.CANCELED, "EXPIRED": OrderStatus.EXPIRED,
    "REJECTED": OrderStatus.REJECTED,
}
_BINANCE_ORDER_STATUS = {
    "NEW": OrderStatus.OPEN, "PARTIALLY_FILLED": OrderStatus.OPEN, "FILLED": OrderStatus.FILLED,
    "CANCELED": OrderStatus.CANCELED, "EXPIRED": OrderStatus.EXPIRED, "EXPIRED_IN_MATCH": OrderStatus.EXPIRED,
    "REJECTED": OrderStatus.REJECTED,
}
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
        self.malformed_frames = 0  # WebSocket frames ccxt could not handle, skipped
        self._closed = False

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> CcxtExchange:
        await self._create()
        return self

    async def close(self) -> None:
        self._closed = True  # streams end instead of reconnecting
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def _create(self) -> None:
        self.client = await self._new_client()
        self.generation += 1

    async def _new_client(self) -> Any:
        base = getattr(ccxtpro, self.settings.exchange_id, None)
        if base is None:
            raise errors.Fatal(f"ccxt has no WebSocket-capable exchange {self.settings.exchange_id!r}")
        cls = _guarded(base, self)
        # fetchCurrencies: futures only, no spot-wallet calls. watchPositions.fetchPositionsSnapshot: ccxt's own
        # snapshot is loaded lazily and races live updates (a flat was lost with watch_orders on the same
        # connection); the adapter's own snapshot rides on Resynced instead.
        # fetchOpenOrders.warnWithoutSymbol: the snapshot after a reconnect lists every symbol on purpose.
        options = {"fetchCurrencies": False, "watchPositions": {"fetchPositionsSnapshot": False},
                   "fetchOpenOrders": {"warnWithoutSymbol": False}, **dict(self.settings.options)}
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
        try:
            await self._call_on(client.load_markets)
        except BaseException:
            await _close_quietly(client)
            raise
        return client

    async def recreate(self, seen_generation: int, reason: str) -> None:
        """Replace the client, once per generation however many streams ask. The new client is built
        first and swapped in only when it works; on failure the old one stays and the error propagates
        (the supervisors retry with backoff). Calls in flight on the old client end as Retryable."""
        async with self._recreate_lock:
            if self.generation != seen_generation:
                return
            logger.warning("{}: recreating the exchange client: {}", self.settings.exchange_id, reason)
            new = await self._new_client()
            old, self.client = self.client, new
            self.generation += 1
        await _close_quietly(old)

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return await self._call_on(fn, *args, **kwargs)

    async def _call_on(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except ccxt.BaseError as e:
            raise translate(e, hide=self._hide) from e

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
        order_side = "buy" if side is Side.LONG else "sell"
        kind = "limit" if price is not None else "market"
        raw = await self._call(self.client.create_order, self._unified(symbol), kind, order_side, float(quantity),
                               float(price) if price is not None else None, {"newClientOrderId": client_id})
        return self._order(raw)

    async def place_stop(self, symbol: str, position_side: Side, quantity: Decimal, trigger_price: Decimal,
                         client_id: str, purpose: OrderPurpose = OrderPurpose.STOP) -> OrderSnapshot:
        """A reduce-only conditional market order (Binance: the Algo Service, /fapi/v1/algoOrder)."""
        closing_side = "sell" if position_side is Side.LONG else "buy"
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
        closing_side = "sell" if position_side is Side.LONG else "buy"
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
                               snapshot=self.positions)

    def order_updates(self) -> AsyncIterator[OrderSnapshot | Resynced]:
        return self._supervise("orders", "orders", lambda c: c.watch_orders(), self._order, key=lambda o: o.key,
                               order=_order_progress, probe=self._listen_key_alive,
                               quiet_s=self.settings.user_probe_after_s, cached=lambda c: _cached(c.orders),
                               snapshot=self.open_orders)

    def mark_prices(self, symbols: list[str]) -> AsyncIterator[MarkPrice | Resynced]:
        def watch(client: Any) -> Awaitable[Any]:
            return client.watch_mark_prices([self._unified(s) for s in symbols])

        def convert(raw: Any) -> MarkPrice:
            return MarkPrice(self._market_id(raw["symbol"]), _dec(raw.get("markPrice")) or Decimal(0),
                             _ms(raw.get("timestamp")))

        def latest(client: Any) -> list[Any]:
            # ccxt keeps the newest mark per symbol in `tickers`; a burst between two watches resolves
            # only its first frame, so the sweep picks up the newest (the key drops repeats).
            tickers = getattr(client, "tickers", None) or {}
            return [tickers[u] for u in (self._unified(s) for s in symbols) if u in tickers]

        return self._supervise("marks", "markPrice", lambda c: _values(watch(c)), convert,
                               key=lambda m: (m.symbol, m.price, m.at), order=lambda m: (m.symbol, m.at),
                               probe=None, quiet_s=self.settings.market_silent_after_s, cached=latest,
                               snapshot=None)

    async def _listen_key_alive(self, client: Any) -> bool:
        """Binance: keep the listen key alive; -1125 means it expired and the stream is silent."""
        if not hasattr(client, "fapiPrivatePutListenKey"):
            return True
        try:
            await client.fapiPrivatePutListenKey()
            return True
        except ccxt.BaseError as e:
            logger.warning("user-data stream: listen key keepalive failed: {}", translate(e, hide=self._hide))
            return False

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
                         probe: Callable[[Any], Awaitable[bool]] | None, quiet_s: float,
                         cached: Callable[[Any], list[Any]] | None,
                         snapshot: Callable[[], Awaitable[list[Any]]] | None) -> AsyncIterator[Any]:
        """Watch forever: reconnect with backoff and jitter, announce every (re)connection with a
        Resynced marker once the new subscription is live, notice silence, drop duplicates and
        updates older than ones already seen.

        ccxt resolves a watch only for a caller already waiting: an update that lands while the previous
        batch is being handled stays in ccxt's cache until the next message. So after every batch, and
        every SWEEP_S while idle, the cache is swept for states not yielded yet (the key de-duplicates).
        """
        fresh = _Fresh(name, convert, key, order)
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
                    if pending is not None:
                        if pending.done() and not pending.cancelled() and pending.exception() is None:
                            for item in fresh.items(pending.result()):  # finished on the old client: keep it
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
                        yield Resynced(name, reason, state)
                if pending is None:
                    pending = asyncio.ensure_future(watch(client))
                done, _ = await asyncio.wait({pending}, timeout=RESWEEP_S if soon else SWEEP_S)
                soon = False
                if not done:
                    for item in fresh.items(cached(client) if cached else ()):
                        yield item
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
                except (ccxt.BaseError, OSError, asyncio.TimeoutError) as e:
                    self.health[name] = StreamHealth.RECONNECTING
                    self.reconnects[name] += 1
                    shown = translate(e, hide=self._hide) if isinstance(e, ccxt.BaseError) else repr(e)
                    logger.warning("{} stream failed: {}", name, shown)
                    backoff = await self._reconnect(name, generation, "failed", backoff)
                    continue
                backoff = self.settings.backoff_initial_s
                last_message = loop.time()
                self.health[name] = StreamHealth.HEALTHY
                for item in fresh.items([*batch, *(cached(client) if cached else ())]):
                    yield item
                soon = cached is not None
        finally:
            if pending is not None:
                pending.cancel()

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

    def _order(self, raw: dict[str, Any]) -> OrderSnapshot:
        info = raw.get("info") or {}
        algo_id = info.get("algoId", info.get("aid"))
        if algo_id is not None:
            status = _BINANCE_ALGO_STATUS.get(info.get("algoStatus", info.get("X")), OrderStatus.OPEN)
            actual = info.get("actualOrderId", info.get("ai"))
            order_type = info.get("orderType", info.get("o")) or "STOP_MARKET"
            # ccxt infers `filled` as the whole amount once an algo is "closed"; Binance's aq is the truth.
            filled = _dec(info.get("aq")) or Decimal(0)
            average = _dec(info.get("ap")) or None
        else:
            raw_status = info.get("X", info.get("status"))
            status = _BINANCE_ORDER_STATUS.get(raw_status) or _UNIFIED_STATUS.get(raw.get("status"), OrderStatus.OPEN)
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
            realized_pnl=_dec(info.get("rp")),
            fee=_dec((raw.get("fee") or {}).get("cost")),
        )


def _guarded(base: type, owner: CcxtExchange) -> type:
    """The ccxt exchange class with one change: a frame its handler chokes on is skipped, not fatal.

    In ccxt 4.5 an exception from the exchange's `handle_message` (a non-JSON frame, a JSON payload
    with a non-numeric amount) escapes a callback of the receive loop, which then stops for good:
    every pending watch hangs. Catching it here keeps the stream alive; the frame is logged (by its
    event type only: a frame can carry a listen key) and counted.
    """

    class Guarded(base):  # type: ignore[misc, valid-type]
        def handle_message(self, client: Any, message: Any) -> Any:
            try:
                return super().handle_message(client, message)
            except Exception as e:
                owner.malformed_frames += 1
                kind = message.get("e", "?") if isinstance(message, dict) else type(message).__name__
                logger.warning("skipped a WebSocket frame ({}) that ccxt could not handle: {}: {}", kind,
                               type(e).__name__, e)
                return None

    Guarded.__name__ = Guarded.__qualname__ = base.__name__
    return Guarded


MEMORY = 50_000  # updates remembered for de-duplication (ccxt's own caches hold 1,000 orders by default)
SWEEP_S = 0.25  # how often an idle stream looks into ccxt's cache for updates it did not hand over
# An update that lands between handing over a batch and the next watch registering is only in the
# cache: look again this soon after every batch.
RESWEEP_S = 0.001


class _Fresh:
    """Converts raw updates and keeps only new ones: not seen before, not older than one already seen."""

    def __init__(self, name: str, convert: Callable[[Any], Any], key: Callable[[Any], Any] | None,
                 order: Callable[[Any], Any] | None) -> None:
        self.name, self.convert, self.key, self.order = name, convert, key, order
        self.seen: OrderedDict[Any, None] = OrderedDict()
        self.latest: OrderedDict[Any, Any] = OrderedDict()
        self.malformed = 0

    def items(self, raws: Any) -> list[Any]:
        out = []
        for raw in raws:
            try:
                item = self.convert(raw)
            except (KeyError, TypeError, ValueError, ArithmeticError) as e:  # bad fields: skip, count, go on
                self.malformed += 1
                logger.warning("{} stream: skipped a malformed update: {}", self.name, e)
                continue
            if self.key is not None:
                k = self.key(item)
                if k in self.seen:
                    self.seen.move_to_end(k)  # still in ccxt's cache: keep remembering it
                    continue
                self.seen[k] = None
                if len(self.seen) > MEMORY:
                    self.seen.popitem(last=False)
            if self.order is not None:
                ident, progress = self.order(item)
                if ident in self.latest and progress < self.latest[ident]:
                    continue  # an older update arriving late
                self.latest[ident] = progress
                self.latest.move_to_end(ident)
                if len(self.latest) > MEMORY:
                    self.latest.popitem(last=False)
            out.append(item)
        return out


SWEEP_TAIL = 64  # newest cache entries swept per pass (ccxt moves an updated entry to the end)


def _cached(cache: Any) -> list[Any]:
    """The newest entries of a ccxt cache: a list-like ArrayCache, or a dict of them (binance keys by market
    type). Only the tail: ccxt appends new entries and moves updated ones to the end, and converting the
    whole cache (up to 1,000 orders) after every update made each update cost milliseconds."""
    if cache is None:
        return []
    parts = cache.values() if isinstance(cache, dict) else [cache]
    return [entry for part in parts for entry in list(part or [])[-SWEEP_TAIL:]]


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
    except Exception as e:  # a wedged client may not close cleanly; it is dropped anyway
        logger.debug("closing an exchange client failed: {}", e)


async def _values(awaitable: Awaitable[Any]) -> list[Any]:
    result = await awaitable
    return list(result.values()) if isinstance(result, dict) else list(result)
