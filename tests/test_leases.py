"""Account leases on PostgreSQL (issue 14): acquisition rules by the database's clock, and the fence on every
write path (a stale owner's write fails, never overwrites; in a group commit it fails alone)."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from decimal import Decimal as D
from pathlib import Path

import pytest

from db.leases import Fence, LeaseStore
from db.repository import FencedStore, Repository
from exchange import errors
from exchange.ccxt_adapter import CcxtExchange
from exchange.paper import PaperExchange
from exchange.sim.server import SimServer
from lifecycle.app.leases import ClusterConfig
from lifecycle.domain import OrderPurpose, OrderRef, OrderStatus, Side, utcnow
from lifecycle.engine import Engine
from lifecycle.errors import LeaseLost, StorageUnavailable
from lifecycle.events import EntryFilled, StopMoved
from lifecycle.records import JsonlRecords
from tests.test_ccxt_adapter import settings_for

pytestmark = pytest.mark.postgres

LEASE, MARGIN = 0.6, 0.2


@pytest.fixture
async def pg_repo(pg_url: str) -> AsyncIterator[Repository]:
    repo = await Repository.open(pg_url)
    yield repo
    await repo.close()


async def _take(store: LeaseStore, account: str, token: str, timeout: float = 10.0, lease: float = LEASE) -> Fence:
    """The lease, as soon as the rules let `token` take it."""
    deadline = time.monotonic() + timeout
    while (taken := await store.acquire(account, owner=token, token=token, lease_s=lease, margin_s=MARGIN)) is None:
        assert time.monotonic() < deadline, f"{token} could not take {account}"
        await asyncio.sleep(0.02)
    return Fence(account, token, taken.epoch)


async def test_a_held_lease_is_taken_only_after_its_expiry_and_the_margin_a_released_one_at_once(
        pg_repo: Repository) -> None:
    store = LeaseStore(pg_repo.engine)
    await store.ensure(["x"])
    first = await _take(store, "x", "a")
    assert first.epoch == 1
    assert await store.acquire("x", owner="b", token="b", lease_s=LEASE, margin_s=MARGIN) is None
    wait = (await store.next_free_at(["x"], margin_s=MARGIN))["x"]
    assert LEASE < wait <= LEASE + MARGIN
    began = time.monotonic()
    second = await _take(store, "x", "b")
    assert time.monotonic() - began >= LEASE + MARGIN - 0.1 and second.epoch == 2  # not before expiry + margin
    assert await store.renew(["x"], token="a", lease_s=LEASE) == []  # the old owner's renewal: refused
    assert [r.account for r in await store.renew(["x"], token="b", lease_s=LEASE)] == ["x"]
    assert await store.request_release("x") == "b"
    [renewed] = await store.renew(["x"], token="b", lease_s=LEASE)
    assert renewed.release_requested
    assert await store.release(["x"], token="b") == ["x"]
    third = await _take(store, "x", "c", timeout=0.5)  # free at once
    assert third.epoch == 3
    [view] = await store.view()
    assert (view.owner, view.epoch, view.held, view.release_requested) == ("c", 3, True, False)
    with pytest.raises(KeyError):
        await store.request_release("nobody")


async def test_a_stale_owner_cannot_write_any_row_after_a_takeover(pg_repo: Repository, tmp_path: Path) -> None:
    store = LeaseStore(pg_repo.engine)
    await store.ensure(["acct"])
    old = await _take(store, "acct", "old")
    engine = Engine(FencedStore(pg_repo, old), canceller=PaperExchange(), records=JsonlRecords(tmp_path))
    position = await engine.open_position(account="acct", symbol="BTCUSDT", side=Side.LONG, quantity=D("0.5"))
    await engine.fire(position.id, EntryFilled(quantity=D("0.5"), price=D(100)))
    await _take(store, "acct", "new")  # the old owner's lease expired and was taken over
    stored = await pg_repo.get_position(position.id)
    with pytest.raises(LeaseLost):
        await engine.fire(position.id, StopMoved(stop_price=D(95), mark=D(100)))
    with pytest.raises(LeaseLost):
        await engine.store.save_order(OrderRef("c1", position.id, "BTCUSDT", OrderPurpose.STOP, "sell", D("0.5"),
                                               OrderStatus.OPEN, D(95), None, None, utcnow()), utcnow())
    with pytest.raises(StorageUnavailable, match="LeaseLost"):  # no new exposure either
        await engine.open_position(account="acct", symbol="ETHUSDT", side=Side.LONG, quantity=D(1))
    assert await pg_repo.get_position(position.id) == stored  # nothing written
    assert len(await pg_repo.journal(position.id)) == 2
    assert await pg_repo.list_positions(["acct"]) == [stored]


async def test_in_a_group_commit_the_stale_owners_transitions_fail_alone(pg_repo: Repository, tmp_path: Path) -> None:
    store = LeaseStore(pg_repo.engine)
    await store.ensure(["stale", "fine"])
    fences = {"stale": await _take(store, "stale", "me"), "fine": await _take(store, "fine", "me", lease=60)}
    engines = {name: Engine(FencedStore(pg_repo, fence), canceller=PaperExchange(), records=JsonlRecords(tmp_path))
               for name, fence in fences.items()}
    ids: dict[str, list[str]] = {name: [] for name in engines}
    for name, engine in engines.items():
        for i in range(10):
            p = await engine.open_position(account=name, symbol=f"S{i}USDT", side=Side.LONG, quantity=D(1))
            await engine.fire(p.id, EntryFilled(quantity=D(1), price=D(100)))
            ids[name].append(p.id)
    await _take(store, "stale", "someone-else")
    results = await asyncio.gather(*(engines[name].fire(pid, StopMoved(stop_price=D(95), mark=D(100)))
                                     for name in ("stale", "fine") for pid in ids[name]), return_exceptions=True)
    assert pg_repo.batch_stats.largest > 2  # they did share transactions
    assert all(isinstance(r, LeaseLost) for r in results[:10]), results[:10]
    assert not any(isinstance(r, BaseException) for r in results[10:]), results[10:]
    assert {(await pg_repo.get_position(pid)).stop_price for pid in ids["fine"]} == {D(95)}  # type: ignore[union-attr]
    assert {(await pg_repo.get_position(pid)).stop_price for pid in ids["stale"]} == {None}  # type: ignore[union-attr]


async def test_an_exchange_client_whose_lease_ran_out_sends_no_order(sim: SimServer) -> None:
    account = sim.venue.add_account("gated")
    exchange = await CcxtExchange(settings_for(sim, account)).start()
    acting = True
    exchange.may_act = lambda: acting
    try:
        await exchange.place_entry("BTCUSDT", Side.LONG, D("0.01"), "lc-entry-1")
        acting = False
        with pytest.raises(errors.NotOwner):
            await exchange.place_stop("BTCUSDT", Side.LONG, D("0.01"), D(50000), "lc-stop-1")
        assert len(await exchange.positions(["BTCUSDT"])) == 1  # reading goes on
        assert [r[2] for r in sim.order_requests["gated"]] == ["order"]  # the stop never reached the venue
        assert not account.algos
    finally:
        await exchange.close()


def test_cluster_timings_that_cannot_hold_a_lease_are_refused() -> None:
    with pytest.raises(ValueError, match="lease_s"):
        ClusterConfig("a", lease_s=5, renew_s=2, margin_s=2)
    ClusterConfig("a", lease_s=6, renew_s=2, margin_s=2)


# --- the lease keeper, in this process (its start/stop callbacks record what they are asked) -------------------

FAST = {"lease_s": 1.5, "renew_s": 0.25, "margin_s": 0.5}


class Recorder:
    def __init__(self, stop_s: float = 0.0) -> None:
        self.running: set[str] = set()
        self.handed: list[str] = []
        self.stop_s = stop_s

    async def start(self, account: str, held: object) -> None:
        self.running.add(account)

    async def stop(self, account: str, graceful: bool) -> None:
        if graceful:
            self.handed.append(account)
            await asyncio.sleep(self.stop_s)
        self.running.discard(account)


async def _keeper(repo: Repository, name: str, accounts: list[str], recorder: Recorder, **config: object) -> object:
    from lifecycle.app.leases import LeaseKeeper

    cluster = ClusterConfig(name, **{**FAST, **config})  # type: ignore[arg-type]
    return await LeaseKeeper(LeaseStore(repo.engine), cluster, accounts, start=recorder.start,
                             stop=recorder.stop).start()


async def _until(check: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_writer_stuck_in_its_transaction_stalls_no_takeover_and_no_renewal(pg_url: str) -> None:
    """Review finding: a process frozen or cut off between its fence check and its commit held the lease row
    FOR SHARE, and every other process's acquisition (and `lifecycle accounts release`) waited on it for good."""
    from db.engine import create_engine
    from db.leases import fences_broken

    repo = await Repository.open(pg_url)
    stuck_engine = create_engine(pg_url, idle_in_transaction_s=1.5)  # the server ends the stuck session
    try:
        store = LeaseStore(repo.engine, lock_timeout_s=0.2)
        await store.ensure(["x"])
        owner = await _take(store, "x", "old")
        conn = await stuck_engine.connect()
        transaction = await conn.begin()
        assert await conn.run_sync(fences_broken, [owner]) == set()  # the old owner is mid-write, then goes silent
        began = time.monotonic()
        assert [r.account for r in await store.renew(["x"], token="old", lease_s=LEASE)] == ["x"]  # not blocked
        assert await store.request_release("x") == "old"  # not blocked either
        assert time.monotonic() - began < 1.0
        await asyncio.sleep(LEASE + MARGIN)
        began = time.monotonic()
        assert await store.acquire("x", owner="new", token="new", lease_s=LEASE, margin_s=MARGIN) is None
        assert time.monotonic() - began < 1.0  # "not free yet", at once: the writer still holds the row
        taken = await _take(store, "x", "new", timeout=10)  # once the server has ended the stuck session
        assert taken.epoch == owner.epoch + 1
        [view] = await store.view()
        assert view.held and view.expires_in_s is not None and view.expires_in_s > LEASE / 2  # dated now
        with contextlib.suppress(Exception):
            await transaction.rollback()
        with contextlib.suppress(Exception):
            await conn.close()
    finally:
        await stuck_engine.dispose()
        await repo.close()


async def test_an_instance_at_its_capacity_is_handed_nothing_and_nothing_flaps(pg_repo: Repository) -> None:
    """Review finding: with one process limited to 1 account, the others handed accounts over that it could
    never take, took them back beyond their share and handed them over again, for good."""
    accounts = [f"acct{i}" for i in range(9)]
    recorders = {n: Recorder() for n in ("a", "b", "c")}
    keepers = [await _keeper(pg_repo, "a", accounts, recorders["a"]),
               await _keeper(pg_repo, "b", accounts, recorders["b"]),
               await _keeper(pg_repo, "c", accounts, recorders["c"], max_accounts=1)]
    try:
        def settled() -> bool:
            running = [r.running for r in recorders.values()]
            return sum(map(len, running)) == 9 and len(set().union(*running)) == 9 and len(running[2]) == 1
        await _until(settled, "9 accounts held once, c holding 1")
        handed = sum(len(r.handed) for r in recorders.values())
        await asyncio.sleep(3.0)  # twelve passes
        assert sum(len(r.handed) for r in recorders.values()) == handed, {n: r.handed for n, r in recorders.items()}
        assert settled()
    finally:
        for keeper in keepers:
            await keeper.close()  # type: ignore[attr-defined]


async def test_a_lone_keeper_takes_no_more_than_max_accounts(pg_repo: Repository) -> None:
    """Review finding: the first pass at start and the claim loop's own first pass ran at once."""
    recorder = Recorder()
    keeper = await _keeper(pg_repo, "a", [f"acct{i}" for i in range(6)], recorder, max_accounts=3)
    try:
        await asyncio.sleep(1.0)
        assert len(recorder.running) == 3
    finally:
        await keeper.close()  # type: ignore[attr-defined]


async def test_leases_are_still_renewed_while_a_stop_waits_for_a_slow_hand_over(pg_repo: Repository) -> None:
    """Review finding: SIGTERM during a hand-over stopped the renewals, and the process's other accounts were
    lost (CRITICAL) instead of handed back."""
    recorder = Recorder(stop_s=3.0)  # a drain longer than the lease
    keeper = await _keeper(pg_repo, "a", ["slow", "other"], recorder)
    try:
        await _until(lambda: recorder.running == {"slow", "other"}, "both started")
        await LeaseStore(pg_repo.engine).request_release("slow")
        await _until(lambda: recorder.handed == ["slow"], "the hand-over begun")
        await keeper.close()  # type: ignore[attr-defined]
        assert keeper.stats.lost == 0  # type: ignore[attr-defined]
        assert "other" in keeper.held and keeper.held["other"].acting()  # type: ignore[attr-defined]
    finally:
        await keeper.close()  # type: ignore[attr-defined]


def test_the_host_key_names_the_boot_so_cloned_machines_differ() -> None:
    """Review finding: host name + pid namespace is the same on every machine's initial namespace."""
    from db.leases import host_key

    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert boot in host_key()
