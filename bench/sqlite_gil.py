"""Why the SQLite batches are multi-row statements (db/multirow.py): Python's sqlite3 lets go of the interpreter
lock around every step of a statement, and an executemany steps once per row. Next to a thread that keeps the
lock busy (the event loop parsing a cascade), every hand-over waits for it.

A writer thread inserts N rows in one transaction (WAL, synchronous=FULL), with executemany and with one
multi-row statement, first next to an idle main thread, then next to a busy one; printed: wall and CPU time.

Run: python -m bench.sqlite_gil [--rows 1000]
"""
from __future__ import annotations

import argparse
import sqlite3
import tempfile
import threading
import time
from pathlib import Path


def _write(conn: sqlite3.Connection, rows: list[tuple[object, ...]], multi: bool) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    conn.execute("BEGIN")
    if multi:
        sql = "INSERT INTO t VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(rows))
        conn.execute(sql, [value for row in rows for value in row])
    else:
        conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    return (time.perf_counter() - wall) * 1000, (time.thread_time() - cpu) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp()) / "gil.sqlite"
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, a TEXT, b TEXT, c INTEGER, d TEXT, e TEXT, f TEXT, g TEXT)")
    print(f"SQLite {sqlite3.sqlite_version}, {args.rows} rows per transaction")
    stop = threading.Event()

    def busy() -> None:  # pure Python work: holds the interpreter lock but for the switch interval
        n = 0
        while not stop.is_set():
            n += 1

    batch = 0
    for neighbour in ("idle", "busy"):
        spinner = threading.Thread(target=busy) if neighbour == "busy" else None
        if spinner is not None:
            stop.clear()
            spinner.start()
        for multi in (False, True, False, True):
            batch += 1
            rows = [(f"{batch}-{i}", "aaaa", "bbbb", i, "dddd", "eeee", "ffff", "gggg") for i in range(args.rows)]
            out: list[tuple[float, float]] = []
            writer = threading.Thread(target=lambda r=rows, m=multi, o=out: o.append(_write(conn, r, m)))
            writer.start()
            writer.join()
            wall, cpu = out[0]
            how = "one multi-row statement" if multi else "executemany"
            print(f"  next to the {neighbour} thread: {how:24} {wall:8.1f} ms wall, {cpu:5.1f} ms CPU")
        if spinner is not None:
            stop.set()
            spinner.join()
    conn.close()


if __name__ == "__main__":
    main()
