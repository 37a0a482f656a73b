"""A lone write's statements on SQLite, run on the driver's own connection (issue 13).

A transition that goes alone (a single close, with nothing else queued) is three or four statements in the
SQLite writer's thread. Through SQLAlchemy's execution (the compiled cache's look-up, an execution context and
a result object per statement) they took 0.27 ms of the thread's time; on the driver's connection 0.14 ms
(bench.transitions' sequential run, instrumented). Next to a busy event loop the thread's time grows with the
interpreter lock it waits for, and the single close's commit took 0.74 ms at p50 and 1.4-1.7 ms at p99 through
SQLAlchemy, 0.53-0.66 and 0.9-1.4 ms here (bench.closure_latency, instrumented).

What SQLAlchemy's execution would do is kept:
* each statement is compiled by SQLAlchemy, once per dialect and set of columns;
* every parameter goes through its bind parameter's type processing for the dialect (money as exact text,
  UTC times as ISO text, JSON), so the rows are the ones `Connection.execute` writes (tests/test_driver_sql.py);
* the engine's `before_cursor_execute` listeners see every statement (the tests' storage faults, anyone's
  tracing) and may fail it;
* a driver error is raised as SQLAlchemy raises it (`DBAPIError.instance`: a constraint is its IntegrityError).

The transaction is still SQLAlchemy's (the caller's `engine.begin()`): the driver begins it at the first
statement and the connection's commit ends it, as with SQLAlchemy's own statements.
"""
from __future__ import annotations

import weakref
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


_cache: weakref.WeakKeyDictionary[sa.Dialect, dict[tuple[int, tuple[str, ...]], _Compiled]] = (
    weakref.WeakKeyDictionary())


def applies(conn: sa.Connection) -> bool:
    """Whether this connection's statements can go to its driver directly: Python's own sqlite3 (the SQLite
    writer's thread), not an async adapter."""
    return conn.dialect.name == "sqlite" and conn.dialect.driver == "pysqlite"


def _compiled(dialect: sa.Dialect, statement: Statement, keys: tuple[str, ...]) -> _Compiled:
    per_dialect = _cache.get(dialect)
    if per_dialect is None:
        per_dialect = _cache[dialect] = {}
    found = per_dialect.get((id(statement), keys))
    if found is None:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        assert isinstance(compiled, SQLCompiler)
        names = compiled.positiontup
        if names is None:  # not a positional dialect: this module does not apply
            raise ValueError(f"{dialect.name}: positional parameters expected")
        processors = tuple((name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
                           for name in names)
        found = per_dialect[(id(statement), keys)] = _Compiled(statement, compiled.string, processors)
    return found


def execute(conn: sa.Connection, statement: Statement, values: dict[str, Any]) -> int:
    """Run `statement` with `values` (one row's parameters, by name) on the connection's driver connection, in
    its current transaction; returns the driver's row count."""
    dialect = conn.dialect
    compiled = _compiled(dialect, statement, tuple(values))
    params: tuple[Any, ...] = tuple(
        value if process is None else process(value)
        for name, process in compiled.processors for value in (values[name],))
    sql = compiled.sql
    dbapi = dialect.loaded_dbapi
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        listeners = conn.dispatch.before_cursor_execute
        if listeners:
            for listener in listeners:
                sql, params = listener(conn, cursor, sql, params, None, False)
        cursor.execute(sql, params)
        return int(cursor.rowcount)
    except dbapi.Error as e:
        raise sa.exc.DBAPIError.instance(sql, params, e, dbapi.Error) from e
    finally:
        cursor.close()
