"""The live page, in a real browser (headless Chromium through selenium), against the service on the simulator.

The service runs in this test's event loop with the control API on a free port; the browser is driven from a
worker thread (`asyncio.to_thread`), so the loop keeps serving the page while the test waits on the browser.
Every wait has a deadline (selenium's WebDriverWait, or `tests.waiting.until`).
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal as D
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from exchange.sim.server import SimServer
from lifecycle.app.page import session_value
from lifecycle.app.service import Service
from lifecycle.app.settings import load, service_config
from lifecycle.domain import CloseReason, Side
from lifecycle.journal import Outcome
from lifecycle.live import OpenCommand
from lifecycle.machines.states import PositionState as S
from tests import browser
from tests.test_service import sim_service_config
from tests.waiting import until

TOKEN = "page-token-7c2e"
T = TypeVar("T")


@dataclass
class PageRig:
    service: Service
    sim: SimServer
    base: str
    commits: list[tuple[float, str, str]] = field(default_factory=list)  # (wall time, position id, dest)

    @property
    def cookie(self) -> str:
        assert self.service.api is not None
        return self.service.api.page.cookie_name

    @property
    def live(self) -> Any:
        return self.service.accounts["sim"].live


async def _service(sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Service:
    """The service on the simulator (SQLite, one account "sim"), its API and page on a free port, started."""
    _, config = sim_service_config(sim, tmp_path, monkeypatch, f"sqlite:///{tmp_path / 'page.sqlite'}", token=TOKEN)
    service = await Service(service_config(load(config))).start()
    assert service.api is not None
    return service


@pytest.fixture
async def page_rig(sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PageRig]:
    service = await _service(sim, tmp_path, monkeypatch)
    assert service.api is not None
    rig = PageRig(service, sim, service.api.url.rstrip("/"))

    def on_commit(position: Any, outcome: Outcome) -> None:
        rig.commits.append((time.time(), position.id, outcome.dest.value))

    service.accounts["sim"].engine.listeners.append(on_commit)
    try:
        yield rig
    finally:
        await service.stop()


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[Any]:
    browser.require()
    d = await asyncio.to_thread(browser.chrome, tmp_path / "chromium-profile")
    try:
        yield d
    finally:
        await asyncio.to_thread(d.quit)


async def in_browser(work: Callable[[], T]) -> T:
    return await asyncio.to_thread(work)


def _wait(d: Any, check: Callable[[Any], Any], timeout: float = 10.0, what: str = "") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.02).until(check, message=what)


def _log_in(d: Any, base: str, token: str = TOKEN) -> None:
    from selenium.webdriver.common.by import By

    d.get(base + "/")
    d.find_element(By.ID, "token").send_keys(token)
    d.find_element(By.ID, "login").click()


def _enter(d: Any, base: str) -> None:
    _log_in(d, base)
    _connected(d)


def _connected(d: Any) -> None:
    _wait(d, lambda d: d.execute_script("return document.body && document.body.dataset.connected") == "1",
          what="page connected")  # (no body yet while the login's redirect loads)


def _row_state(d: Any, position_id: str) -> str | None:
    return d.execute_script(
        "const r = document.querySelector(`#positions tbody tr[data-id='${arguments[0]}']`);"
        "return r ? r.dataset.state : null;", position_id)


async def _open(rig: PageRig, symbol: str, side: Side, quantity: str, **kw: Any) -> Any:
    """Open through the live engine; back once the position is OPEN with its stop on the venue."""
    position = await rig.live.open(OpenCommand(symbol, side, D(quantity), stop_loss_pct=D(1), **kw))
    positions = rig.service.accounts["sim"].engine.positions
    await until(lambda: positions[position.id].state is S.OPEN and positions[position.id].stop_price is not None,
                timeout=10, what=f"{symbol} open and protected")
    return positions[position.id]


async def test_the_page_refuses_without_the_token_and_never_puts_it_in_a_url_or_the_cookie(
        page_rig: PageRig, driver: Any) -> None:
    from selenium.webdriver.common.by import By

    base, d = page_rig.base, driver
    position = await _open(page_rig, "BTCUSDT", Side.LONG, "0.01")
    async with aiohttp.ClientSession() as http:
        for path in ("/ws", "/diagram.svg", "/positions", f"/positions/{position.id}/journal"):
            async with http.get(base + path) as r:
                assert r.status == 401, path
        async with http.post(base + "/session", data={"token": "wrong"}) as r:
            assert r.status == 401 and "That is not the token" in await r.text()
            assert page_rig.cookie not in r.cookies
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # unsafe: an IP host
        async with http.post(base + "/session", data={"token": TOKEN}, allow_redirects=False) as r:
            assert r.status == 303
            cookie = r.cookies[page_rig.cookie]
            assert page_rig.cookie == f"lifecycle_session_{page_rig.service.api.port}"  # type: ignore[union-attr]
            assert cookie.value == session_value(page_rig.service.config.api.token)  # type: ignore[union-attr]
            assert TOKEN not in cookie.value and cookie["httponly"] and cookie["samesite"] == "Strict"
            assert TOKEN not in r.headers.get("Location", "")
        async with http.get(base + "/positions") as r:  # the cookie authenticates reads
            assert r.status == 200
        async with http.post(base + f"/positions/{position.id}/close", json={}) as r:  # writes need the header
            assert r.status == 403
    assert page_rig.service.accounts["sim"].engine.positions[position.id].state is S.OPEN

    def without_token() -> tuple[bool, bool, str]:
        d.get(base + "/")
        return (bool(d.find_elements(By.ID, "token")), bool(d.find_elements(By.ID, "positions")),
                d.find_element(By.TAG_NAME, "body").text)

    has_form, has_table, text = await in_browser(without_token)
    assert has_form and not has_table and position.id not in text and "BTCUSDT" not in text

    def wrong_then_right() -> tuple[str, str]:
        _log_in(d, base, "not-it")
        refused = str(_wait(d, lambda d: "That is not the token" in (text := d.execute_script(
            "return document.body ? document.body.innerText : ''")) and text, what="the refusal"))
        _log_in(d, base)
        _connected(d)
        return refused, d.current_url

    refused, url = await in_browser(wrong_then_right)
    assert "That is not the token" in refused and TOKEN not in url
    await in_browser(lambda: _wait(d, lambda d: _row_state(d, position.id) == "OPEN", what="the row"))


async def test_a_cross_origin_websocket_is_refused(page_rig: PageRig) -> None:
    async with aiohttp.ClientSession(cookies={page_rig.cookie: session_value(
            page_rig.service.config.api.token)}) as http:  # type: ignore[union-attr]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(page_rig.base + "/ws", headers={"Origin": "http://evil.example"})
        assert refused.value.status == 403
        async with http.ws_connect(page_rig.base + "/ws") as ws:
            first = json.loads((await ws.receive(timeout=5)).data)
            assert first["type"] == "snapshot" and "table" in first


async def test_the_page_shows_the_positions_and_a_state_change_within_a_second_of_its_commit(
        page_rig: PageRig, driver: Any) -> None:
    rig, d = page_rig, driver
    mark = rig.sim.venue.marks["ETHUSDT"]
    plain = await _open(rig, "BTCUSDT", Side.LONG, "0.01")
    trailing = await _open(rig, "ETHUSDT", Side.LONG, "0.1", trailing_activation=mark * D("1.01"),
                           trailing_callback_pct=D("0.5"))
    await in_browser(lambda: _enter(d, rig.base))
    shown = await in_browser(lambda: d.execute_script(
        "return [...document.querySelectorAll('#positions tbody tr')].map(r => [r.dataset.id, r.dataset.state])"))
    assert sorted(shown) == sorted([[plain.id, "OPEN"], [trailing.id, "OPEN"]])
    open_count = await in_browser(lambda: d.execute_script("return document.getElementById('count-OPEN').textContent"))
    assert open_count == "2"
    assert "refused" not in json.dumps(await in_browser(lambda: d.get_log("browser")))

    rig.sim.venue.set_mark("ETHUSDT", mark * D("1.02"))  # the trailing stop activates: OPEN -> TS_ACTIVE
    await in_browser(lambda: _wait(d, lambda d: _row_state(d, trailing.id) == "TS_ACTIVE", what="TS_ACTIVE shown"))
    committed = next(at for at, pid, dest in rig.commits if pid == trailing.id and dest == "TS_ACTIVE")
    shown_at = int(await in_browser(lambda: d.execute_script(
        f"return document.querySelector(`#positions tbody tr[data-id='{trailing.id}']`).dataset.changedAt"))) / 1000
    assert shown_at - committed < 1.0, f"shown {shown_at - committed:.3f} s after the commit"
    assert await in_browser(lambda: d.execute_script(
        "return document.getElementById('count-TS_ACTIVE').textContent")) == "1"


async def test_closing_a_position_through_the_button_after_confirming(page_rig: PageRig, driver: Any) -> None:
    from selenium.webdriver.common.by import By

    rig, d = page_rig, driver
    position = await _open(rig, "BTCUSDT", Side.LONG, "0.01")
    await in_browser(lambda: _enter(d, rig.base))

    def click_close(confirm: bool) -> None:
        d.find_element(By.CSS_SELECTOR, f"#positions tbody tr[data-id='{position.id}'] button.close").click()
        _wait(d, lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None, what="dialog")
        assert "BTCUSDT" in d.find_element(By.ID, "confirm-text").text
        d.find_element(By.ID, "confirm-ok" if confirm else "confirm-cancel").click()

    await in_browser(lambda: click_close(False))  # "keep it": nothing is sent
    await asyncio.sleep(0)  # let a (wrong) request reach the loop before the check below
    assert rig.service.accounts["sim"].engine.positions[position.id].state is S.OPEN
    await in_browser(lambda: click_close(True))
    await until(lambda: position.id not in rig.service.accounts["sim"].engine.positions, timeout=10,
                what="the position closed")
    ended = await in_browser(lambda: _wait(d, lambda d: d.execute_script(
        "const r = document.querySelector(`#ended tbody tr[data-id='${arguments[0]}']`);"
        "return r && !document.querySelector(`#positions tbody tr[data-id='${arguments[0]}']`) "
        "&& [...r.cells].map(c => c.textContent);", position.id), what="the ended row"))
    assert ended[5] == "CLOSED" and ended[6] == "bot" and ended[8] not in ("", "-"), ended
    assert rig.commits[-1][1:] == (position.id, "CLOSED")


async def test_opening_through_the_form_with_the_apis_validation(page_rig: PageRig, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    rig, d = page_rig, driver
    await in_browser(lambda: _enter(d, rig.base))

    def submit(symbol: str, quantity: str) -> str:
        Select(d.find_element(By.ID, "open-symbol")).select_by_value(symbol)
        field_ = d.find_element(By.CSS_SELECTOR, "#open-form input[name=quantity]")
        field_.clear()
        field_.send_keys(quantity)
        d.find_element(By.ID, "open-submit").click()
        return str(_wait(d, lambda d: (t := d.find_element(By.ID, "open-result").text) != "opening..." and t,
                         what="an answer"))

    refused = await in_browser(lambda: submit("ETHUSDT", "lots"))
    assert "quantity" in refused.lower() and not rig.service.accounts["sim"].engine.positions, refused
    answer = await in_browser(lambda: submit("ETHUSDT", "0.1"))
    assert answer.startswith("opened "), answer
    position_id = answer.split()[1].rstrip(":")
    assert rig.service.accounts["sim"].engine.positions[position_id].symbol == "ETHUSDT"
    await in_browser(lambda: _wait(d, lambda d: _row_state(d, position_id) in ("OPENING", "OPEN"), what="new row"))


async def test_the_page_shows_the_demos_positions_while_the_demo_runs(tmp_path: Path, driver: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`lifecycle demo --forever`'s page: the browser's rows are the service's live positions, and the
    scripted endings are listed with their exit prices."""
    from lifecycle.app.demo import run_demo

    monkeypatch.setenv("LIFECYCLE_API_TOKEN", TOKEN)
    stop = asyncio.Event()
    announced: asyncio.Future[tuple[str, str | None]] = asyncio.get_running_loop().create_future()
    demo = asyncio.create_task(run_demo(tmp_path / "demo", pace=0.1, forever=True, page_port=0, stop=stop,
                                        announce=lambda url, token: announced.set_result((url, token))))
    try:
        url, shown_token = await asyncio.wait_for(announced, 60)
        assert shown_token is None  # the user's own token is not printed
        base = url.rstrip("/")
        await in_browser(lambda: _enter(driver, base))

        async def live_ids() -> set[str]:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http, \
                    http.get(base + "/positions") as r:
                return {p["id"] for p in await r.json()}

        async def rows_match() -> bool:
            ids = await live_ids()
            shown = await in_browser(lambda: driver.execute_script(
                "return [...document.querySelectorAll('#positions tbody tr')].map(r => r.dataset.id)"))
            return bool(ids) and set(shown) == ids and ids == await live_ids()

        await until(rows_match, timeout=60, what="the browser shows the demo's live positions")
        ended = await in_browser(lambda: _wait(driver, lambda d: (rows := d.execute_script(
            "return [...document.querySelectorAll('#ended tbody tr')].map(r => [...r.cells].map(c => c.textContent))"
        )) and len(rows) >= 8 and rows, timeout=60, what="the demo's eight endings"))
        causes = {row[6] for row in ended}
        assert {"bot", "stop_loss", "trailing_stop", "liquidation", "adl", "manual"} <= causes, causes
        assert all(row[8] != "-" for row in ended if row[5] != "PHANTOM"), [r[5:10] for r in ended]  # exits shown
    finally:
        stop.set()
        await asyncio.wait_for(demo, 60)


class _StuckSocket:
    """A browser connection whose sends never complete (a browser stopped with SIGSTOP, a full socket)."""

    async def send_str(self, data: str) -> None:
        await asyncio.Event().wait()


class _Transport:
    def __init__(self) -> None:
        self.aborted = asyncio.Event()

    def is_closing(self) -> bool:
        return self.aborted.is_set()

    def abort(self) -> None:
        self.aborted.set()


async def test_a_stuck_browser_is_dropped_and_delays_neither_the_others_nor_the_engine(page_rig: PageRig) -> None:
    from lifecycle.app.page import _Client

    rig = page_rig
    assert rig.service.api is not None
    hub = rig.service.api.page
    stuck, transport = _StuckSocket(), _Transport()
    client = _Client(stuck, transport, send_timeout_s=30, queue_size=hub.queue_size)  # type: ignore[arg-type]
    client.start()
    hub.clients[stuck] = client  # type: ignore[index]
    cookies = {rig.cookie: session_value(rig.service.config.api.token)}  # type: ignore[union-attr]
    async with aiohttp.ClientSession(cookies=cookies) as http, http.ws_connect(rig.base + "/ws") as ws:
        assert json.loads((await ws.receive(timeout=5)).data)["type"] == "snapshot"
        position = await _open(rig, "BTCUSDT", Side.LONG, "0.01")  # the engine is not held up by the stuck one
        for _ in range(hub.queue_size + 1):  # more than it may hold: it goes, cut off at once (no graceful
            hub._broadcast('{"type":"noise"}')  # close that would wait for it); the other one keeps up
            await asyncio.sleep(0.005)
        assert transport.aborted.is_set()
        assert stuck not in hub.clients
        await rig.live.close(position.id, CloseReason.OPERATOR)

        async def ended_reaches_the_other_browser() -> bool:
            while True:
                message = json.loads((await ws.receive(timeout=5)).data)
                if message["type"] == "update" and position.id in message["gone"]:
                    return True

        assert await asyncio.wait_for(ended_reaches_the_other_browser(), 10)


def _stuck_websocket(port: int, cookie: str) -> Any:
    """A browser that completes the WebSocket handshake and then never reads again (its receive buffer
    shrunk, so that what the service sends backs up at once)."""
    import base64
    import os
    import socket

    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    raw.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nCookie: {cookie}\r\n\r\n").encode())
    assert raw.recv(12) == b"HTTP/1.1 101"
    return raw


async def test_the_service_stops_at_once_with_a_browser_that_stopped_reading(page_rig: PageRig) -> None:
    """A browser that stopped reading with a lot waiting for it: the stop neither waits for it (aiohttp's graceful
    close waited a minute and more) nor is cut short by it (a cancelled send broke the ordered stop)."""
    rig = page_rig
    assert rig.service.api is not None
    hub = rig.service.api.page
    raw = await asyncio.to_thread(_stuck_websocket, rig.service.api.port, f"{rig.cookie}={hub.cookie}")
    try:
        await until(lambda: len(hub.clients) == 1, timeout=5, what="the stuck browser registered")
        big = json.dumps({"type": "noise", "pad": "x" * 200_000})
        for _ in range(40):  # ~8 MB for a browser that takes nothing
            hub._broadcast(big)
        await asyncio.sleep(0.2)  # let its sender fill the socket and block
        drained: list[str] = []
        live = rig.service.accounts["sim"].live
        assert live is not None
        stop_live = live.stop

        async def noted_stop(*args: Any, **kwargs: Any) -> None:
            drained.append("live.stop")
            await stop_live(*args, **kwargs)

        live.stop = noted_stop  # type: ignore[method-assign]
        started = time.monotonic()
        await rig.service.stop()  # raises nothing
        took = time.monotonic() - started
        assert took < 10, f"the stop took {took:.1f} s"
        assert drained == ["live.stop"]  # the ordered stop ran to its end
    finally:
        raw.close()


async def test_a_page_that_connected_while_the_service_started_gets_the_positions(page_rig: PageRig) -> None:
    rig = page_rig
    position = await _open(rig, "BTCUSDT", Side.LONG, "0.01")
    rig.service.started = False  # as during a (re)start: a page connects before the accounts are there
    cookies = {rig.cookie: session_value(rig.service.config.api.token)}  # type: ignore[union-attr]
    async with aiohttp.ClientSession(cookies=cookies) as http, http.ws_connect(rig.base + "/ws") as ws:
        first = json.loads((await ws.receive(timeout=5)).data)
        assert first["type"] == "snapshot" and first["started"] is False
        await asyncio.sleep(1.5)  # a status pass notices "starting"
        rig.service.started = True

        async def next_snapshot() -> dict[str, Any]:
            while True:
                message = json.loads((await ws.receive(timeout=5)).data)
                if message["type"] == "snapshot":
                    return dict(message)

        again = await asyncio.wait_for(next_snapshot(), 5)
        assert again["started"] is True and [p["id"] for p in again["positions"]] == [position.id]


async def test_a_page_whose_session_is_no_longer_accepted_goes_back_to_the_login_form(page_rig: PageRig,
                                                                                      driver: Any) -> None:
    from selenium.webdriver.common.by import By

    rig, d = page_rig, driver
    await in_browser(lambda: _enter(d, rig.base))
    assert rig.service.api is not None
    hub = rig.service.api.page
    hub.cookie = "a token changed since"  # what a restart with a new token does to every session
    for client in list(hub.clients.values()):
        client.abort()
    await in_browser(lambda: _wait(d, lambda d: d.find_elements(By.ID, "token"), what="the login form"))


async def test_a_page_that_connected_after_the_start_gets_one_snapshot_only(sim: SimServer, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot that follows a start goes only to pages that connected while starting: a second snapshot
    rebuilds every row under the operator's (or a test's) cursor (CI: a Close button gone stale mid-click)."""
    service = await _service(sim, tmp_path, monkeypatch)  # connect at once: within the first status pass
    try:
        assert service.api is not None
        cookies = {service.api.page.cookie_name: session_value(service.config.api.token)}  # type: ignore[union-attr]
        async with aiohttp.ClientSession(cookies=cookies) as http, \
                http.ws_connect(service.api.url.rstrip("/") + "/ws") as ws:
            kinds = []
            deadline = time.monotonic() + 2.5  # two status passes
            while (left := deadline - time.monotonic()) > 0:
                try:
                    kinds.append(json.loads((await ws.receive(timeout=left)).data)["type"])
                except TimeoutError:
                    break
        assert kinds.count("snapshot") == 1 and kinds.count("status") >= 1, kinds
    finally:
        await service.stop()


async def test_a_database_that_hangs_delays_the_page_by_its_bound_only(page_rig: PageRig) -> None:
    """The page's one database read (the ended positions of its snapshot) is bounded: a hanging database gives a
    snapshot of what this process saw, within `send_timeout_s`, instead of a page (and status loop) stuck."""
    rig = page_rig
    assert rig.service.api is not None and rig.service.repo is not None
    hub = rig.service.api.page
    hub.send_timeout_s = 0.5

    async def hangs(*_args: Any, **_kwargs: Any) -> list[dict[str, Any]]:
        await asyncio.Event().wait()
        return []

    rig.service.repo.recent_closures = hangs  # type: ignore[method-assign]
    cookies = {rig.cookie: session_value(rig.service.config.api.token)}  # type: ignore[union-attr]
    async with aiohttp.ClientSession(cookies=cookies) as http, http.ws_connect(rig.base + "/ws") as ws:
        first = json.loads((await ws.receive(timeout=5)).data)
    assert first["type"] == "snapshot" and first["ended"] == []
