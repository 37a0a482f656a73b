"""Issue 14: several `lifecycle run` processes share the accounts of one PostgreSQL database.

Real processes (the command line), the simulator in this process with one simulated account per configured
account, PostgreSQL on this machine. Leases are short here (3 s, margin 0.5 s) to keep the tests quick.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from exchange.sim.server import SimServer
from tests.cluster import SYMBOLS, Cluster, wait_until

pytestmark = pytest.mark.postgres


@pytest.fixture
async def cluster(sim: SimServer, pg_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(sim, pg_url, tmp_path)
    yield c
    await c.stop()


async def _balanced(cluster: Cluster, counts: dict[str, int]) -> dict[str, str | None]:
    """The owners once every account is held once, by the expected processes in the expected numbers, and each
    process serves exactly the accounts it holds ({} until then)."""
    owners = await cluster.settled(set(counts))
    return owners if owners and Counter(owners.values()) == counts else {}


async def _open_everywhere(cluster: Cluster, owners: dict[str, str | None], accounts: list[str]) -> None:
    """One protected long per listed account, opened through its owner's control API."""
    for name in accounts:
        member = cluster.members[owners[name]]  # type: ignore[index]
        await asyncio.to_thread(member.api, "POST", "/positions", {
            "account": name, "symbol": SYMBOLS[0], "side": "long", "quantity": "0.01", "stop_loss_pct": "2"})


async def test_three_processes_share_thirty_accounts_and_take_over_a_killed_one(cluster: Cluster) -> None:
    cluster.setup(30)
    members = [await cluster.spawn(name) for name in ("a", "b", "c")]
    for member in members:
        await cluster.running(member)
    owners = await wait_until(lambda: _balanced(cluster, {"a": 10, "b": 10, "c": 10}),
                              "30 accounts shared by a, b and c, 10 each", 60)
    with_positions = sorted(cluster.accounts)[::2]  # 15 accounts with a protected position
    await _open_everywhere(cluster, owners, with_positions)
    assert await cluster.converged() == []

    victim = cluster.members["b"]
    lost = sorted(a for a, o in owners.items() if o == "b")
    before = {a: len(cluster.sim.order_requests.get(a, [])) for a in cluster.accounts}
    killed = time.monotonic()
    victim.signal(signal.SIGKILL)
    await victim.wait()
    owners = await wait_until(lambda: _balanced(cluster, {"a": 15, "c": 15}), "b's accounts taken over by a and c",
                              30)
    took = time.monotonic() - killed
    assert {owners[a] for a in lost} <= {"a", "c"}
    assert await cluster.converged() == []  # exactly one stop per position, nothing duplicated
    # the takeover placed nothing new for accounts whose stops were in place (recovery found them)
    placed = {a: cluster.sim.order_requests.get(a, [])[before[a]:] for a in lost}
    assert all(not [r for r in reqs if r[1] == "POST"] for reqs in placed.values()), placed
    # within the lease, the margin, a claim pass and the recovery
    assert took < cluster.lease_s + cluster.margin_s + 10, took


async def _journal_and_order_rows(cluster: Cluster, accounts: list[str]) -> tuple[int, int]:
    import sqlalchemy as sa

    from db.repository import Repository, journal, orders, positions

    repo = await Repository.open(cluster.pg_url, run_migrations=False)
    try:
        async with repo.engine.connect() as conn:
            ids = sa.select(positions.c.id).where(positions.c.account.in_(accounts))
            rows = (await conn.execute(sa.select(sa.func.count()).select_from(journal)
                                       .where(journal.c.position_id.in_(ids)))).scalar_one()
            order_rows = (await conn.execute(sa.select(sa.func.count(), sa.func.max(orders.c.updated_at))
                                             .where(orders.c.position_id.in_(ids)))).one()
        return int(rows), hash(tuple(order_rows))
    finally:
        await repo.close()


async def test_a_frozen_process_that_lost_its_accounts_acts_on_none_of_them_when_it_wakes(cluster: Cluster) -> None:
    """SIGSTOP longer than the lease: the others take its accounts over; after SIGCONT it finds marks queued on
    its streams that would move its trailing stops (a moved them for the same mark), and sends nothing and
    writes nothing for those accounts. Which comes first on waking, the renew loop finding the leases run out
    or the trailing watch reaching the venue gate, depends on scheduling; either way nothing may go out (the
    gate alone is tested in test_leases)."""
    cluster.setup(6)
    for name in ("a", "b"):
        await cluster.running(await cluster.spawn(name))
    owners = await wait_until(lambda: _balanced(cluster, {"a": 3, "b": 3}), "6 accounts shared 3/3", 60)
    frozen = sorted(a for a, o in owners.items() if o == "b")
    for name in frozen:  # trailing plans the mark below crosses: moving their stops is what a waking b would do
        await asyncio.to_thread(cluster.members["b"].api, "POST", "/positions", {
            "account": name, "symbol": SYMBOLS[0], "side": "long", "quantity": "0.01", "stop_loss_pct": "2",
            "trailing_activation": "60100", "trailing_callback_pct": "0.5"})
    assert await cluster.converged() == []
    b = cluster.members["b"]
    b.signal(signal.SIGSTOP)
    cluster.sim.venue.set_mark("BTCUSDT", cluster.sim.venue.marks["BTCUSDT"] * 101 / 100)  # b sees it on waking
    await wait_until(lambda: _balanced(cluster, {"a": 6}), "a owns b's accounts", 30)
    await wait_until(lambda: _trailing_moved(cluster, frozen), "a moved the stops after the takeover", 30)
    assert await cluster.converged() == []
    requests = {a: len(cluster.sim.order_requests.get(a, [])) for a in frozen}
    rows = await _journal_and_order_rows(cluster, frozen)

    b.signal(signal.SIGCONT)
    await wait_until(lambda: _said(b, *(f"stops acting on {a}" for a in frozen)), "b gave its accounts up", 30)
    assert {a: len(cluster.sim.order_requests.get(a, [])) for a in frozen} == requests  # nothing sent by b
    assert await _journal_and_order_rows(cluster, frozen) == rows  # nothing written by b
    await wait_until(lambda: _balanced(cluster, {"a": 3, "b": 3}), "b back with its share", 60)
    assert await cluster.converged() == []


async def _trailing_moved(cluster: Cluster, accounts: list[str]) -> bool:
    from db.repository import Repository
    from lifecycle.machines.states import PositionState

    repo = await Repository.open(cluster.pg_url, run_migrations=False)
    try:
        live = await repo.load_live(accounts)
    finally:
        await repo.close()
    # Active and moved (a long's stop above its entry): the activation commits before the move's orders go out,
    # and the requests counted next must include the move's place and cancel (seen in CI once the commit got
    # faster: the count was taken between the activation and the move).
    return len(live) == len(accounts) and all(
        p.state is PositionState.TS_ACTIVE and p.stop_price is not None and p.entry_price is not None
        and p.stop_price > p.entry_price for p in live)


async def _said(member: object, *lines: str) -> bool:
    text = member.text()  # type: ignore[attr-defined]
    return all(line in text for line in lines)


def _log_time(text: str, needle: str) -> float:
    """Seconds since midnight of the first log line containing `needle` (the lines start HH:MM:SS.mmm)."""
    for line in text.splitlines():
        if needle in line:
            h, m, s = line.split(" ", 1)[0].split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
    raise AssertionError(f"no log line with {needle!r}")


async def test_a_process_cut_off_from_postgresql_stops_acting_before_another_takes_over(cluster: Cluster) -> None:
    cluster.setup(4)
    a = await cluster.spawn("a", through_cut=True)
    await cluster.running(a)
    await cluster.running(await cluster.spawn("b"))
    owners = await wait_until(lambda: _balanced(cluster, {"a": 2, "b": 2}), "4 accounts shared 2/2", 60)
    cut_off = sorted(x for x, o in owners.items() if o == "a")
    await _open_everywhere(cluster, owners, cut_off)
    assert await cluster.converged() == []
    assert a.cut is not None
    a.cut.cut()
    await wait_until(lambda: _balanced(cluster, {"b": 4}), "b owns a's accounts", 30)
    assert await cluster.converged() == []
    for account in cut_off:  # a had stopped by its own clock before b took over by the database's
        stopped = _log_time(a.text(), f"stops acting on {account}")
        taken = _log_time(cluster.members["b"].text(), f"took {account}")
        assert stopped < taken, (account, stopped, taken)
    health = await asyncio.to_thread(a.api, "GET", "/health")
    assert health["accounts"] == {} and health["instance"] == "a"
    a.cut.mend()
    await wait_until(lambda: _balanced(cluster, {"a": 2, "b": 2}), "a back with its share", 60)
    assert await cluster.converged() == []


async def test_sigterm_hands_the_accounts_over_without_waiting_for_the_lease(sim: SimServer, pg_url: str,
                                                                            tmp_path: Path) -> None:
    cluster = Cluster(sim, pg_url, tmp_path, lease_s=30.0, margin_s=2.0)  # a takeover by expiry would take 32 s
    try:
        cluster.setup(4)
        for name in ("a", "b"):
            await cluster.running(await cluster.spawn(name))
        owners = await wait_until(lambda: _balanced(cluster, {"a": 2, "b": 2}), "4 accounts shared 2/2", 60)
        await _open_everywhere(cluster, owners, sorted(owners))
        assert await cluster.converged() == []
        a = cluster.members["a"]
        asked = time.monotonic()
        a.signal(signal.SIGTERM)
        assert await a.wait() == 0
        await wait_until(lambda: _balanced(cluster, {"b": 4}), "b owns every account", 10)
        assert time.monotonic() - asked < 10  # not the 32 s of an expiry
        assert await cluster.converged() == []
        metrics = await asyncio.to_thread(cluster.members["b"].metrics)
        assert 'lifecycle_instance_info{instance="b"} 1' in metrics
        assert 'lifecycle_leases_held{instance="b"} 4' in metrics
        records = [json.loads(line) for path in (tmp_path / "records").glob("transition-*.jsonl")
                   for line in path.read_text().splitlines()]
        assert records and {r["instance"] for r in records} == {"a", "b"}  # both wrote, each named
        assert "[a] cluster: a handed" in a.text()  # log lines carry the instance too

        # `lifecycle accounts release NAME`: the owner hands one over to the process that joins
        await cluster.running(await cluster.spawn("c"))
        await wait_until(lambda: _balanced(cluster, {"b": 2, "c": 2}), "c took its share", 30)
        moved = sorted(x for x, o in (await cluster.owners()).items() if o == "b")[0]
        listing = await _cli(cluster, "accounts")
        assert moved in listing and " b " in listing and "epoch" in listing
        said = await _cli(cluster, "accounts", "release", moved)
        assert f"b was asked to hand {moved} over" in said
        owners = await wait_until(
            lambda: _owned_by(cluster, moved, "c"), f"{moved} moved from b to c", 15)
        assert owners[moved] == "c"
        assert await cluster.converged() == []
    finally:
        await cluster.stop()


async def _owned_by(cluster: Cluster, account: str, owner: str) -> dict[str, str | None]:
    owners = await cluster.settled({"b", "c"})
    return owners if owners.get(account) == owner else {}


async def _cli(cluster: Cluster, *args: str) -> str:
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lifecycle.app.cli", *args, "-c", str(cluster.tmp / "lifecycle.toml"),
        env=cluster.env(), cwd=cluster.tmp, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def test_a_service_restarted_after_a_crash_takes_its_accounts_back_without_waiting_out_its_lease(
        sim: SimServer, pg_url: str, tmp_path: Path) -> None:
    """Its old run's process is gone on this same host: nothing can act under that lease any more."""
    cluster = Cluster(sim, pg_url, tmp_path, lease_s=30.0, margin_s=2.0)
    try:
        cluster.setup(2)
        first = await cluster.spawn("a")
        await cluster.running(first)
        owners = await wait_until(lambda: _balanced(cluster, {"a": 2}), "a owns both", 30)
        await _open_everywhere(cluster, owners, sorted(owners))
        first.signal(signal.SIGKILL)
        await first.wait()
        restarted = time.monotonic()
        await cluster.running(await cluster.spawn("a"))
        await wait_until(lambda: _balanced(cluster, {"a": 2}), "the restarted a owns both again", 15)
        assert time.monotonic() - restarted < 15  # the old lease had ~30 s left
        assert await cluster.converged() == []
    finally:
        await cluster.stop()
