"""A lone write's statements on SQLite, run on the driver's own connection (issue 13).

A transition that goes alone (a single close, with nothing else queued) is three or four statements in the
SQLite writer's thread. Through SQLAlchemy's execution (the compiled cache's look-up, an execution context and
a result object per statement) they took 0.27 ms of the thread's time; on the driver's connection 0.14 ms
(bench.transitions' sequential run, instrumented). Next to a busy event loop the thread's time grows with the
interpreter lock it waits for, and the single close's commit took 0.74 ms at p50 through SQLAlchemy, 0.60-0.67
ms here (bench.closure_latency, instrumented).

What SQLAlchemy's execution would store is kept:
* each statement is compiled by SQLAlchemy, once per pooled connection and set of columns (the cache lives in
  the connection's `info`, and goes with it);
* every parameter goes through its bind parameter's type processing for the dialect (money as exact text,
  UTC times as ISO text, JSON), so the rows are the ones `Connection.execute` writes (tests/test_driver_sql.py);
* a driver error is raised as SQLAlchemy raises it (`DBAPIError.instance`: a constraint is its IntegrityError),
  and so is a value its type refuses (a `StatementError` around the type's ValueError).

Only while nobody watches statements: an engine with listeners of its statements' execution (`before_execute`,
`after_execute`, `before_cursor_execute`, `after_cursor_execute`; its dialect's `handle_error`, `do_execute`: the
tests' storage faults, anyone's tracing or timing) or with `echo` on runs them through SQLAlchemy, which calls
those with their execution context (a review found a timing recipe leaking and a tracer failing every write when
only some of them were called here).

The transaction is still SQLAlchemy's (the caller's `engine.begin()`): the driver begins it at the first
statement and the connection's commit ends it, as with SQLAlchemy's own statements.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.compiler import SQLCompiler

Statement = sa.Insert | sa.Update | sa.Delete


@dataclass(frozen=True, slots=True)
class _Compiled:
    statement: Statement  # kept alive: the cache is keyed by its id
    sql: str
    processors: tuple[tuple[str, Callable[[Any], Any] | None], ...]  # (parameter name, bind processing)


_INFO_KEY = "lifecycle.driver_sql"  # this module's compiled statements, in a pooled connection's `info`
statements_run = 0  # statements run here since the process started (tests and diagnostics)


def applies(conn: sa.Connection) -> bool:
    """Whether this connection's statements can go to its driver directly: Python's own sqlite3 (the SQLite
    writer's thread), not an async adapter, and nobody watching statements on its engine (see above)."""
    if conn.dialect.name != "sqlite" or conn.dialect.driver != "pysqlite" or conn.engine.echo:
        return False
    events, dialect_events = conn.dispatch, conn.dialect.dispatch
    return not (events.before_execute or events.after_execute or events.before_cursor_execute
                or events.after_cursor_execute or dialect_events.handle_error or dialect_events.do_execute)


def _compiled(conn: sa.Connection, statement: Statement, keys: tuple[str, ...]) -> _Compiled:
    cache: dict[tuple[int, tuple[str, ...]], _Compiled] = conn.info.setdefault(_INFO_KEY, {})
    found = cache.get((id(statement), keys))
    if found is None:
        dialect = conn.dialect
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        assert isinstance(compiled, SQLCompiler)
        names = compiled.positiontup
        if names is None:  # not a positional dialect: this module does not apply
            raise ValueError(f"{dialect.name}: positional parameters expected")
        processors = tuple((name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
                           for name in names)
        found = cache[(id(statement), keys)] = _Compiled(statement, compiled.string, processors)
    return found


def execute(conn: sa.Connection, statement: Statement, values: dict[str, Any]) -> int:
    """Run `statement` with `values` (one row's parameters, by name) on the connection's driver connection, in
    its current transaction; returns the driver's row count. (Only where `applies(conn)`.)"""
    global statements_run
    compiled = _compiled(conn, statement, tuple(values))
    hide = conn.engine.hide_parameters
    try:
        params: tuple[Any, ...] = tuple(
            value if process is None else process(value)
            for name, process in compiled.processors for value in (values[name],))
    except Exception as e:  # a value its type refuses (a naive time, a float for money): as SQLAlchemy says it
        raise sa.exc.StatementError(str(e), compiled.sql, values, e, hide_parameters=hide) from e
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(compiled.sql, params)
        statements_run += 1
        return int(cursor.rowcount)
    except dbapi.Error as e:
        raise sa.exc.DBAPIError.instance(compiled.sql, params, e, dbapi.Error, hide_parameters=hide) from e
    finally:
        cursor.close()
