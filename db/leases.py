"""Account leases on PostgreSQL: which service process acts on which account, and the fence on its writes.

A lease row per account (`account_leases`): owner (the instance name), token (one process run), epoch
(incremented by every acquisition) and an expiry by the database's clock. Every time in here is the
database's: the processes' own clocks are compared only with themselves (see `lifecycle.app.leases`).

- `acquire`: a free lease (released, or never held) is taken at once; a held one only after its expiry plus
  the margin. The epoch grows by one.
- `renew`: extends the leases this run holds and that have not expired; a lease missing from the answer is
  lost (taken over, or expired).
- `release`: hands the leases back (SIGTERM, `lifecycle accounts release`): free for the next taker at once.
- `fence`: inside a write transaction, which of the given fences still hold (`FOR SHARE`: a takeover's
  UPDATE waits for the write to commit, and the write never lands after it).

SQLite has none of this: one process per SQLite file (`db.engine.SqliteLock`).
"""
from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from db.tables import AccountLeaseRow, InstanceRow, PositionRow
from lifecycle.machines.states import TERMINAL_STATES, PositionState


def _table(row: Any) -> sa.Table:
    table = sa.inspect(row).local_table
    assert isinstance(table, sa.Table)
    return table


leases = _table(AccountLeaseRow)
instances = _table(InstanceRow)
_positions = _table(PositionRow)
_LIVE_STATES = [s.value for s in PositionState if s not in TERMINAL_STATES]


def _seconds(name: str) -> sa.ColumnElement[Any]:
    """An interval of `:name` seconds, for arithmetic with the database's now()."""
    return sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.bindparam(name, type_=sa.Float))


# The database's clock at the moment the statement runs (`now()` is the transaction's start: a statement that
# waited for a lock would date a new expiry in the past).
_NOW = sa.func.clock_timestamp()


@dataclass(frozen=True, slots=True)
class Fence:
    """What a write for `account` must find in the lease row, in its own transaction: this run's token and
    the epoch under which the write was decided (a run that lost the lease and took it again has a new
    epoch, so a write left over from the old one still fails)."""

    account: str
    token: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Taken:
    account: str
    epoch: int
    expires_at: datetime
    db_now: datetime


@dataclass(frozen=True, slots=True)
class Renewed:
    account: str
    epoch: int
    release_requested: bool


@dataclass(frozen=True, slots=True)
class LeaseView:
    """One row of `lifecycle accounts`."""

    account: str
    owner: str | None
    epoch: int
    held: bool  # owned and not expired by the database's clock
    lease_age_s: float | None  # since it was acquired
    expires_in_s: float | None  # negative: expired
    release_requested: bool
    positions: int  # live positions in the database


class LeaseStore:
    """The lease and instance rows of one PostgreSQL database.

    Locks: a fenced write holds its lease row `FOR KEY SHARE` until it commits. A renewal (an UPDATE of
    non-key columns) is compatible with that and never waits for the owner's own writes; an acquisition takes
    the row `FOR UPDATE` first, so it waits for a write in flight and is serialised after it. Every statement
    here waits for a lock at most `lock_timeout_s` (an acquisition that would wait longer answers "not free
    yet": a writer stuck in an open transaction, frozen or cut off, never stalls the other processes; its
    session is ended by `idle_in_transaction_session_timeout`, see `db.engine.create_engine`)."""

    def __init__(self, engine: AsyncEngine, *, lock_timeout_s: float = 1.0) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError("account leases need PostgreSQL (SQLite is one process per file)")
        self.engine = engine
        self.lock_timeout_ms = max(1, int(lock_timeout_s * 1000))

    async def _short_locks(self, conn: AsyncConnection) -> None:
        await conn.exec_driver_sql(f"SET LOCAL lock_timeout = {self.lock_timeout_ms}")

    async def ensure(self, accounts: Collection[str]) -> None:
        """A free lease row for every account that has none."""
        if not accounts:
            return
        stmt = pg_insert(leases).on_conflict_do_nothing(index_elements=["account"])
        async with self.engine.begin() as conn:
            await conn.execute(stmt, [{"account": a, "epoch": 0, "release_requested": False} for a in accounts])

    async def acquire(self, account: str, *, owner: str, token: str, lease_s: float, margin_s: float,
                      dead: Collection[str] = ()) -> Taken | None:
        """Take the account's lease if it is free, expired for longer than `margin_s`, or held by one of the
        `dead` tokens (process runs known to have ended); None if not."""
        stmt = (
            leases.update()
            .where(leases.c.account == account,
                   sa.or_(leases.c.token.is_(None), leases.c.expires_at.is_(None),
                          leases.c.expires_at < _NOW - _seconds("margin"), leases.c.token.in_(list(dead))))
            .values(owner=owner, token=token, epoch=leases.c.epoch + 1, expires_at=_NOW + _seconds("lease"),
                    acquired_at=_NOW, renewed_at=_NOW, release_requested=False)
            .returning(leases.c.epoch, leases.c.expires_at, _NOW)
        )
        try:
            async with self.engine.begin() as conn:
                await self._short_locks(conn)
                # FOR UPDATE conflicts with the fence's FOR KEY SHARE: a write of the old owner in flight
                # commits (or fails) before the lease changes hands.
                await conn.execute(sa.select(leases.c.account).where(leases.c.account == account).with_for_update())
                row = (await conn.execute(stmt, {"lease": lease_s, "margin": margin_s})).first()
        except sa.exc.DBAPIError as e:
            if _lock_timeout(e):
                return None  # a writer holds the row: not free yet
            raise
        return None if row is None else Taken(account, row[0], row[1], row[2])

    async def next_free_at(self, accounts: Collection[str], *, margin_s: float,
                           dead: Collection[str] = ()) -> dict[str, float]:
        """For each account: seconds (by the database's clock) until `acquire` can take it (0: now)."""
        if not accounts:
            return {}
        wait = sa.func.greatest(0, sa.func.extract("epoch", leases.c.expires_at + _seconds("margin") - _NOW))
        query = sa.select(leases.c.account,
                          sa.case((leases.c.token.is_(None) | leases.c.expires_at.is_(None)
                                   | leases.c.token.in_(list(dead)), 0), else_=wait)
                          ).where(leases.c.account.in_(list(accounts)))
        async with self.engine.connect() as conn:
            return {r[0]: float(r[1]) for r in (await conn.execute(query, {"margin": margin_s})).all()}

    async def renew(self, held: Collection[str], *, token: str, lease_s: float) -> list[Renewed]:
        """Extend the leases of `held` this run still holds unexpired; the ones missing from the answer are lost."""
        if not held:
            return []
        stmt = (
            leases.update()
            .where(leases.c.account.in_(list(held)), leases.c.token == token, leases.c.expires_at > _NOW)
            .values(expires_at=_NOW + _seconds("lease"), renewed_at=_NOW)
            .returning(leases.c.account, leases.c.epoch, leases.c.release_requested)
        )
        async with self.engine.begin() as conn:
            await self._short_locks(conn)
            return [Renewed(r[0], r[1], bool(r[2])) for r in (await conn.execute(stmt, {"lease": lease_s})).all()]

    async def release(self, accounts: Collection[str], *, token: str) -> list[str]:
        """Hand back the leases this run holds (free at once for any process); the accounts released."""
        if not accounts:
            return []
        stmt = (
            leases.update()
            .where(leases.c.account.in_(list(accounts)), leases.c.token == token)
            .values(owner=None, token=None, expires_at=None, release_requested=False)
            .returning(leases.c.account)
        )
        async with self.engine.begin() as conn:
            await self._short_locks(conn)
            return [r[0] for r in (await conn.execute(stmt)).all()]

    async def request_release(self, account: str) -> str | None:
        """Ask the account's owner to hand it back (at its next renewal); the owner's name, None if unowned.
        KeyError if there is no such account."""
        async with self.engine.begin() as conn:
            await self._short_locks(conn)
            row = (await conn.execute(leases.update()
                                      .where(leases.c.account == account, leases.c.token.is_not(None),
                                             leases.c.expires_at > _NOW)
                                      .values(release_requested=True).returning(leases.c.owner))).first()
            if row is not None:
                return str(row[0])
            exists = (await conn.execute(sa.select(leases.c.account).where(leases.c.account == account))).first()
            if exists is None:
                raise KeyError(account)
            return None

    async def heartbeat(self, *, token: str, name: str, started_at: datetime, max_accounts: int = 0) -> None:
        stmt = pg_insert(instances).values(token=token, name=name, host=host_key(), pid=os.getpid(),
                                           max_accounts=max_accounts, started_at=started_at, seen_at=_NOW)
        stmt = stmt.on_conflict_do_update(index_elements=["token"], set_={"seen_at": _NOW})
        async with self.engine.begin() as conn:
            await conn.execute(stmt)
            # instances gone for a day are forgotten
            await conn.execute(instances.delete().where(instances.c.seen_at < _NOW - _seconds("day")),
                               {"day": 86400.0})

    async def leave(self, *, token: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(instances.delete().where(instances.c.token == token))

    async def dead_here(self, *, token: str) -> set[str]:
        """Tokens of process runs on this host (same name, same pid namespace) whose process has ended: their
        leases need not wait for the expiry (a service restarted after a crash takes its accounts back at
        once). A pid reused by another process reads as alive: the lease is then waited for, never taken early."""
        query = sa.select(instances.c.token, instances.c.pid).where(instances.c.host == host_key(),
                                                                    instances.c.token != token)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {t for t, pid in rows if pid != os.getpid() and not _alive(pid)}

    async def live_instances(self, *, within_s: float) -> int:
        query = sa.select(sa.func.count()).select_from(instances).where(instances.c.seen_at > _NOW - _seconds("w"))
        async with self.engine.connect() as conn:
            return int((await conn.execute(query, {"w": within_s})).scalar_one())

    async def holdings(self, *, within_s: float) -> dict[str, tuple[int, int]]:
        """Every instance seen within `within_s` (by token): how many unexpired leases it holds, and its
        capacity (`max_accounts`, 0: no limit)."""
        held = sa.func.count(leases.c.account)
        query = (sa.select(instances.c.token, held, instances.c.max_accounts)
                 .select_from(instances.outerjoin(leases, (leases.c.token == instances.c.token)
                                                  & (leases.c.expires_at > _NOW)))
                 .where(instances.c.seen_at > _NOW - _seconds("w"))
                 .group_by(instances.c.token, instances.c.max_accounts))
        async with self.engine.connect() as conn:
            return {r[0]: (int(r[1]), int(r[2])) for r in (await conn.execute(query, {"w": within_s})).all()}

    async def view(self) -> list[LeaseView]:
        live = (sa.select(sa.func.count()).select_from(_positions)
                .where(_positions.c.account == leases.c.account, _positions.c.state.in_(_LIVE_STATES))
                .scalar_subquery())
        query = sa.select(leases.c.account, leases.c.owner, leases.c.token, leases.c.epoch,
                          sa.func.extract("epoch", _NOW - leases.c.acquired_at),
                          sa.func.extract("epoch", leases.c.expires_at - _NOW), leases.c.release_requested,
                          live).order_by(leases.c.account)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [LeaseView(account=r[0], owner=r[1] if r[2] is not None else None, epoch=r[3],
                          held=r[2] is not None and r[5] is not None and float(r[5]) > 0,
                          lease_age_s=float(r[4]) if r[2] is not None and r[4] is not None else None,
                          expires_in_s=float(r[5]) if r[2] is not None and r[5] is not None else None,
                          release_requested=bool(r[6]), positions=int(r[7])) for r in rows]


def host_key() -> str:
    """This host as far as process ids mean anything: its name, its kernel's boot id (two machines cloned with one
    host name differ there, and so does one machine after a reboot) and its pid namespace (two containers that
    share a host name and a kernel but not a pid namespace differ there). Without a boot id nothing is "here":
    no lease is ever taken early."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return f"unknown {uuid.uuid4()}"
    return f"{socket.gethostname()} {boot} {namespace}"[:255]


def _lock_timeout(error: sa.exc.DBAPIError) -> bool:
    """PostgreSQL's lock_not_available (55P03): a lock not granted within lock_timeout."""
    orig = error.orig
    return getattr(orig, "sqlstate", None) == "55P03" or getattr(orig, "pgcode", None) == "55P03" or \
        "LockNotAvailable" in type(getattr(orig, "__cause__", None) or orig).__name__


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def fences_broken(conn: sa.Connection, fences: Sequence[Fence]) -> set[Fence]:
    """Inside a write transaction (a synchronous connection: the repository's writes run as one synchronous
    function, see `db.repository`): the fences that no longer hold (the lease taken over, released or expired).
    The rows of those that hold are locked `FOR KEY SHARE` until the transaction ends: a takeover (FOR UPDATE)
    waits for it, a renewal does not."""
    accounts = sorted({f.account for f in fences})
    query = (sa.select(leases.c.account, leases.c.token, leases.c.epoch)
             .where(leases.c.account.in_(accounts), leases.c.expires_at > _NOW)
             .order_by(leases.c.account)
             .with_for_update(key_share=True, read=True))
    holding = {(r[0], r[1], r[2]) for r in conn.execute(query).all()}
    return {f for f in fences if (f.account, f.token, f.epoch) not in holding}
