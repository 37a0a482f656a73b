"""Multi-row statements for the batch writes on SQLite (issue 13).

Python's sqlite3 lets go of the interpreter lock around every step of a statement, and an executemany steps
once per row. In a cascade the event loop holds the lock almost all the time (parsing the stream), so the
writer thread waited for it once per row: a batch of 231 transitions and their order rows took 218 ms of
wall time for 25 ms of its own CPU (bench.burst with 500 positions, instrumented), and every one of them was
acknowledged that much later. A thread that inserts 1,000 rows next to a busy thread: 2.9-3.7 s with
executemany, 12-23 ms with one multi-row statement (2 ms each when the other thread is idle).

So on SQLite a batch is a handful of statements whatever its size: `INSERT ... VALUES (...), (...)`,
`UPDATE ... FROM (VALUES ...)`, `DELETE ... WHERE key IN (...)`, an upsert for order rows, and one read that
returns a single row. The SQL is built from the tables' metadata; every value goes through its column type's
own bind processing for the dialect (what SQLAlchemy applies to an executemany), so the rows stored are the
same (tests/test_group_commit.py compares them). PostgreSQL keeps executemany: asyncpg runs on the event loop,
there is no lock to hand over per row.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa

_processors: dict[tuple[str, str], dict[str, Callable[[Any], Any] | None]] = {}
_supported: bool | None = None


def supported() -> bool:
    """Whether this process's SQLite has what the statements need: `UPDATE ... FROM` (3.33) and the JSON
    functions (built in from 3.38, optional before). Older libraries (a distribution's Python linked against
    its system SQLite) keep executemany."""
    global _supported
    if _supported is None:
        ok = sqlite3.sqlite_version_info >= (3, 33)
        if ok:
            probe = sqlite3.connect(":memory:")
            try:
                probe.execute("SELECT json_group_array(json_array(1, 2))").fetchone()
            except sqlite3.Error:
                ok = False
            finally:
                probe.close()
        _supported = ok
    return _supported


def applies(conn: sa.Connection) -> bool:
    """Whether a batch on this connection is written with these statements (SQLite, recent enough)."""
    return conn.dialect.name == "sqlite" and supported()


def _bind(table: sa.Table, dialect: sa.Dialect) -> dict[str, Callable[[Any], Any] | None]:
    key = (table.name, dialect.name)
    found = _processors.get(key)
    if found is None:
        found = _processors[key] = {c.name: c.type.dialect_impl(dialect).bind_processor(dialect) for c in table.c}
    return found


def _variables(conn: sa.Connection) -> int:
    """The most bound parameters one statement may have: the connection's own limit (32,766 by default since
    SQLite 3.32), or 999 (the default before) where the driver cannot tell."""
    getlimit = getattr(conn.connection.driver_connection, "getlimit", None)
    return int(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)) if getlimit is not None else 999


def _chunks(rows: Sequence[Any], width: int, limit: int) -> Iterator[Sequence[Any]]:
    size = max(1, limit // max(1, width))
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def _values(table: sa.Table, dialect: sa.Dialect, sources: Sequence[tuple[str, str]],
            rows: Sequence[dict[str, Any]]) -> list[Any]:
    """The rows' values, flat, in `sources` order: (column, the row's key holding its value; `_id` for `id`),
    each through its column's bind processing."""
    bind = _bind(table, dialect)
    keys = [k for _, k in sources]
    procs = [bind[c] for c, _ in sources]
    out: list[Any] = []
    append = out.append
    for row in rows:
        for key, proc in zip(keys, procs, strict=True):
            value = row[key]
            append(value if proc is None else proc(value))  # None too, as SQLAlchemy does (JSON: 'null')
    return out


def _quote(conn: sa.Connection, name: str) -> str:
    return str(conn.dialect.identifier_preparer.quote(name))


def insert(conn: sa.Connection, table: sa.Table, rows: Sequence[dict[str, Any]], *,
           upsert_on: str | None = None, keep: Sequence[str] = ()) -> None:
    """INSERT the rows (each with the same keys: columns of `table`) in as few statements as the parameter
    limit allows. `upsert_on`: the key column; a row already there is updated instead (all columns but the
    key and `keep`)."""
    if not rows:
        return
    columns = list(rows[0])
    names = ", ".join(_quote(conn, c) for c in columns)
    one = "(" + ", ".join("?" * len(columns)) + ")"
    tail = ""
    if upsert_on is not None:
        sets = ", ".join(f"{_quote(conn, c)} = excluded.{_quote(conn, c)}" for c in columns
                         if c != upsert_on and c not in keep)
        tail = f" ON CONFLICT ({_quote(conn, upsert_on)}) DO UPDATE SET {sets}"
    for chunk in _chunks(rows, len(columns), _variables(conn)):
        sql = f"INSERT INTO {_quote(conn, table.name)} ({names}) VALUES {', '.join([one] * len(chunk))}{tail}"
        conn.exec_driver_sql(sql, tuple(_values(table, conn.dialect, [(c, c) for c in columns], chunk)))


def update(conn: sa.Connection, table: sa.Table, key: str, rows: Sequence[dict[str, Any]], *,
           key_param: str, guard: tuple[str, str] | None = None) -> int:
    """UPDATE the rows of `table` whose `key` column equals each row's `key_param` value (and, with `guard`
    (column, param), whose column equals that value too), setting every other column the rows carry.
    Returns how many rows were updated."""
    if not rows:
        return 0
    setting = [c for c in rows[0] if c in table.c and c != key]
    # The VALUES table's columns, as SQLite names them (column1, column2, ...): the key, the new values, then
    # the guard's expected value (a column can be both set and guarded: the journal sequence).
    name = _quote(conn, table.name)
    sets = ", ".join(f"{_quote(conn, c)} = v.column{i + 2}" for i, c in enumerate(setting))
    where = f"{name}.{_quote(conn, key)} = v.column1"
    sources = [(key, key_param), *((c, c) for c in setting)]
    if guard is not None:
        where += f" AND {name}.{_quote(conn, guard[0])} = v.column{len(sources) + 1}"
        sources.append(guard)
    one = "(" + ", ".join("?" * len(sources)) + ")"
    changed = 0
    for chunk in _chunks(rows, len(sources), _variables(conn)):
        sql = f"UPDATE {name} SET {sets} FROM (VALUES {', '.join([one] * len(chunk))}) AS v WHERE {where}"
        changed += conn.exec_driver_sql(sql, tuple(_values(table, conn.dialect, sources, chunk))).rowcount
    return changed


def delete(conn: sa.Connection, table: sa.Table, key: str, values: Sequence[Any]) -> None:
    """DELETE the rows whose `key` column is one of `values`."""
    for chunk in _chunks(values, 1, _variables(conn)):
        sql = f"DELETE FROM {_quote(conn, table.name)} WHERE {_quote(conn, key)} IN ({', '.join('?' * len(chunk))})"
        conn.exec_driver_sql(sql, tuple(chunk))


def pairs(conn: sa.Connection, table: sa.Table, key: str, value: str, keys: Sequence[Any]) -> dict[Any, Any]:
    """{key: value} of the rows whose `key` column is one of `keys`, read as one row: a result of many rows
    would step (and hand the interpreter lock over) once per row. The keys and the values come as two JSON
    arrays (one aggregate pass: element i of each is the same row), not as one array of pairs: a list per row
    made the collector run inside this read, 3.5 ms of a 500-member batch's 24 ms (bench.transitions)."""
    out: dict[Any, Any] = {}
    for chunk in _chunks(keys, 1, _variables(conn)):
        sql = (f"SELECT json_group_array({_quote(conn, key)}), json_group_array({_quote(conn, value)}) "
               f"FROM {_quote(conn, table.name)} WHERE {_quote(conn, key)} IN ({', '.join('?' * len(chunk))})")
        found, values = conn.exec_driver_sql(sql, tuple(chunk)).one()
        out.update(zip(json.loads(found), json.loads(values), strict=True))
    return out
