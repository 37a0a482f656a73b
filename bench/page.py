"""The live page with many positions, measured in a real browser (headless Chromium, Debian's package).

The service runs on the embedded simulator (SQLite, the control API and page on a free loopback port) with
N live positions on N symbols. A browser logs in and loads the page; then the marks of every symbol move
once a second (a `status` message updates every row's mark, PnL and age) while positions are closed in small
bursts (`update` messages: rows removed, ended rows added, diagram counts).

Figures, printed:
* first render: from the navigation's start to the first frame painted after the snapshot was handled
  (page load, WebSocket connect, the server's snapshot, the table of N rows), and the snapshot's handling
  plus that frame alone;
* per update, the time from the message's arrival to the next frame painted (handling, style and layout),
  p50 / p99 / max, by message type.

Run: python -m bench.page [--positions 1000] [--seconds 20] [--closes 100]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from decimal import Decimal as D
from pathlib import Path
from typing import Any

from loguru import logger

from exchange.sim.server import SimServer
from exchange.sim.venue import Venue, VenueConfig
from lifecycle.app.service import Service
from lifecycle.app.settings import Settings, service_config
from lifecycle.domain import CloseReason, Side
from lifecycle.live import OpenCommand
from tests import browser

TOKEN = "bench-page-token"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run(positions: int, seconds: float, closes: int) -> None:
    reason = browser.missing()
    if reason:
        raise SystemExit(f"no browser: {reason}")
    work = Path(tempfile.mkdtemp(prefix="bench-page-"))
    config = VenueConfig.with_symbols(positions)
    sim = await SimServer(Venue(config), mark_interval_s=1.0).start()
    account = sim.venue.add_account("bench")
    os.environ.update(BENCH_KEY=account.api_key, BENCH_SECRET=account.secret, LIFECYCLE_API_TOKEN=TOKEN)
    symbols = [s.symbol for s in config.symbols]
    settings = Settings.without_environment(
        database_url=f"sqlite:///{work / 'page.sqlite'}", log_dir=work / "logs",
        accounts=[{"name": "bench", "symbols": symbols, "urls": sim.ccxt_urls(), "api_key_env": "BENCH_KEY",
                   "secret_env": "BENCH_SECRET", "rate_limit": False}],
        api={"enabled": True, "port": 0}, records={"dir": work / "records"})
    service = await Service(service_config(settings)).start()
    live = service.accounts["bench"].live
    assert live is not None and service.api is not None
    started = time.perf_counter()
    opened = []
    for chunk in range(0, positions, 50):
        batch = []
        for spec in config.symbols[chunk:chunk + 50]:
            quantity = max(spec.min_qty, (D(200) / spec.mark).quantize(spec.step))
            batch.append(live.open(OpenCommand(spec.symbol, Side.LONG, quantity, stop_loss_pct=D(5))))
        opened += await asyncio.gather(*batch)
    engine = service.accounts["bench"].engine
    while sum(1 for p in engine.positions.values() if p.stop_price is not None) < positions:
        await asyncio.sleep(0.1)
    print(f"{positions} positions open and protected in {time.perf_counter() - started:.1f} s")

    d = await asyncio.to_thread(browser.chrome, work / "chromium-profile", 1600, 1200)
    try:
        def load() -> dict[str, Any]:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            d.get(service.api.url)  # type: ignore[union-attr]
            d.find_element(By.ID, "token").send_keys(TOKEN)
            d.find_element(By.ID, "login").click()
            WebDriverWait(d, 60, 0.05).until(
                lambda d: d.execute_script("return window.lifecyclePerf.firstRenderAt") is not None)
            return dict(d.execute_script("return {perf: window.lifecyclePerf, "
                                         "rows: document.querySelectorAll('#positions tbody tr').length}"))

        first = await asyncio.to_thread(load)
        perf = first["perf"]
        print(f"first render with {first['rows']} rows: {perf['firstRenderAt']:.0f} ms from navigation start "
              f"(snapshot handled and painted in {perf['snapshotMs']:.0f} ms)")
        deadline = time.monotonic() + seconds
        step = max(1, closes // max(1, int(seconds)))
        closed = 0
        while time.monotonic() < deadline:
            for spec in config.symbols:  # every mark moves: a status message updates every row
                sim.venue.set_mark(spec.symbol, spec.mark * D(str(1 + (time.monotonic() % 7) / 1000)))
            targets = opened[closed:closed + step] if closed < closes else []
            await asyncio.gather(*(live.close(p.id, CloseReason.OPERATOR) for p in targets))
            closed += len(targets)
            await asyncio.sleep(1.0)
        updates = await asyncio.to_thread(lambda: d.execute_script("return window.lifecyclePerf.updates"))
    finally:
        await asyncio.to_thread(d.quit)
        await service.stop()
        await sim.stop()
    print(f"{closed} positions closed by the page's API in bursts of {step} over {seconds:.0f} s")
    for kind in ("status", "update"):
        frames = [u["frameMs"] for u in updates if u["type"] == kind]
        handled = [u["handleMs"] for u in updates if u["type"] == kind]
        if frames:
            print(f"{kind:>6} messages: {len(frames):4d}; to the next frame p50 {statistics.median(frames):6.1f} ms, "
                  f"p99 {pct(frames, 99):6.1f} ms, max {max(frames):6.1f} ms; handling alone p50 "
                  f"{statistics.median(handled):5.1f} ms, max {max(handled):5.1f} ms")
            slow = [round(f) for f in frames if f >= 50]
            print(f"        at or over 50 ms: {len(slow)} of {len(frames)} {slow if slow else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--closes", type=int, default=100)
    args = parser.parse_args()
    logger.remove()
    asyncio.run(run(args.positions, args.seconds, args.closes))


if __name__ == "__main__":
    main()
