"""Account leases on PostgreSQL (issue 14): acquisition rules by the database's clock, and the fence on every
write path (a stale owner's write fails, never overwrites; in a group commit it fails alone)."""
from __future__ import annotations

import asyncio
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
