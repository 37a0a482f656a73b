"""The `lifecycle` command line."""
from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from loguru import logger

app = typer.Typer(add_completion=False, no_args_is_help=True, help="position-lifecycle: positions as state machines.")

DEFAULT_DIAGRAMS = Path("diagrams")


def _configure_logging(verbose: bool) -> None:
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if verbose else "INFO", format="{time:HH:mm:ss.SSS} {level:<7} {message}")


@app.command()
def diagrams(
    out: Annotated[Path, typer.Option(help="Directory for position.mmd, position.dot, transitions.md.")] = DEFAULT_DIAGRAMS,
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
        Path | None, typer.Option(help="Where the SQLite file and records go (default: a new temp directory).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Walk positions through every ending on SQLite, restart, rehydrate, and replay every journal."""
    from lifecycle.demo import run_demo

    _configure_logging(verbose)
    directory = workdir or Path(tempfile.mkdtemp(prefix="lifecycle-demo-"))
    result = asyncio.run(run_demo(directory))
    typer.echo("")
    typer.echo(f"{'symbol':<10} {'position':<22} {'state':<16} {'cause':<14} journal rows")
    for symbol, pid, state, cause, n in result.rows:
        typer.echo(f"{symbol:<10} {pid:<22} {state:<16} {cause:<14} {n}")
    typer.echo("")
    typer.echo(f"refused events: {result.refused}; positions rehydrated after restart: {result.rehydrated}")
    typer.echo(f"every journal replays to its stored state: {'yes' if result.replay_ok else 'NO'}")
    typer.echo(f"database: {result.database}")
    typer.echo(f"records:  {result.records}")
    typer.echo(f"diagrams: {DEFAULT_DIAGRAMS.resolve() / 'position.mmd'} (regenerate with `lifecycle diagrams`)")
    if not result.replay_ok:
        raise typer.Exit(1)


@app.command()
def migrate(db: Annotated[str, typer.Option(help="Database URL: sqlite:///file.db or postgresql://...")]) -> None:
    """Bring the database schema to the newest revision."""
    from db.engine import DatabaseConfigError, create_engine
    from db.engine import migrate as run_migrate

    async def go() -> None:
        engine = create_engine(db)
        try:
            await run_migrate(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(go())
    except DatabaseConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo("schema is at head")


@app.command()
def history(
    position_id: str,
    db: Annotated[str, typer.Option(help="Database URL: sqlite:///file.db or postgresql://...")],
) -> None:
    """Print one position's journal."""
    from db.repository import Repository

    async def go() -> list:
        repo = await Repository.open(db, run_migrations=False)
        try:
            return await repo.journal(position_id)
        finally:
            await repo.close()

    entries = asyncio.run(go())
    if not entries:
        typer.echo(f"no journal for position {position_id}", err=True)
        raise typer.Exit(1)
    for e in entries:
        source = e.source.value if e.source else "-"
        typer.echo(f"{e.seq:>4} {e.at.isoformat()} {source:>15} --{e.event}--> {e.dest.value} {e.cause or ''}")


if __name__ == "__main__":  # pragma: no cover
    app()
