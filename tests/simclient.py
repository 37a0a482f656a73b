"""Raw access to the simulator, below ccxt: signed REST calls and a user-data WebSocket reader."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlencode

import aiohttp

from exchange.sim.server import SimServer
from exchange.sim.venue import Account
from tests.waiting import until


async def signed(session: aiohttp.ClientSession, sim: SimServer, account: Account, method: str, path: str,
                 **params: Any) -> tuple[int, Any]:
    query = urlencode({**params, "timestamp": int(time.time() * 1000)})
    signature = hmac.new(account.secret.encode(), query.encode(), hashlib.sha256).hexdigest()
    url = f"{sim.rest_url}{path}?{query}&signature={signature}"
    async with session.request(method, url, headers={"X-MBX-APIKEY": account.api_key}) as response:
        return response.status, await response.json(content_type=None)


def user_connections(sim: SimServer) -> list[Any]:
    """The user-data WebSocket connections the simulator delivers to now (their listen key is valid): one is
    listed once the simulator has registered it, which is later than the client sees itself connected."""
    return [sub for key, subs in sim.user_subs.items() if (listen := sim.listen_keys.get(key)) is not None
            and not listen.expired for sub in subs]


def new_user_connection(sim: SimServer, before: list[Any]) -> bool:
    """A user-data connection the simulator delivers to that was not there `before` (user_connections())."""
    return any(all(sub is not old for old in before) for sub in user_connections(sim))


async def keyed(session: aiohttp.ClientSession, sim: SimServer, account: Account, method: str,
                path: str) -> tuple[int, Any]:
    async with session.request(method, f"{sim.rest_url}{path}", headers={"X-MBX-APIKEY": account.api_key}) as r:
        return r.status, await r.json(content_type=None)


class UserStream:
    """Reads a user-data stream into a list of events."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def open(self, session: aiohttp.ClientSession, sim: SimServer, account: Account) -> UserStream:
        _, body = await keyed(session, sim, account, "POST", "/fapi/v1/listenKey")
        before = user_connections(sim)
        ws = await session.ws_connect(f"ws://127.0.0.1:{sim.ws_port}/private/ws?listenKey={body['listenKey']}")

        async def read() -> None:
            async for msg in ws:
                self.events.append(json.loads(msg.data))

        self._task = asyncio.create_task(read())
        await until(lambda: new_user_connection(sim, before), timeout=2.0, what="the stream registered")
        return self

    async def wait_for(self, predicate: Any, timeout: float = 2.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if predicate(event):
                    return event
            await asyncio.sleep(0.01)
        raise AssertionError(f"no matching event in {self.events}")

    def close(self) -> None:
        if self._task:
            self._task.cancel()
