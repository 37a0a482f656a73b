"""The running service's control and status API (HTTP + JSON, aiohttp), and its Prometheus metrics.

Bound to 127.0.0.1 by default (a non-loopback host needs `allow_remote` in the configuration). Every
request must carry `Authorization: Bearer <token>`; the token comes from the environment or a file,
is compared in constant time and never logged. Routes:

    GET  /health                     streams, live positions and unsettled positions per account
    GET  /positions                  live positions with mark, stop and trailing state
    GET  /positions/{id}/journal     one position's journal (also after it ended)
    POST /positions                  open: {"symbol", "side", "quantity", optional "account", "entry_price",
                                     "stop_loss_pct", "trailing_activation", "trailing_callback_pct", "take_profit",
                                     "trailing": true (the configured trailing defaults)}
    POST /positions/{id}/close       close at market: optional {"reason"}
    GET  /metrics                    Prometheus text format

The live page (lifecycle.app.page) is served on the same port: `GET /` (a login form until the browser holds
the session cookie), `POST /session`, `GET /ws` (its WebSocket), `GET /diagram.svg`, `/assets/...`. The API
routes above also accept the page's session cookie; a write authenticated by the cookie must carry the header
`X-Lifecycle-Page: 1` (a cross-site form cannot).
"""
from __future__ import annotations

import hmac
import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from loguru import logger

from exchange.errors import ExchangeError
from exchange.secret import Secret
from lifecycle.app.garbage import GC_TIMES
from lifecycle.app.page import COOKIE, PAGE_HEADER, PUBLIC_PATHS, PageHub, position_json
from lifecycle.domain import CloseReason, Position, Side
from lifecycle.errors import (
    AccountStarting,
    EngineStopping,
    InvalidEvent,
    LifecycleError,
    PositionConflict,
    StorageUnavailable,
    UnknownPosition,
)
from lifecycle.live import UNPROTECTED_GRACE_S, OpenCommand
from lifecycle.machines.states import PositionState

if TYPE_CHECKING:  # types of the parts the API reads; none of them imports the service
    from db.repository import Repository
    from exchange.port import StreamHealth
    from lifecycle.engine import Engine
    from lifecycle.live import LiveEngine
    from lifecycle.records import JsonlRecords
    from scheduler.jobs import ReconciliationScheduler


OPERATOR_REASONS = (CloseReason.SIGNAL, CloseReason.TAKE_PROFIT, CloseReason.MAX_AGE, CloseReason.OPERATOR)


class ClosureStats:
    """Closures seen since start (a records listener): counts by state and cause, detection latencies."""

    def __init__(self, keep: int = 10_000) -> None:
        self.by_outcome: Counter[tuple[str, str, str]] = Counter()  # (account, state, cause)
        self.latencies_ms: list[float] = []
        self.keep = keep

    def __call__(self, record: dict[str, Any]) -> None:
        if record.get("event") != "closure":
            return
        self.by_outcome[(str(record.get("account")), str(record.get("state")), str(record.get("cause")))] += 1
        latency = record.get("detection_latency_ms")
        if isinstance(latency, (int, float)):
            self.latencies_ms.append(float(latency))
            del self.latencies_ms[:-self.keep]


# --- what the API needs of the service -------------------------------------------------------------------
# The API depends on these protocols, not on lifecycle.app.service: the service imports the API and passes itself
# (`ControlApi(self, ...)`), so the import runs one way. Read-only properties: a plain attribute satisfies one.


class StreamCounters(Protocol):
    """An account's exchange client as the API reads it: stream health and counters."""

    @property
    def health(self) -> Mapping[str, StreamHealth]: ...
    @property
    def reconnects(self) -> Mapping[str, int]: ...
    @property
    def dropped_frames(self) -> Mapping[str, int]: ...


class AccountView(Protocol):
    """One account's runtime (lifecycle.app.service.AccountRuntime)."""

    @property
    def exchange(self) -> StreamCounters: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def live(self) -> LiveEngine | None: ...
    @property
    def scheduler(self) -> ReconciliationScheduler | None: ...


class TrailingDefaults(Protocol):
    """The configured defaults of an open command asking for a trailing stop (lifecycle.app.service.ServiceConfig)."""

    @property
    def trailing_activation_pct(self) -> Decimal: ...
    @property
    def trailing_callback_pct(self) -> Decimal: ...


class ServiceView(Protocol):
    """The running service (lifecycle.app.service.Service) as the control API and the metrics read it."""

    @property
    def started(self) -> bool: ...
    @property
    def accounts(self) -> Mapping[str, AccountView]: ...
    @property
    def config(self) -> TrailingDefaults: ...
    @property
    def repo(self) -> Repository | None: ...
    @property
    def records(self) -> JsonlRecords | None: ...
    @property
    def closures(self) -> ClosureStats: ...
    @property
    def instance(self) -> str | None: ...  # the process's name among several on one database (None: alone)
    def lease_problems(self) -> list[str]: ...  # why this process may soon stop acting on its accounts
    def lease_stats(self) -> dict[str, int] | None: ...  # None: not one of several processes


class ControlApi:
    def __init__(self, service: ServiceView, token: Secret, host: str = "127.0.0.1", port: int = 8780) -> None:
        if not token:
            raise ValueError("the control API needs a token")
        self.service = service
        self.token = token
        self.host = host
        self.port = port
        self.started = time.monotonic()
        self._runner: web.AppRunner | None = None
        self.page = PageHub(service, token)

    async def start(self) -> ControlApi:
        """Listen on host:port. aiohttp's own log records (a request its parser refuses quotes the refused
        bytes, which may hold the token) go to the service's log through `http_logger`: by kind only."""
        from lifecycle.app.http_log import http_logger

        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/health", self._health)
        app.router.add_get("/positions", self._positions)
        app.router.add_get("/positions/{id}/journal", self._journal)
        app.router.add_post("/positions", self._open)
        app.router.add_post("/positions/{id}/close", self._close)
        app.router.add_get("/metrics", self._metrics)
        self.page.add_routes(app)
        # shutdown_timeout: a stop waits this long at most for requests in flight (aiohttp's default, 60 s,
        # would outlast systemd's TimeoutStopSec with a browser that stopped reading).
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0,
                               logger=http_logger("lifecycle.app.api.http", [self.token.reveal()]))
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.page.start()
        sockets = getattr(site._server, "sockets", None) or []  # the real port when 0 was asked for
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self.page.cookie_name = f"{COOKIE}_{self.port}"
        logger.info("control API and live page on {} (token required)", self.url)
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def stop(self) -> None:
        await self.page.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS or request.path.startswith("/assets/"):
            return await handler(request)  # the login form and its assets; the page checks its own session
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {self.token.reveal()}"
        try:
            given_bytes = given.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in the header: not our token
            given_bytes = b""
        by_bearer = hmac.compare_digest(given_bytes, expected.encode("utf-8"))
        by_cookie = not by_bearer and self.page.authenticated(request)
        if not by_bearer and not by_cookie:
            logger.warning("control API: refused {} {} from {} (missing or wrong token)", request.method,
                           request.path, request.remote)
            return _error(401, "missing or wrong token")
        if by_cookie and request.method not in ("GET", "HEAD") and request.headers.get(PAGE_HEADER) != "1":
            logger.warning("control API: refused {} {} from {} (session cookie without the page's header)",
                           request.method, request.path, request.remote)
            return _error(403, f"a write with the session cookie needs the header {PAGE_HEADER}: 1")
        if request.path in ("/ws", "/diagram.svg"):
            return await handler(request)  # the page shows a service that is starting
        if not self.service.started and request.path != "/health":
            return _error(503, "the service is starting")
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except ExchangeError as e:  # already scrubbed of keys and signatures by the adapter
            return _error(502, f"the exchange refused or failed: {e}")
        except (EngineStopping, StorageUnavailable, AccountStarting) as e:
            return _error(503, str(e))
        except PositionConflict as e:
            return _error(409, str(e))
        except UnknownPosition as e:
            return _error(404, str(e))
        except KeyError as e:
            return _error(400, f"{e.args[0] if e.args else 'a field'} is required")
        except (InvalidEvent, ValueError) as e:
            return _error(400, str(e) or type(e).__name__)
        except (InvalidOperation, TypeError) as e:
            return _error(400, f"{type(e).__name__}: {e}")
        except LifecycleError as e:
            return _error(409, str(e))

    # --- routes -------------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        """`ok` only while nothing is wrong; else `degraded` with every reason (storage failing, records not
        written, a position unprotected, a stream not healthy or doubted, the key refused)."""
        accounts: dict[str, dict[str, Any]] = {}
        for name, runtime in self.service.accounts.items():
            live = runtime.live
            reasons = live.health_reasons() if live is not None else ["not started"]
            accounts[name] = {
                "status": "degraded" if reasons else "ok",
                "reasons": reasons,
                "streams_healthy": bool(live and live.stream_healthy()),
                "streams": {k: v.value for k, v in runtime.exchange.health.items()},
                "live_positions": sum(1 for p in runtime.engine.positions.values() if p.account == name),
                "unprotected": len(live.unprotected_longer_than(UNPROTECTED_GRACE_S)) if live is not None else 0,
                "storage_backlog": runtime.engine.books.behind,
                "unsettled": bool(live and live.unsettled()),  # a resync left positions to settle
            }
        reasons = [f"{name}: {r}" for name, a in accounts.items() for r in a["reasons"]]
        reasons += self.service.lease_problems()
        if not self.service.started:
            reasons.insert(0, "starting")
        return web.json_response({"status": "degraded" if reasons else "ok", "reasons": reasons,
                                  "instance": self.service.instance,
                                  "accounts": accounts, "uptime_s": round(time.monotonic() - self.started, 1)})

    async def _positions(self, request: web.Request) -> web.Response:
        out = []
        for runtime in self.service.accounts.values():
            for p in runtime.engine.positions.values():
                out.append(_position_json(p, runtime.live.marks.get(p.symbol) if runtime.live else None))
        return web.json_response(out, dumps=_dumps)

    async def _journal(self, request: web.Request) -> web.Response:
        assert self.service.repo is not None
        position_id = request.match_info["id"]
        # Not a position id (ours are short, printable ASCII): no journal, without asking the database (a NUL
        # is a PostgreSQL error, not a miss).
        entries = await self.service.repo.journal(position_id) if _plausible_id(position_id) else []
        if not entries:
            return _error(404, f"no journal for position {position_id[:64]}")
        return web.json_response([{
            "seq": e.seq, "at": e.at.isoformat(), "event": e.event, "source": e.source.value if e.source else None,
            "dest": e.dest.value, "cause": e.cause, "payload": e.payload,
        } for e in entries], dumps=_dumps)

    async def _open(self, request: web.Request) -> web.Response:
        body = await _body(request)
        runtime = self._account(body.get("account"))
        if runtime.live is None:
            raise _starting(next(n for n, r in self.service.accounts.items() if r is runtime))

        def dec(name: str) -> Decimal | None:
            return _decimal(name, body[name]) if body.get(name) is not None else None

        symbol, side = str(body["symbol"]), _side(body["side"])
        activation, callback = dec("trailing_activation"), dec("trailing_callback_pct")
        trailing = _flag("trailing", body.get("trailing"))
        if trailing and activation is None:  # the configured defaults, from the mark
            mark = runtime.live.marks.get(symbol)
            if mark is None:
                raise ValueError(f"no mark price for {symbol} yet; give trailing_activation")
            step = self.service.config.trailing_activation_pct / 100
            activation = mark * (1 + step if side is Side.LONG else 1 - step)
        if (trailing or activation is not None) and callback is None:
            callback = self.service.config.trailing_callback_pct
        if body.get("quantity") is None:
            raise ValueError("quantity is required")
        quantity = _decimal("quantity", body["quantity"])
        if quantity <= 0:
            raise ValueError(f"quantity must be positive, got {quantity}")
        command = OpenCommand(symbol, side, quantity, entry_price=dec("entry_price"),
                              stop_loss_pct=dec("stop_loss_pct"), trailing_activation=activation,
                              trailing_callback_pct=callback, take_profit=dec("take_profit"))
        logger.info("control API: open {} {} {}", command.symbol, command.side.value, command.quantity)
        position = await runtime.live.open(command)
        return web.json_response(_position_json(position, runtime.live.marks.get(position.symbol)), status=201,
                                 dumps=_dumps)

    async def _close(self, request: web.Request) -> web.Response:
        body = await _body(request) if request.can_read_body else {}
        reason = CloseReason(str(body.get("reason", CloseReason.OPERATOR.value)))
        if reason not in OPERATOR_REASONS:
            raise ValueError(f"reason must be one of {', '.join(r.value for r in OPERATOR_REASONS)}")
        position_id = request.match_info["id"]
        for name, runtime in self.service.accounts.items():
            if position_id in runtime.engine.positions:
                if runtime.live is None:
                    raise _starting(name)
                logger.info("control API: close {} ({})", position_id, reason.value)
                accepted = await runtime.live.close(position_id, reason)
                return web.json_response({"position_id": position_id, "accepted": accepted})
        raise UnknownPosition(f"no live position {position_id}")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=metrics_text(self.service), content_type="text/plain")

    def _account(self, name: Any) -> AccountView:
        if name is None:
            if len(self.service.accounts) != 1:
                raise ValueError(f"give an account: one of {sorted(self.service.accounts)}")
            return next(iter(self.service.accounts.values()))
        if name not in self.service.accounts:
            raise ValueError(f"unknown account {name!r}; one of {sorted(self.service.accounts)}")
        return self.service.accounts[name]


def _starting(account: str) -> AccountStarting:
    """An account just started or taken over is listed before its live engine runs (its positions are being
    loaded): a command for it is refused with 503, not failed with 500 (CI, test_scale_out, a takeover)."""
    return AccountStarting(f"{account}: the account is starting (its positions are being loaded); nothing sent; "
                           "retry shortly")


def metrics_text(service: ServiceView) -> str:
    """Prometheus text exposition of the service's counters and gauges."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: Sequence[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")

    states: list[tuple[dict[str, str], float]] = []
    moves, failures, unprotected, reconnects, healthy, sync_runs, sync_ms = [], [], [], [], [], [], []
    degraded: list[tuple[dict[str, str], float]] = []
    unprotected_now: list[tuple[dict[str, str], float]] = []
    repairs: list[tuple[dict[str, str], float]] = []
    sources: list[tuple[dict[str, str], float]] = []
    amended: list[tuple[dict[str, str], float]] = []
    backlog: list[tuple[dict[str, str], float]] = []
    dropped: list[tuple[dict[str, str], float]] = []
    storage_failures: list[tuple[dict[str, str], float]] = []
    for name, runtime in service.accounts.items():
        counts = Counter(p.state for p in runtime.engine.positions.values() if p.account == name)
        states += [({"account": name, "state": s.value}, counts.get(s, 0)) for s in PositionState if not s.is_terminal]
        live = runtime.live
        if live is not None:
            moves.append(({"account": name}, live.stats.stop_moves))
            failures.append(({"account": name}, live.stats.stop_move_failures))
            unprotected.append(({"account": name}, round(live.stats.unprotected_ms.total, 3)))
            reasons = live.health_reasons()
            degraded.append(({"account": name}, 1 if reasons else 0))
            unprotected_now.append(({"account": name}, len(live.unprotected_longer_than(UNPROTECTED_GRACE_S))))
            repairs += [({"account": name, "repair": k}, n) for k, n in sorted(live.stats.protection_repairs.items())]
            sources += [({"account": name, "source": k}, n) for k, n in sorted(live.stats.cause_sources.items())]
            amended.append(({"account": name}, live.stats.closures_amended))
        books = runtime.engine.books
        backlog.append(({"account": name}, books.behind))
        storage_failures.append(({"account": name}, books.stats.failures))
        for stream, count in runtime.exchange.reconnects.items():
            reconnects.append(({"account": name, "stream": stream}, count))
        for reason, count in sorted(runtime.exchange.dropped_frames.items()):
            dropped.append(({"account": name, "reason": reason}, count))
        for stream, health in runtime.exchange.health.items():
            healthy.append(({"account": name, "stream": stream}, 1 if health.value == "healthy" else 0))
        if runtime.scheduler is not None:
            stats = runtime.scheduler.stats
            for (job, outcome), n in stats.runs.items():
                sync_runs.append(({"account": name, "job": job, "outcome": outcome}, n))
            for job, total in stats.total_duration_ms.items():
                sync_ms.append(({"account": name, "job": job}, round(total, 3)))
    metric("lifecycle_positions", "gauge", "Live positions by state.", states)
    metric("lifecycle_stop_moves_total", "counter", "Stop placements and moves confirmed by the exchange.", moves)
    metric("lifecycle_stop_move_failures_total", "counter", "Stop placements or moves that failed.", failures)
    metric("lifecycle_unprotected_window_ms_total", "counter",
           "Milliseconds without a stop during cancel-then-place moves (venues refusing a second stop).", unprotected)
    metric("lifecycle_degraded", "gauge", "1 while /health is degraded for the account (see its reasons).", degraded)
    metric("lifecycle_unprotected_positions", "gauge",
           "Positions holding exposure with no working stop of ours known.", unprotected_now)
    metric("lifecycle_protection_repairs_total", "counter", "Repairs made by the protection audit, by kind.",
           repairs)
    metric("lifecycle_storage_backlog", "gauge", "Writes waiting for the database (it failed or was slow).",
           backlog)
    metric("lifecycle_storage_failures_total", "counter", "Failed or timed-out database writes.", storage_failures)
    metric("lifecycle_closure_cause_sources_total", "counter",
           "Where closure causes came from: fill_update, algo_update, rest, none, state.", sources)
    metric("lifecycle_closures_amended_total", "counter", "Unknown closure causes explained by a late fill.",
           amended)
    batches = service.repo.batch_stats if service.repo is not None else None
    metric("lifecycle_commit_transactions_total", "counter",
           "Database transactions that committed transitions and order rows (group commit: several per transaction).",
           [({}, batches.batches if batches else 0)])
    metric("lifecycle_commit_transitions_total", "counter", "Transitions written through those transactions.",
           [({}, batches.members if batches else 0)])
    metric("lifecycle_commit_order_rows_total", "counter", "Order rows written through those transactions.",
           [({}, batches.order_rows if batches else 0)])
    metric("lifecycle_commit_batch_largest", "gauge",
           "The most writes (transitions and order rows) committed in one transaction.",
           [({}, batches.largest if batches else 0)])
    generations = range(3)
    metric("lifecycle_gc_collections_total", "counter", "Garbage collections by generation (0: young).",
           [({"generation": str(g)}, GC_TIMES.collections[g]) for g in generations])
    metric("lifecycle_gc_pause_ms_total", "counter", "Milliseconds the process stood still in those collections.",
           [({"generation": str(g)}, round(GC_TIMES.ms[g], 3)) for g in generations])
    metric("lifecycle_gc_quiet_collections_total", "counter",
           "Of those, collections made while the event loop was idle (lifecycle/app/garbage.py).",
           [({"generation": str(g)}, GC_TIMES.quiet[g]) for g in generations])
    metric("lifecycle_gc_pause_ms_longest", "gauge", "The longest collection since start, milliseconds.",
           [({}, round(GC_TIMES.longest_ms, 3))])
    records = service.records
    metric("lifecycle_records_failing", "gauge", "1 while records cannot be written.",
           [({}, 1 if records is not None and records.failing else 0)])
    metric("lifecycle_records_pending", "gauge", "Record lines waiting to be written.",
           [({}, records.pending if records is not None else 0)])
    metric("lifecycle_stream_reconnects_total", "counter", "Stream reconnections.", reconnects)
    metric("lifecycle_stream_dropped_frames_total", "counter",
           "Stream frames dropped, by reason (not_json, unknown_event, unknown_symbol, missing_field, ...).", dropped)
    metric("lifecycle_stream_healthy", "gauge", "1 when the stream is subscribed and live.", healthy)
    metric("lifecycle_job_runs_total", "counter", "Scheduled job runs by outcome.", sync_runs)
    metric("lifecycle_job_duration_ms_total", "counter", "Time spent in scheduled jobs.", sync_ms)
    closures = service.closures
    metric("lifecycle_closures_total", "counter", "Terminal states reached since start, by cause.",
           [({"account": a, "state": s, "cause": c}, n) for (a, s, c), n in sorted(closures.by_outcome.items())])
    ordered = sorted(closures.latencies_ms)
    quantiles = [({"quantile": str(q)}, ordered[min(len(ordered) - 1, int(q * len(ordered)))]) for q in (0.5, 0.99)] \
        if ordered else []
    metric("lifecycle_closure_detection_latency_ms", "summary",
           "From the exchange's event time to the terminal state committed.",
           quantiles)
    lines.append(f"lifecycle_closure_detection_latency_ms_sum {round(sum(ordered), 3)}")
    lines.append(f"lifecycle_closure_detection_latency_ms_count {len(ordered)}")
    leases = service.lease_stats()
    if leases is not None:  # one of several processes on PostgreSQL: who it is and what it holds
        me = {"instance": service.instance or ""}
        metric("lifecycle_instance_info", "gauge", "This process's name among the processes of one database.",
               [(me, 1)])
        metric("lifecycle_leases_held", "gauge", "Account leases this process holds.", [(me, leases["held"])])
        for key, help_ in (("acquired", "Account leases taken (at start, from a dead or departed process)."),
                           ("lost", "Accounts this process stopped acting on because its lease ran out or was taken."),
                           ("handed_over", "Accounts handed over (SIGTERM, rebalancing, release requests)."),
                           ("renew_failures", "Lease renewals that failed.")):
            metric(f"lifecycle_leases_{key}_total", "counter", help_, [(me, leases[key])])
    return "\n".join(lines) + "\n"


def _position_json(p: Position, mark: Decimal | None) -> dict[str, Any]:
    return position_json(p, mark)


def _plausible_id(value: str) -> bool:
    return 0 < len(value) <= 64 and value.isascii() and value.isprintable()


def _side(value: Any) -> Side:
    """long/short, or buy/sell as a trader may say it."""
    side = Side.from_word(str(value))
    if side is None:
        raise ValueError(f"side must be long or short (buy or sell), got {str(value)[:20]!r}")
    return side


def _decimal(name: str, value: Any) -> Decimal:
    """A number from a request body, or a ValueError that names the field and the value."""
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{name} must be a number, got {str(value)[:40]!r}") from None
    if not number.is_finite():
        raise ValueError(f"{name} must be a finite number, got {str(value)[:40]!r}")
    return number


def _flag(name: str, value: Any) -> bool:
    """A JSON true or false (absent or null: false); anything else is refused: the text "false" is not false,
    and an open with a trailing stop nobody asked for is a real order."""
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {json.dumps(value, default=str)[:40]}")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except json.JSONDecodeError as e:
        raise ValueError(f"the body is not JSON: {e.msg}") from None
    except RecursionError:  # thousands of nested brackets: the parser gives up
        raise ValueError("the body is not JSON this service reads: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
