"""The `lifecycle` command line."""
from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from loguru import logger

if TYPE_CHECKING:  # at run time the commands import it where they use it
    from lifecycle.app.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="position-lifecycle: positions as state machines.")

DEFAULT_DIAGRAMS = Path("diagrams")
T = TypeVar("T")


def _configure_logging(verbose: bool, log_dir: Path | None = None, retention_days: int = 14,
                       instance: str | None = None) -> None:
    """Readable lines on stderr; with `log_dir`, also `lifecycle.log` there, rotated daily and kept
    `retention_days` days (older files deleted). `instance`: one of several processes on one database, named
    on every line."""
    logger.remove()
    who = f"[{instance.replace('{', '{{').replace('}', '}}')}] " if instance else ""
    logger.add(sys.stderr, level="DEBUG" if verbose else "INFO",
               format=f"{{time:HH:mm:ss.SSS}} {{level:<7}} {who}{{message}}")
    if log_dir is not None:
        logger.add(log_dir / "lifecycle.log", level="DEBUG" if verbose else "INFO", rotation="00:00",
                   retention=f"{retention_days} days", enqueue=False,
                   format=f"{{time:YYYY-MM-DD HH:mm:ss.SSS!UTC}}Z {{level:<7}} {who}{{message}}")


ConfigOption = Annotated[Path | None, typer.Option(
    "--config", "-c", envvar="LIFECYCLE_CONFIG",
    help="The TOML configuration file. Without it: the file LIFECYCLE_CONFIG names, else ./lifecycle.toml "
         "(`lifecycle init` writes one).")]
LOCAL_CONFIG = Path("lifecycle.toml")  # looked for in the working directory
NO_CONFIG = ("error: no configuration found: give -c FILE, set LIFECYCLE_CONFIG=FILE, or create ./lifecycle.toml "
             "(`lifecycle init`, or `lifecycle init --sim` for the bundled simulator)")


def _config_path(config: Path | None) -> Path | None:
    """The file to read: -c, else LIFECYCLE_CONFIG (typer fills `config` from it), else ./lifecycle.toml. The
    variable wins over the working directory: a deployment names its file (deploy/lifecycle.service), and a
    lifecycle.toml lying in the directory it runs in must not replace it. None: the environment alone
    configures the service (LIFECYCLE_ACCOUNTS set); without that either it is one line and exit 2."""
    import os

    if config is not None:
        return config
    if LOCAL_CONFIG.is_file():
        return LOCAL_CONFIG
    if any(name.upper() == "LIFECYCLE_ACCOUNTS" for name in os.environ):
        return None
    _say_error(NO_CONFIG)
    raise typer.Exit(2)


def _settings(config: Path | None, *, check_secrets: bool = True) -> Settings:
    from lifecycle.app.settings import ConfigError, load

    path = _config_path(config)
    try:
        return load(path, check_secrets=check_secrets)
    except ConfigError as e:
        typer.echo(f"configuration error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write it.")] = LOCAL_CONFIG,
    sim: Annotated[bool, typer.Option("--sim", help="For the bundled simulator (`python -m exchange.sim`) instead "
                                                    "of Binance's futures testnet.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented configuration to start from (default ./lifecycle.toml, where `run` looks for it)."""
    from lifecycle.app import starter

    if path.exists() and not force:
        _say_error(f"error: {path} exists; give --force to overwrite it")
        raise typer.Exit(1)
    try:
        path.write_text(starter.config_text(sim=sim), encoding="utf-8")
    except OSError as e:
        _say_error(f"error: cannot write {path}: {e.strerror}")
        raise typer.Exit(1) from None
    where = "" if path == LOCAL_CONFIG else f" -c {path}"
    typer.echo(f"wrote {path} ({'the bundled simulator' if sim else 'Binance futures testnet'}); every key is "
               "explained in its comments")
    if sim:
        keys = f"{starter.SIM_KEY_ENV}=sim-key {starter.SIM_SECRET_ENV}=sim-secret"
        typer.echo(f"next, in one terminal: export {keys}; python -m exchange.sim")
        typer.echo(f"and in another:        export {keys} {starter.TOKEN_ENV}=<any long random string>; "
                   f"lifecycle run{where}")
    else:
        typer.echo(f"next: export {starter.TESTNET_KEY_ENV}=... {starter.TESTNET_SECRET_ENV}=... "
                   f"{starter.TOKEN_ENV}=<any long random string>; lifecycle run{where}")


@app.command()
def run(config: ConfigOption = None, verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Run the service for the configured accounts until SIGINT/SIGTERM."""
    from dataclasses import replace

    from lifecycle.app.leases import ClusterConfig
    from lifecycle.app.service import Service, StartError, check_database, default_instance, take_sqlite_lock
    from lifecycle.app.settings import service_config

    settings = _settings(config)
    try:
        # A second service on this SQLite file stops here: before it migrates the database or writes a line
        # into the running one's log.
        lock = take_sqlite_lock(settings.database_url)
        service_settings = service_config(settings)
        if lock is None and service_settings.cluster is None:  # PostgreSQL: one of possibly several processes,
            service_settings = replace(service_settings, cluster=ClusterConfig(default_instance()))  # named
        service = Service(service_settings, sqlite_lock=lock)
        _run(check_database(settings.database_url))  # before anything else starts (or logs)
        instance = service_settings.cluster.instance if service_settings.cluster is not None else None
        _configure_logging(verbose, settings.log_dir, settings.log_retention_days, instance)
        asyncio.run(service.run())
    except StartError as e:
        _say_error(f"error: {e}")
        raise typer.Exit(2) from None


def _say_error(text: str) -> None:
    """One line on stderr; a stderr that cannot be written (a full disk under a redirected log) must not turn
    a clear refusal into a traceback (chaos soak seed 503700): the exit code still says it."""
    try:
        typer.echo(text, err=True)
    except OSError:
        pass


def _api_call(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None) -> object:
    import json
    import urllib.error
    import urllib.request

    if not settings.api.enabled:
        typer.echo("error: the control API is disabled in the configuration (api.enabled)", err=True)
        raise typer.Exit(2)
    from lifecycle.app.settings import ConfigError

    try:
        token = settings.api_token().reveal()
    except ConfigError as e:
        typer.echo(f"configuration error: {e}", err=True)
        raise typer.Exit(2) from None
    request = urllib.request.Request(
        f"{_base_url(settings)}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            message = e.reason
        typer.echo(f"error: the service answered {e.code}: {message}", err=True)
        raise typer.Exit(1) from None
    except (urllib.error.URLError, OSError) as e:
        typer.echo(f"error: no service answers on {settings.api.host}:{settings.api.port} ({e})", err=True)
        raise typer.Exit(1) from None


def _refuse(text: str) -> typer.Exit:
    """One line on stderr; the exit (2: the command line is wrong) for the caller to raise."""
    _say_error(f"error: {text}")
    return typer.Exit(2)


def _number(name: str, value: str | None, *, percent: bool = False) -> Decimal | None:
    """`value` as a positive finite number (a percentage: in (0, 100)), or one line naming `name` and exit 2."""
    from decimal import InvalidOperation

    if value is None:
        return None
    try:
        number = Decimal(value.strip())
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite():
        raise _refuse(f"{name} must be a number, got {value!r}")
    if number <= 0:
        raise _refuse(f"{name} must be positive, got {value}")
    if percent and number >= 100:
        raise _refuse(f"{name} is a percentage: it must be below 100, got {value}")
    return number


# Negative-looking values ("-0.1") reach the checks below instead of being taken for unknown options.
@app.command("open", context_settings={"ignore_unknown_options": True})
def open_(
    symbol: Annotated[str, typer.Argument(help="The exchange's symbol, e.g. BTCUSDT.")],
    side: Annotated[str, typer.Argument(help="long or short (buy and sell mean the same).")],
    quantity: Annotated[str, typer.Argument(help="The size in the base asset, e.g. 0.01 (BTC).")],
    config: ConfigOption = None,
    account: Annotated[str | None, typer.Option(help="Needed when several accounts are configured.")] = None,
    entry_price: Annotated[str | None, typer.Option(help="A limit entry at this price (default: market).")] = None,
    stop_loss_pct: Annotated[str | None, typer.Option(help="Initial stop distance from the entry, percent.")] = None,
    trailing_activation: Annotated[str | None, typer.Option(help="Price that activates the trailing stop.")] = None,
    trailing_callback_pct: Annotated[str | None, typer.Option(help="Trailing distance, percent.")] = None,
    take_profit: Annotated[str | None, typer.Option(help="A reduce-only take-profit at this price.")] = None,
    trailing: Annotated[bool, typer.Option("--trailing", help="A trailing stop with the configured defaults.")] = False,
) -> None:
    """Ask the running service to open a position (side: long or short; buy and sell mean the same)."""
    import json

    from lifecycle.domain import Side

    # Checked here, before the configuration is read or the service is asked.
    for word in (symbol, side, quantity):
        if word.startswith("--"):  # a mistyped option, taken for an argument (unknown options are let through)
            raise _refuse(f"no such option: {word.split('=', 1)[0]}")
    chosen = Side.from_word(side)
    if chosen is None:
        raise _refuse(f"side must be one of long, short, buy, sell (buy is long, sell is short), got {side!r}")
    size = _number("quantity", quantity)
    prices = {key: _number(f"--{key.replace('_', '-')}", value) for key, value in (
        ("entry_price", entry_price), ("trailing_activation", trailing_activation), ("take_profit", take_profit))}
    percents = {key: _number(f"--{key.replace('_', '-')}", value, percent=True) for key, value in (
        ("stop_loss_pct", stop_loss_pct), ("trailing_callback_pct", trailing_callback_pct))}
    body = {"symbol": symbol, "side": chosen.value, "quantity": size,
            "account": account, **prices, **percents, "trailing": trailing or None}
    answer = _api_call(_settings(config, check_secrets=False), "POST", "/positions",
                       {k: str(v) if isinstance(v, Decimal) else v for k, v in body.items() if v is not None})
    typer.echo(json.dumps(answer, indent=2))


@app.command()
def close(
    position_id: str, config: ConfigOption = None,
    reason: Annotated[str, typer.Option(help="signal, take_profit, max_age or operator.")] = "operator",
) -> None:
    """Ask the running service to close a position at market."""
    import json

    answer = _api_call(_settings(config, check_secrets=False), "POST", f"/positions/{position_id}/close",
                       {"reason": reason})
    typer.echo(json.dumps(answer))


@app.command()
def status(
    config: ConfigOption = None,
    db: Annotated[str | None, typer.Option(help="Database URL (instead of the configuration's).")] = None,
    ended: Annotated[int, typer.Option(min=0, help="Also show this many most recently ended positions.")] = 0,
) -> None:
    """A table of positions from the database (marks from the running service when it answers)."""
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.table import Table

    from db.repository import Repository

    settings = _settings(config, check_secrets=False) if db is None else None
    url = db or settings.database_url  # type: ignore[union-attr]
    _existing_sqlite_file(url)

    async def go() -> tuple[list, list, dict[str, dict[str, Any]]]:
        repo = await Repository.open(url, run_migrations=False)
        try:
            positions = await repo.list_positions()
            done = sorted((p for p in positions if p.state.is_terminal),
                          key=lambda p: p.updated_at)[-ended:] if ended else []
            closures = {}  # how each ended position shown ended: cause, exit price, PnL
            for p in done:
                closure = await repo.closure(p.id)
                if closure is not None:
                    closures[p.id] = closure
            return positions, done, closures
        finally:
            await repo.close()

    positions, done, closures = _with_database(url, go, source=None if db else "database_url")
    live = [p for p in positions if not p.state.is_terminal]
    marks: dict[str, object] = {}
    if settings is not None and settings.api.enabled and live:
        try:
            marks = {p["id"]: p.get("mark") for p in _quiet_api(settings, "/positions")}
        except Exception:  # noqa: BLE001 - the service may not run; the table comes from the database anyway
            marks = {}
    now = datetime.now(UTC)
    table = Table(title=f"positions ({len(live)} live)")
    for column in ("position", "account", "symbol", "state", "side", "size", "entry", "mark", "stop", "trailing",
                   "age", *(("exit", "net PnL", "cause") if ended else ())):
        table.add_column(column)
    for p in [*live, *done]:
        trailing = "-" if p.trailing is None else (
            f"active, high {p.trailing.watermark}" if p.trailing.active else f"at {p.trailing.activation_price}")
        age = int(((p.updated_at if p.state.is_terminal else now) - p.created_at).total_seconds())  # ended: lifetime
        ending: tuple[str, ...] = ()
        if ended:
            c = closures.get(p.id) or {}
            ending = (_shown(c.get("exit_price", p.exit_price)), _signed(c.get("net_pnl")),
                      str(c.get("cause") or (p.close_cause.value if p.close_cause else "-"))) \
                if p.state.is_terminal else ("-", "-", "-")
        table.add_row(p.id, p.account, p.symbol, p.state.value, p.side.value, str(p.quantity),
                      str(p.entry_price or "-"), str(marks.get(p.id) or "-"), str(p.stop_price or "-"), trailing,
                      f"{age // 3600}h{age % 3600 // 60:02d}m" if age >= 3600 else f"{age // 60}m{age % 60:02d}s",
                      *ending)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if not positions:
        typer.echo("no positions in the database")


def _shown(value: object) -> str:
    """A price or size for a table: its digits as the venue gave them, "-" when unknown."""
    return "-" if value is None else str(value)


def _signed(value: Decimal | None, places: int = 4) -> str:
    """A PnL for a table: signed, at most `places` decimals (a fee has eight), "-" when unknown."""
    return "-" if value is None else f"{round(value, places).normalize():+f}"


def _existing_sqlite_file(url: str) -> None:
    """Reading commands never create a SQLite file: a missing one is exit 2 naming it."""
    if url.startswith("sqlite") and "///" in url and not Path(url.split("///", 1)[1]).exists():
        typer.echo(f"error: no database file at {url.split('///', 1)[1]}", err=True)
        raise typer.Exit(2)


def _with_database(url: str, work: Callable[[], Coroutine[Any, Any, T]], *, source: str | None) -> T:
    """Run `work` (which opens the database at `url`); a database that cannot be used (a bad URL, an
    unreachable server, a refused login, a file that cannot be created) is one line on stderr naming the
    database, password hidden, and exit 2 as for any start error, never a traceback. `source` is the
    configuration key the URL came from (None: the command line's own --db)."""
    import sqlalchemy.exc
    from asyncpg import InterfaceError, PostgresError

    from db.engine import DatabaseConfigError, open_error

    prefix = f"{source}: " if source else ""
    try:
        return _run(work())
    except DatabaseConfigError as e:
        typer.echo(f"error: {prefix}{e}", err=True)
        raise typer.Exit(2) from None
    except (OSError, sqlalchemy.exc.SQLAlchemyError, PostgresError, InterfaceError) as e:
        typer.echo(f"error: {prefix}{open_error(url, e)}", err=True)
        raise typer.Exit(2) from None


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, then a wait for aiosqlite's worker threads while the loop is still open.

    After a failed connect aiosqlite 0.22 stops its worker thread without waiting for it, and the thread's
    answer to a loop that asyncio.run has closed meanwhile prints a traceback on stderr ("Event loop is
    closed", omnilib/aiosqlite#241): a one-line error would come out as a traceback now and then."""

    async def main() -> T:
        try:
            return await coroutine
        finally:
            deadline = time.monotonic() + 5
            for thread in threading.enumerate():
                if thread.name.endswith("(_connection_worker_thread)"):  # Thread's default name shows the target
                    await asyncio.to_thread(thread.join, max(0.0, deadline - time.monotonic()))

    return asyncio.run(main())


def _base_url(settings: Settings) -> str:
    host = settings.api.host
    return f"http://[{host}]:{settings.api.port}" if ":" in host else f"http://{host}:{settings.api.port}"


def _quiet_api(settings: Settings, path: str) -> list[Any]:
    import json
    import urllib.request

    request = urllib.request.Request(f"{_base_url(settings)}{path}",
                                     headers={"Authorization": f"Bearer {settings.api_token().reveal()}"})
    with urllib.request.urlopen(request, timeout=2) as answer:
        return json.loads(answer.read())


@app.command()
def diagrams(
    out: Annotated[Path, typer.Option(
        help="Directory for position.mmd, position.dot, transitions.md.")] = DEFAULT_DIAGRAMS,
    check: Annotated[bool, typer.Option("--check", help="Write nothing; exit 1 if the files are stale.")] = False,
) -> None:
    """Generate the state diagrams and the transition table from the code."""
    from lifecycle.machines.diagrams import stale, write_all

    if check:
        bad = stale(out)
        if bad:
            typer.echo(f"stale in {out}: {', '.join(bad)}; run `lifecycle diagrams`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{out}: up to date")
        return
    for path in write_all(out):
        typer.echo(f"wrote {path}")


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Where the SQLite file, records and logs go (default: a new temp directory).")
    ] = None,
    forever: Annotated[bool, typer.Option("--forever", help="After the scenario, keep a random-walk market with "
                                                            "trailing positions running until Ctrl-C.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log lines on the terminal too.")] = False,
    port: Annotated[int, typer.Option(min=0, max=65535, help="The live page's port on 127.0.0.1 (a free one if "
                                                               "taken; 0: any free port).")] = 8780,
    page: Annotated[bool, typer.Option("--page/--no-page", help="Serve the live page while the demo runs.")] = True,
) -> None:
    """The service on the embedded simulator: every ending once, live, then a summary (about a minute).
    The live page is served meanwhile; its address (and a token for this run) is printed first."""
    import os

    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from lifecycle.app.demo import COLUMNS, run_demo

    directory = workdir or Path(tempfile.mkdtemp(prefix="lifecycle-demo-"))
    pace = float(os.environ.get("LIFECYCLE_DEMO_PACE", "3.0"))  # seconds per beat (about a minute); tests go faster
    console = Console(width=None if sys.stdout.isatty() else 160)
    logger.remove()
    if verbose:
        logger.add(sys.stderr, level="INFO", format="{time:HH:mm:ss.SSS} {level:<7} {message}")
    directory.mkdir(parents=True, exist_ok=True)
    logger.add(directory / "logs" / "lifecycle.log", level="DEBUG",
               format="{time:YYYY-MM-DD HH:mm:ss.SSS!UTC}Z {level:<7} {message}")
    started = time.monotonic()

    def table(render: Callable[[], Any]) -> Table:
        t = Table(title=f"position-lifecycle demo: the service on the embedded simulator "
                        f"({time.monotonic() - started:.0f} s)")
        for column in COLUMNS:
            t.add_column(column)
        for row in render():
            t.add_row(*row)
        return t

    class Show:
        def __init__(self, render: Callable[[], Any]) -> None:
            self.render = render
            self.live = Live(table(render), console=console, refresh_per_second=4, transient=False,
                             get_renderable=lambda: table(render))

        def __enter__(self) -> Show:
            self.live.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.live.__exit__(*exc)  # type: ignore[arg-type]

    console.print(f"work directory: {directory}")
    def announce(url: str, token: str | None) -> None:
        given = f"token {token}" if token else "the token in LIFECYCLE_API_TOKEN"
        console.print(f"live page: {url} (log in with {given}; it is served while the demo runs)")

    result = asyncio.run(run_demo(directory, pace=pace, forever=forever, show=Show, page_port=port if page else None,
                                  announce=announce))
    summary = Table(title="summary: every ending")
    for column in ("scenario", "symbol", "terminal state", "cause", "exit price", "PnL (net of fee)",
                   "detection latency", "as expected"):
        summary.add_column(column)
    for s in result.scenarios:
        ending = result.endings.get(s.position_id or "")
        latency = f"{ending.detection_ms:.1f} ms" if ending and ending.detection_ms is not None else "-"
        summary.add_row(s.name, s.symbol, ending.state if ending else "not ended", (ending.cause or "-") if ending
                        else "-", _shown(ending.exit_price if ending else None),
                        _signed(ending.net_pnl if ending else None), latency,
                        "yes" if result.ok(s) or s.name.startswith("random walk") else "NO")
    console.print()
    console.print(summary)
    states: dict[str, int] = {}
    for ending in result.endings.values():
        states[ending.state] = states.get(ending.state, 0) + 1
    console.print("per terminal state: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    first = f"{result.first_open_s:.2f} s" if result.first_open_s is not None else "-"
    console.print(f"first position OPEN after {first}; the demo took {result.duration_s:.1f} s")
    console.print(f"every journal replays to its stored state: {'yes' if result.replay_ok else 'NO'}")
    console.print(f"database: {directory / 'lifecycle.sqlite'}")
    console.print(f"records:  {directory / 'records'} (JSON lines per event type and day)")
    console.print(f"logs:     {directory / 'logs' / 'lifecycle.log'}")
    shipped = Path(__file__).resolve().parent.parent / "diagrams" / "transitions.md"
    console.print(f"diagrams: {shipped if shipped.exists() else 'lifecycle diagrams --out DIR'} (the lifecycle, "
                  "generated from the code)")
    console.print(f"try:      lifecycle status --db sqlite:///{directory / 'lifecycle.sqlite'} --ended 8")
    if not all(result.ok(s) for s in result.scenarios if not s.name.startswith("random walk")) \
            or not result.replay_ok:
        raise typer.Exit(1)


@app.command()
def migrate(db: Annotated[str, typer.Option(help="Database URL: sqlite:///file.db or postgresql://...")]) -> None:
    """Bring the database schema to the newest revision."""
    from db.engine import create_engine
    from db.engine import migrate as run_migrate

    async def go() -> None:
        engine = create_engine(db)
        try:
            await run_migrate(engine)
        finally:
            await engine.dispose()

    _with_database(db, go, source=None)
    typer.echo("schema is at head")


@app.command()
def history(
    position_id: str,
    config: ConfigOption = None,
    db: Annotated[str | None, typer.Option(help="Database URL (instead of the configuration's).")] = None,
) -> None:
    """Print one position's journal."""
    from db.repository import Repository

    source = None if db else "database_url"
    if db is None:
        db = _settings(config, check_secrets=False).database_url
    url = db
    _existing_sqlite_file(url)

    async def go() -> list:
        repo = await Repository.open(url, run_migrations=False)
        try:
            return await repo.journal(position_id)
        finally:
            await repo.close()

    entries = _with_database(url, go, source=source)
    if not entries:
        typer.echo(f"no journal for position {position_id}", err=True)
        raise typer.Exit(1)
    for e in entries:
        source = e.source.value if e.source else "-"
        line = f"{e.seq:>4} {e.at.isoformat()} {source:>15} --{e.event}--> {e.dest.value} {e.cause or ''}".rstrip()
        numbers = _journal_numbers(e.payload)
        typer.echo(f"{line}  | {numbers}" if numbers else line)


# The numbers of a journal row's payload worth reading, in this order, with their labels.
_JOURNAL_NUMBERS = (("requested_quantity", "size"), ("quantity", "filled"), ("price", "price"),
                    ("exit_price", "exit"), ("stop_price", "stop"), ("mark", "mark"), ("watermark", "best"),
                    ("remaining", "remaining"), ("realized_pnl", "pnl"), ("fee", "fee"))


def _journal_numbers(payload: dict[str, Any]) -> str:
    """`price 60000, stop 59400, ...` from a journal payload (the event's fields): what a reader of the history
    wants to see on each row; "" when the row carries none."""
    parts = [f"{label} {_signed(Decimal(str(payload[key]))) if key == 'realized_pnl' else payload[key]}"
             for key, label in _JOURNAL_NUMBERS if payload.get(key) is not None]
    trailing = payload.get("trailing")
    if isinstance(trailing, dict) and trailing.get("activation_price") is not None:
        parts.append(f"trailing from {trailing['activation_price']}, {trailing.get('callback_rate')} % behind")
    return ", ".join(parts)


accounts_app = typer.Typer(help="The accounts' leases when several processes share a PostgreSQL database.",
                           invoke_without_command=True, no_args_is_help=False)
app.add_typer(accounts_app, name="accounts")


def _lease_store_call(config: Path | None, db: str | None, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Run `work(LeaseStore)` on the configured (or given) PostgreSQL database."""
    from db.engine import create_engine
    from db.leases import LeaseStore

    source = None if db else "database_url"
    url = db or _settings(config, check_secrets=False).database_url
    if url.startswith("sqlite"):
        raise _refuse("accounts: a SQLite database is served by one process, which owns every account (leases are for "
                "several processes on PostgreSQL)")

    async def go() -> T:
        engine = create_engine(url)
        try:
            return await work(LeaseStore(engine))
        finally:
            await engine.dispose()

    return _with_database(url, go, source=source)


DbOption = Annotated[str | None, typer.Option(help="Database URL (instead of the configuration's).")]


@accounts_app.callback()
def accounts(ctx: typer.Context, config: ConfigOption = None, db: DbOption = None) -> None:
    """List every account with its owner, epoch, lease age and live positions."""
    if ctx.invoked_subcommand is not None:
        return
    views = _lease_store_call(config, db, lambda store: store.view())
    if not views:
        typer.echo("no account has a lease row yet (no service has started on this database)")
        return
    typer.echo(f"{'account':<20} {'owner':<28} {'epoch':>5} {'lease age':>10} {'expires in':>10} {'positions':>9}")
    for v in views:
        owner = v.owner or "-"
        if v.owner is not None and not v.held:
            owner += " (expired)"
        if v.release_requested:
            owner += " (release asked)"
        age = f"{v.lease_age_s:.1f} s" if v.lease_age_s is not None else "-"
        expires = f"{v.expires_in_s:.1f} s" if v.expires_in_s is not None else "-"
        typer.echo(f"{v.account:<20} {owner:<28} {v.epoch:>5} {age:>10} {expires:>10} {v.positions:>9}")


@accounts_app.command("release")
def accounts_release(name: str, config: ConfigOption = None, db: DbOption = None) -> None:
    """Ask the account's owner to hand it back (it drains it and releases the lease; another process takes it)."""

    async def ask(store: Any) -> str | None:
        return await store.request_release(name)

    try:
        owner = _lease_store_call(config, db, ask)
    except KeyError:
        raise _refuse(f"no account {name!r} in the lease table (`lifecycle accounts` lists them)") from None
    if owner is None:
        typer.echo(f"{name} has no owner now; the next process looking for free accounts takes it")
        return
    typer.echo(f"{owner} was asked to hand {name} over; it does so at its next renewal")


if __name__ == "__main__":  # pragma: no cover
    app()
