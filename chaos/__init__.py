"""Chaos: seeded schedules of commands, market moves, other actors, venue, storage and process faults run
through the whole engine (the real `Service`, ccxt, the venue simulator, SQLite or PostgreSQL), with the
money invariants checked against the venue's own books.

    python -m chaos --schedules 500 --seed 1            # what CI runs (tests/test_chaos.py)
    python -m chaos --schedules 20000 --seed 7 --workers 2 --report soak.json   # a soak
    python -m chaos --replay 1234                       # one schedule, its timeline and its verdict
    python -m chaos --hypothesis 200                    # hypothesis explores and shrinks

Modules: `schedule` (what a schedule is and how a seed becomes one), `world` (runs one against real parts),
`checks` (the invariants), `runner` (many, in worker processes; the coverage matrix; shrinking).
"""
