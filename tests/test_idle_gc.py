"""The service's young collections at quiet moments (`lifecycle.app.service.IdleCollector`): what is due is
collected on a quiet tick, nothing on a busy one, and the middle generation when CPython would take it next."""
from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exchange.sim.server import SimServer
from lifecycle.app.service import IdleCollector, Service
from lifecycle.app.settings import load, service_config
from tests.test_service import account_block, write_config


@pytest.fixture
def thresholds() -> Iterator[None]:
    """No automatic collection during the test (it would reset the counts the test reads); restored after."""
    saved = gc.get_threshold()
    gc.set_threshold(10_000_000, saved[1], saved[2])
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def _allocate(n: int) -> list[dict[str, int]]:
    return [{"i": i} for i in range(n)]  # containers: each one counts in the young generation


def test_the_young_generation_is_collected_once_it_holds_its_share(thresholds: None) -> None:
    gc.collect(0)
    collector = IdleCollector(share=0.002)  # 20,000 of the 10,000,000 set above
    kept = _allocate(5_000)
    assert collector.collect() is None, "collected below its share"
    kept += _allocate(20_000)
    young_before = gc.get_count()[0]
    assert young_before >= 20_000
    assert collector.collect() == 0
    assert gc.get_count()[0] < young_before // 10 and collector.collections == [1, 0]
    assert len(kept) == 25_000


def test_the_middle_generation_is_collected_when_cpython_would_take_it_next(thresholds: None) -> None:
    _, middle_max, _ = gc.get_threshold()
    gc.collect(1)
    for _ in range(middle_max):  # each young collection counts one for the middle generation
        gc.collect(0)
    assert gc.get_count()[1] >= middle_max
    kept = _allocate(25_000)
    collector = IdleCollector(share=0.002)
    assert collector.collect() == 1
    assert gc.get_count()[1] == 0 and collector.collections == [0, 1]
    assert len(kept) == 25_000


async def test_a_busy_loop_is_not_collected_on_and_a_quiet_tick_collects(thresholds: None) -> None:
    gc.collect(0)
    collector = IdleCollector(every_s=0.01, share=0.002, busy_late_s=0.02)
    kept = _allocate(25_000)
    collector.start()
    try:
        time.sleep(0.1)  # the loop at work (a burst): the tick due meanwhile comes late
        deadline = time.monotonic() + 5
        while collector.skipped_busy == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert collector.skipped_busy >= 1
        assert collector.collections == [0, 0], "collected on a tick that found the loop busy"
        while collector.collections == [0, 0] and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert collector.collections[0] == 1 and gc.get_count()[0] < 25_000
    finally:
        collector.stop()
    assert len(kept) == 25_000



async def test_the_service_runs_the_collector_while_it_runs(sim: SimServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    account = sim.venue.add_account("sim")
    monkeypatch.setenv("SIM_KEY", account.api_key)
    monkeypatch.setenv("SIM_SECRET", account.secret)
    config = write_config(tmp_path / "c.toml", f'''
database_url = "sqlite:///{tmp_path / 'gc.sqlite'}"
[records]
dir = "{tmp_path / 'records'}"
[api]
enabled = false
''' + account_block(), sim.ccxt_urls())
    saved = gc.get_threshold()
    service = await Service(service_config(load(config))).start()
    try:
        collector = service.collector
        collector.every_s, collector.share = 0.01, 0.0  # every quiet tick collects: seen at once
        deadline = time.monotonic() + 5
        while sum(collector.collections) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sum(collector.collections) >= 1, "the started service's collector never ran"
    finally:
        await service.stop()
        gc.unfreeze()
        gc.set_threshold(*saved)
    ran = sum(collector.collections)
    await asyncio.sleep(0.05)  # several of its periods: a collector left running would collect again
    assert sum(collector.collections) == ran, "the collector still runs after the service stopped"
