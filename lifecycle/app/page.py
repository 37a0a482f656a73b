"""The live page: every position on its diagram, pushed to the browser over a WebSocket.

Served by the control API (same host and port, loopback by default). Decisions:

* **The token, once.** `GET /` without a session answers a login form; `POST /session` with the API token
  sets the session cookie (`lifecycle_session_PORT`) and redirects to the page. The cookie holds
  `HMAC(token, "page session")`, not the token: it is HttpOnly (no script reads it), `SameSite=Strict` (no
  other site's page sends it), kept 30 days, and it stops working when the token changes. The token is never
  put in a URL, a log line or the page. `POST /session/end` forgets it. Trade-off, written down: browsers
  do not scope cookies by port, so any other web server on the same host name that this browser visits
  receives the cookie; do not browse untrusted local servers in the profile that holds it (or use a
  separate profile), and change the token to revoke every session.
* **Cookie-authenticated writes** (close, open from the page) must also carry the header
  `X-Lifecycle-Page: 1`, which a cross-site form cannot send; the WebSocket checks that its `Origin`, when
  given, is the page's own host.
* **Push, not polling.** On connect the page gets a snapshot (positions, ended positions, recent records,
  account health, the transition table); then every committed transition, closure and record is pushed
  within `push_delay_s` (coalesced: a burst of a thousand transitions is one message), and marks, health,
  stream ages and job outcomes once per `status_interval_s`. Each browser has its own bounded queue and
  sender: one that cannot keep up (`queue_size` messages waiting, or a send not done within
  `send_timeout_s`) is disconnected, delaying nobody else; the page reconnects and starts from a snapshot.
* **Books only.** Everything here reads the engine's state or listens to records; a failure of the page (a
  browser gone, a send that fails) is logged and never reaches protection or detection.
* Every asset (HTML, script, style, the SVG diagram generated from the table) ships with the package;
  the page loads nothing from outside (a Content-Security-Policy of 'self' says so to the browser too).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from loguru import logger

from exchange.secret import Secret
from lifecycle.domain import Position
from lifecycle.machines.diagrams import svg
from lifecycle.machines.table import TABLE

if TYPE_CHECKING:
    from lifecycle.app.api import AccountView, ServiceView

COOKIE = "lifecycle_session"
PAGE_HEADER = "X-Lifecycle-Page"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}
FEED_KINDS = frozenset({"closure", "stop_move", "protection_repair", "reduced", "closure_amended", "adopted",
                        "untracked_position", "recovery", "orphan_cancelled"})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
PUBLIC_PATHS = frozenset({"/", "/session", "/session/end", "/favicon.ico"})


def session_value(token: Secret) -> str:
    """What the session cookie holds: derived from the token, never the token itself."""
    return hmac.new(token.reveal().encode("utf-8"), b"lifecycle page session v1", hashlib.sha256).hexdigest()


def _asset(name: str) -> str:
    return resources.files("lifecycle.app").joinpath("page_assets", name).read_text(encoding="utf-8")


def position_json(p: Position, mark: Any) -> dict[str, Any]:
    trailing = p.trailing
    return {
        "id": p.id, "account": p.account, "symbol": p.symbol, "side": p.side.value, "state": p.state.value,
        "quantity": p.quantity, "entry_price": p.entry_price, "mark": mark, "stop_price": p.stop_price,
        "trailing": None if trailing is None else {
            "activation_price": trailing.activation_price, "callback_rate": trailing.callback_rate,
            "active": trailing.active, "watermark": trailing.watermark},
        "created_at": p.created_at.isoformat(),
    }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str, separators=(",", ":"))


class PageHub:
    """The page's routes, its WebSocket clients and what is pushed to them."""

    def __init__(self, service: ServiceView, token: Secret, *, push_delay_s: float = 0.03,
                 status_interval_s: float = 1.0, send_timeout_s: float = 5.0, queue_size: int = 100,
                 keep_records: int = 200, keep_ended: int = 500) -> None:
        self.service = service
        self.token = token
        self.cookie = session_value(token)
        # Browsers send a host's cookies to every port of it: one name per service port keeps two services on
        # one host (the demo and `lifecycle run`) from logging each other out. Set by the API once it listens.
        self.cookie_name = COOKIE
        self.push_delay_s = push_delay_s
        self.status_interval_s = status_interval_s
        self.send_timeout_s = send_timeout_s
        self.queue_size = queue_size
        self.clients: dict[web.WebSocketResponse, _Client] = {}
        self.records: deque[dict[str, Any]] = deque(maxlen=keep_records)  # the feed, newest last
        self.ended: deque[dict[str, Any]] = deque(maxlen=keep_ended)  # closures seen since start
        self._changed: dict[str, str] = {}  # position id -> account, since the last push
        self._new_records: list[dict[str, Any]] = []
        self._new_ended: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = False

    # --- wiring -------------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_post("/session", self._login)
        app.router.add_post("/session/end", self._logout)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/diagram.svg", self._diagram)
        app.router.add_get("/favicon.ico", self._no_icon)
        for name in ASSETS:
            app.router.add_get(f"/assets/{name}", self._serve_asset)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._listen()
        self._tasks = [asyncio.create_task(self._pusher(), name="page pusher"),
                       asyncio.create_task(self._status_loop(), name="page status")]
        for task in self._tasks:
            task.add_done_callback(_said_if_ended)

    def _listen(self) -> None:
        """Hear records once the service has its records writer (it may be created after the API)."""
        if not self._listening and self.service.records is not None:
            self.service.records.listeners.append(self.on_record)
            self._listening = True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for client in list(self.clients.values()):
            client.abort()  # a graceful close could wait for a stuck browser; the page reconnects anyway
        self.clients.clear()
        records = self.service.records
        if self._listening and records is not None and self.on_record in records.listeners:
            records.listeners.remove(self.on_record)
        self._listening = False

    def authenticated(self, request: web.Request) -> bool:
        given = request.cookies.get(self.cookie_name, "")
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.cookie.encode("utf-8"))

    # --- records: what changed ----------------------------------------------------------------------

    def on_record(self, record: Mapping[str, Any]) -> None:
        """A records listener (called where the record is emitted): note what changed, wake the pusher.
        Never raises: the engine emits records right after a commit."""
        try:
            self._note(record)
        except Exception as e:  # noqa: BLE001 - books only: the page may miss an update, the engine goes on
            logger.error("live page: a record could not be noted: {}: {}", type(e).__name__, e)

    def _note(self, record: Mapping[str, Any]) -> None:
        kind = record.get("event")
        position_id, account = record.get("position_id"), record.get("account")
        if position_id and account:
            self._changed[str(position_id)] = str(account)
        if kind == "closure":
            closure = dict(record)
            self.ended.append(closure)
            self._new_ended.append(closure)
        if kind in FEED_KINDS:
            item = dict(record)
            self.records.append(item)
            self._new_records.append(item)
        if not self.clients:
            self._changed.clear()
            self._new_records.clear()
            self._new_ended.clear()
            return
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def _pusher(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.push_delay_s)  # a burst is one message
            self._wake.clear()
            changed, self._changed = self._changed, {}
            records, self._new_records = self._new_records, []
            ended, self._new_ended = self._new_ended, []
            if not self.clients:
                continue
            try:
                message = self._update(changed, records, ended)
            except Exception as e:  # noqa: BLE001 - the page must never stop on one bad position
                logger.error("live page: an update could not be built: {}: {}", type(e).__name__, e)
                continue
            self._broadcast(message)

    def _update(self, changed: Mapping[str, str], records: list[dict[str, Any]],
                ended: list[dict[str, Any]]) -> str:
        positions, gone = [], []
        for position_id, account in changed.items():
            runtime = self.service.accounts.get(account)
            position = runtime.engine.positions.get(position_id) if runtime is not None else None
            if position is None or position.state.is_terminal:
                gone.append(position_id)
            else:
                positions.append(self._position(runtime, position))  # type: ignore[arg-type]
        return _dumps({"type": "update", "at": time.time(), "positions": positions, "gone": gone,
                       "ended": ended, "records": records})

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.status_interval_s)
            if not self.clients:
                continue
            waiting = [c for c in self.clients.values() if not c.saw_started] if self.service.started else []
            if waiting:
                # A page that connected while the service was starting saw no accounts yet (the positions loaded
                # from the database emit no records): it starts again from a snapshot, now that they are there.
                try:
                    snapshot = self.snapshot(await self._ended_from_database())
                except Exception as e:  # noqa: BLE001
                    logger.error("live page: the snapshot after the start could not be built: {}: {}",
                                 type(e).__name__, e)
                else:
                    for client in waiting:
                        if client.ws in self.clients:
                            client.saw_started = True
                            self._send(client, snapshot)
            try:
                message = _dumps({"type": "status", "at": time.time(), **self.status()})
            except Exception as e:  # noqa: BLE001
                logger.error("live page: the status could not be built: {}: {}", type(e).__name__, e)
                continue
            self._broadcast(message)

    def _broadcast(self, message: str) -> None:
        """Queue the message for every client (never waits for one); a client whose queue is full (it has not
        taken `queue_size` messages) is disconnected: it reconnects and starts from a snapshot."""
        for client in list(self.clients.values()):
            self._send(client, message)

    def _send(self, client: _Client, message: str) -> None:
        """Queue `message` for one browser; one whose queue is full is cut off."""
        if not client.offer(message):
            logger.info("live page: a browser that did not take {} updates is disconnected", client.queue.maxsize)
            self.clients.pop(client.ws, None)
            client.abort()

    # --- what the page shows ------------------------------------------------------------------------

    def _position(self, runtime: AccountView, p: Position) -> dict[str, Any]:
        live = runtime.live
        return position_json(p, live.marks.get(p.symbol) if live is not None else None)

    def status(self) -> dict[str, Any]:
        """Per account: health and its reasons, streams (health, age of the newest item, reconnects), the
        scheduled jobs' last runs, storage, unprotected positions; and the marks of every symbol."""
        from lifecycle.live import UNPROTECTED_GRACE_S

        now_mono, now = time.monotonic(), time.time()
        accounts: dict[str, Any] = {}
        marks: dict[str, dict[str, Any]] = {}
        for name, runtime in self.service.accounts.items():
            live = runtime.live
            scheduler = runtime.scheduler
            reasons = live.health_reasons() if live is not None else ["starting"]
            streams = {}
            for stream, health in runtime.exchange.health.items():
                seen = live.last_item_at.get(stream) if live is not None else None
                streams[stream] = {"health": health.value, "reconnects": runtime.exchange.reconnects.get(stream, 0),
                                   "last_item_age_s": None if seen is None else round(now_mono - seen, 1)}
            jobs = {}
            if scheduler is not None:
                stats = scheduler.stats
                for job, outcome in stats.last_outcome.items():
                    at = stats.last_at.get(job)
                    jobs[job] = {"outcome": outcome, "age_s": None if at is None else round(now - at, 1),
                                 "duration_ms": stats.last_duration_ms.get(job)}
            books = runtime.engine.books
            accounts[name] = {
                "status": "degraded" if reasons else "ok", "reasons": reasons, "streams": streams, "jobs": jobs,
                "doubted": live.stream_doubted() if live is not None else None,
                "storage_backlog": books.behind, "storage_failures": books.stats.failures,
                "unprotected": [p.id for p in live.unprotected_longer_than(UNPROTECTED_GRACE_S)]
                if live is not None else [],
                "live_positions": sum(1 for p in runtime.engine.positions.values() if p.account == name),
            }
            if live is not None:
                marks[name] = dict(live.marks)
        records = self.service.records
        return {"started": self.service.started, "accounts": accounts, "marks": marks,
                "records_failing": records.failing if records is not None else None}

    def snapshot(self, ended: list[dict[str, Any]]) -> str:
        """Everything the page shows, at this instant (built without awaiting anything)."""
        positions = []
        symbols: dict[str, list[str]] = {}
        for name, runtime in self.service.accounts.items():
            symbols[name] = list(runtime.live.symbols) if runtime.live is not None else []
            for p in runtime.engine.positions.values():
                if not p.state.is_terminal:
                    positions.append(self._position(runtime, p))
        # The database's rows, then what this process saw that they lack (a closure whose row is not written
        # yet, or that came while they were read), the newest `keep_ended`.
        seen = {r.get("position_id") for r in ended}
        ended = (ended + [r for r in self.ended if r.get("position_id") not in seen])[-(self.ended.maxlen or 500):]
        table = [{"source": e.source.value, "event": e.event.value, "dest": e.dest.value,
                  "guards": list(e.guard_names)} for e in TABLE]
        return _dumps({"type": "snapshot", "at": time.time(), "positions": positions, "ended": ended,
                       "records": list(self.records), "symbols": symbols, "table": table, **self.status()})

    async def _ended_from_database(self) -> list[dict[str, Any]]:
        """The most recent endings in the database (also those of earlier runs), oldest first; none when it
        cannot be read (the page shows what this process saw)."""
        repo = self.service.repo
        if repo is None:
            return []
        try:  # bounded: a database that hangs must not hold the status loop (every page) with it
            found = await asyncio.wait_for(
                repo.recent_closures(list(self.service.accounts), self.ended.maxlen or 500), self.send_timeout_s)
        except Exception as e:  # noqa: BLE001 - the page shows what it has; the books are not its job
            logger.warning("live page: ended positions could not be read: {}: {}", type(e).__name__, e)
            return []
        return [_closure_row(r) for r in reversed(found)]

    # --- routes -------------------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        if not self.authenticated(request):
            return _html(_asset("login.html").replace("{{error}}", ""), status=200)
        return _html(_asset("index.html"))

    async def _login(self, request: web.Request) -> web.Response:
        form = await request.post()
        given = str(form.get("token", ""))
        expected = self.token.reveal().encode("utf-8")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), expected):
            logger.warning("live page: a login with a wrong token from {}", request.remote)
            return _html(_asset("login.html").replace("{{error}}", '<p class="error">That is not the token.</p>'),
                         status=401)
        response = web.HTTPSeeOther("/")
        response.set_cookie(self.cookie_name, self.cookie, max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="Strict",
                            path="/", secure=request.secure)
        logger.info("live page: a browser at {} logged in", request.remote)
        raise response

    async def _logout(self, request: web.Request) -> web.Response:
        response = web.HTTPSeeOther("/")
        response.del_cookie(self.cookie_name, path="/")
        raise response

    async def _diagram(self, request: web.Request) -> web.Response:
        if not self.authenticated(request):
            return web.json_response({"error": "log in first"}, status=401)
        return web.Response(text=svg(), content_type="image/svg+xml", headers=SECURITY_HEADERS)

    async def _no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _serve_asset(self, request: web.Request) -> web.Response:
        name = request.path.rsplit("/", 1)[-1]
        return web.Response(text=_asset(name), content_type=ASSETS[name], headers=SECURITY_HEADERS)

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if not self.authenticated(request):
            return web.json_response({"error": "log in first"}, status=401)
        origin = request.headers.get("Origin")
        if origin and urlsplit(origin).netloc != request.host:
            logger.warning("live page: a WebSocket from another origin ({}) refused", origin)
            return web.json_response({"error": "wrong origin"}, status=403)
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        self._listen()
        ended = await self._ended_from_database()
        # From here to the registration nothing awaits: a transition committed after the snapshot was built
        # is in the next update, queued behind the snapshot on the same client's queue.
        client = _Client(ws, request.transport, self.send_timeout_s, self.queue_size)
        client.saw_started = self.service.started
        try:
            client.offer(self.snapshot(ended))
        except Exception as e:  # noqa: BLE001 - the page must never stop on one bad position
            logger.error("live page: the snapshot could not be built: {}: {}", type(e).__name__, e)
            await ws.close()
            return ws
        self.clients[ws] = client
        client.start()
        try:
            async for message in ws:  # the page sends nothing that matters; this waits for the close
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self.clients.pop(ws, None)
            client.abort()
        return ws


class _Client:
    """One browser: its messages in order on a bounded queue, sent by its own task, so that a slow browser
    delays nobody (not the pusher, not another browser, not the engine).

    A browser that is dropped is cut off (its transport aborted), never closed gracefully: a graceful close
    waits for the peer to take what is buffered, which a stuck browser never does (minutes, with aiohttp's
    defaults), and it shares the send's drain future, which cancelling the send leaves cancelled."""

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport | None, send_timeout_s: float,
                 queue_size: int) -> None:
        self.ws = ws
        self.transport = transport
        self.send_timeout_s = send_timeout_s
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self.task: asyncio.Task[None] | None = None
        self.saw_started = False  # its last snapshot was of a started service (else one follows the start)

    def offer(self, message: str) -> bool:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            return False
        return True

    def start(self) -> None:
        self.task = asyncio.create_task(self._send(), name="page client")

    async def _send(self) -> None:
        try:
            while True:
                message = await self.queue.get()
                await asyncio.wait_for(self.ws.send_str(message), self.send_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a browser gone or stuck: cut off; the page reconnects
            logger.info("live page: a browser that did not take an update is disconnected ({})", type(e).__name__)
            self.abort(cancel=False)

    def abort(self, *, cancel: bool = True) -> None:
        """Cut the connection off now (synchronous: nothing here can wait for the browser)."""
        if cancel and self.task is not None and not self.task.done():
            self.task.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


def _said_if_ended(task: asyncio.Task[None]) -> None:
    """The pusher and the status loop run until the page stops; one that ends otherwise is said."""
    if not task.cancelled() and task.exception() is not None:
        e = task.exception()
        logger.error("live page: {} ended: {}: {}; the page no longer updates", task.get_name(), type(e).__name__, e)


def _closure_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A closures-table row in the shape of a closure record (the page reads one shape)."""
    out: dict[str, Any] = {"event": "closure"}
    for key, value in row.items():
        out[key] = value.isoformat() if isinstance(value, datetime) else value
    if "pnl" not in out and "realized_pnl" in out:
        out["pnl"] = out["realized_pnl"]
    closed = row.get("closed_at")
    if isinstance(closed, datetime):
        out["at"] = (closed if closed.tzinfo else closed.replace(tzinfo=UTC)).isoformat()
    return out


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers=SECURITY_HEADERS)
