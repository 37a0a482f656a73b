"""Crashes and shutdowns of a real service process.

The service runs in a child process (tests/crash_child.py: the real `Service` over ccxt and a SQLite
file); the simulator runs here and kills that process (SIGKILL) at a chosen REST call, before the venue
carries it out or after it did but before the answer is sent, at every step of opening, moving a stop
and closing. A new service then starts on the same database, and the venue's own books and the database
must show: no duplicated order, no orphan order, no position without exactly one stop, a consistent
journal. SIGTERM must stop the process cleanly, finishing work in flight and leaving stops in place.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from db.repository import Repository
from exchange.sim.server import SimServer
from exchange.sim.venue import Account
from lifecycle.app.service import Service
from lifecycle.domain import CloseCause, Side
from lifecycle.machines.states import PositionState as S
from lifecycle.records import JsonlRecords
from tests.crash_child import LIVE, open_command, service_config
from tests.invariants import violations
from tests.livekit import Rig

ROOT = Path(__file__).resolve().parent.parent
ACTIVATION = D(60300)  # BTCUSDT starts at 60,000 on the simulator


@dataclass
class World:
    sim: SimServer
    account: Account
    db: str
    records: Path
    logs: Path

    async def open_position(self) -> str:
        """A protected BTCUSDT long with a trailing plan, opened by an in-process engine that then stops."""
        rig = await Rig(self.sim, self.account, self.db, self.records, config=LIVE).start()
        try:
            position = await rig.open(open_command("BTCUSDT", ACTIVATION))
            return position.id
        finally:
            await rig.stop()

    async def spawn(self, do: str, *, drain_s: float = 10.0) -> Child:
        env = {**os.environ, "LIFECYCLE_SIM_API_KEY": self.account.api_key,
               "LIFECYCLE_SIM_SECRET": self.account.secret, "PYTHONPATH": str(ROOT)}
        log = open(self.logs / f"child-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 (closed by Child)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.crash_child", "--urls", json.dumps(self.sim.ccxt_urls()), "--db", self.db,
            "--records", str(self.records), "--do", do, "--drain-s", str(drain_s), cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=log)
        return Child(proc, log)

    async def restart(self) -> Service:
        """A new service process's start (recovery and the orphan sweep), here in the test process."""
        return await Service(service_config(self.sim.ccxt_urls(), self.account.api_key, self.account.secret,
                                            self.db, self.records, ["BTCUSDT"])).start()

    async def converged(self, timeout: float = 15.0) -> list[str]:
        """Wait until the venue and the database satisfy every invariant; the problems left otherwise."""
        repo = await Repository.open(self.db, run_migrations=False)
        try:
            deadline = time.monotonic() + timeout
            while True:
                problems = await violations(self.sim, self.account, repo)
                if not problems or time.monotonic() > deadline:
                    return problems
                await asyncio.sleep(0.1)
        finally:
            await repo.close()

    async def settled_in(self, states: set[S], also: Callable[[Any], bool] = lambda p: True,
                         timeout: float = 15.0) -> Any:
        """The one position, once it is in one of `states` and `also` holds (AssertionError otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            [position] = await self.positions()
            if position.state in states and also(position):
                return position
            if time.monotonic() > deadline:
                raise AssertionError(f"position {position.id} is {position.state}, expected one of {states}")
            await asyncio.sleep(0.1)

    async def positions(self) -> list:
        repo = await Repository.open(self.db, run_migrations=False)
        try:
            return await repo.list_positions([self.account.name])
        finally:
            await repo.close()


@dataclass
class Child:
    proc: asyncio.subprocess.Process
    log: object

    async def line(self, prefix: str, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not raw:
                raise AssertionError(f"child ended (code {await self.proc.wait()}) before printing {prefix}")
            text = raw.decode().strip()
            if text.startswith(prefix):
                return text

    async def exit_code(self, timeout: float = 30.0) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        finally:
            self.log.close()  # type: ignore[attr-defined]

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def world(sim: SimServer, tmp_path: Path) -> AsyncIterator[World]:
    logs = tmp_path / "logs"
    logs.mkdir()
    yield World(sim, sim.venue.add_account("crash"), f"sqlite:///{tmp_path / 'crash.sqlite'}",
                tmp_path / "records", logs)


# (step, REST call the process dies at, before/after the venue carries it out, what the test does, and what
# the database and the venue hold at the kill: (state, venue holds the position, working stops on the venue))
CRASHES = [
    ("open: entry sent, never reached the venue", "POST /fapi/v1/order", "before", "open", (S.OPENING, False, 0)),
    ("open: entry filled, answer lost", "POST /fapi/v1/order", "after", "open", (S.OPENING, True, 0)),
    ("open: first stop sent, never reached the venue", "POST /fapi/v1/algoOrder", "before", "open", (S.OPEN, True, 0)),
    ("open: first stop placed, answer lost", "POST /fapi/v1/algoOrder", "after", "open", (S.OPEN, True, 1)),
    ("move: new stop sent, never reached the venue", "POST /fapi/v1/algoOrder", "before", "trail",
     (S.TS_ACTIVE, True, 1)),
    ("move: new stop placed, old one not yet cancelled", "POST /fapi/v1/algoOrder", "after", "trail",
     (S.TS_ACTIVE, True, 2)),
    ("move: old stop cancelled, answer lost", "DELETE /fapi/v1/algoOrder", "after", "trail", (S.TS_ACTIVE, True, 1)),
    ("close: close sent, never reached the venue", "POST /fapi/v1/order", "before", "close",
     (S.CLOSING_BY_BOT, True, 1)),
    ("close: close filled, answer lost", "POST /fapi/v1/order", "after", "close", (S.CLOSING_BY_BOT, False, 1)),
    ("close: terminal, the stop's cancellation not yet sent", "DELETE /fapi/v1/algoOrder", "before", "close",
     (S.CLOSED, False, 1)),
]


@pytest.mark.parametrize(("step", "call", "when", "action", "at_kill"), CRASHES,
                         ids=[c[0].replace(" ", "_") for c in CRASHES])
async def test_a_process_killed_at_each_step_recovers_to_a_safe_state(
        world: World, step: str, call: str, when: str, action: str, at_kill: tuple[S, bool, int]) -> None:
    existing = await world.open_position() if action in {"trail", "close"} else None
    # Binance and the simulator expire a reduce-only stop once its symbol is flat; keeping it makes the
    # crash after a close leave a real orphan that the restart must remove.
    world.sim.set_faults(keep_stops_when_flat=action == "close")
    do = {"open": f"open:BTCUSDT:{ACTIVATION}", "trail": "idle", "close": f"close:{existing}"}[action]
    child = await world.spawn(do)
    try:
        world.sim.set_faults(signal_on=call, signal_when=when, signal_pid=child.proc.pid,
                             signal_num=int(signal.SIGKILL))
        await child.line("READY")
        if action == "trail":
            world.sim.venue.set_mark("BTCUSDT", D(60400))  # past the activation: the stop moves up
        code = await child.exit_code()
    finally:
        child.kill()
    assert code == -signal.SIGKILL, f"{step}: the process was not killed at {call} (exit {code})"
    assert world.sim.signalled == [(call.split()[0], call.split()[1], when, int(signal.SIGKILL))]
    [killed] = await world.positions()
    holds = world.sim.venue.position(world.account, "BTCUSDT").amount != 0
    stops = len([a for a in world.sim.venue.open_algos(world.account, "BTCUSDT") if a.order_type == "STOP_MARKET"])
    assert (killed.state, holds, stops) == at_kill, f"{step}: not the step the test claims"

    if action == "trail":
        world.sim.venue.set_mark("BTCUSDT", D(60600))  # the market moves on while the process is down

    def trailed(p: Any) -> bool:  # trailing resumed after the restart from the new high: 60,600 less 0.5 %
        return p.stop_price is not None and p.stop_price >= D("60297")

    if action == "open":
        expected = {S.CANCELLED} if "entry sent" in step else {S.OPEN}
    else:
        expected = {S.TS_ACTIVE} if action == "trail" else {S.CLOSED}
    world.sim.set_faults(rest_latency_ms=300 if action == "trail" else 0)  # marks arrive before recovery ends
    service = await world.restart()
    world.sim.set_faults(rest_latency_ms=0)
    try:
        position = await world.settled_in(expected, trailed if action == "trail" else lambda p: True)
        problems = await world.converged()
        assert problems == [], f"{step}: {problems}"
        if position.state is S.CLOSED:
            assert position.close_cause is CloseCause.BOT
    finally:
        await service.stop()
    assert await world.converged(timeout=0) == [], f"{step}: after the restarted service stopped"
    # Nothing was sent before the restarted service's recovery had reconciled.
    records = JsonlRecords(world.records)
    recovered = records.read("recovery")[-1]  # the restarted service's (the killed one wrote one too)
    moves = [r for r in records.read("stop_move") if r["at"] > killed.updated_at.isoformat()]
    assert all(r["at"] >= recovered["at"] for r in moves), f"{step}: a stop moved before recovery: {moves}"
    if action == "trail":
        assert moves, f"{step}: the stop never moved after the restart"


async def test_sigterm_stops_the_service_cleanly_and_leaves_the_stop_in_place(world: World) -> None:
    pid = await world.open_position()
    child = await world.spawn("idle")
    try:
        await child.line("READY")
        child.proc.send_signal(signal.SIGTERM)
        await child.line("STOPPED")
        code = await child.exit_code()
    finally:
        child.kill()
    assert code == 0
    assert await world.converged(timeout=0) == []
    [position] = await world.positions()
    assert (position.id, position.state) == (pid, S.OPEN)
    log = b"".join(p.read_bytes() for p in world.logs.iterdir()).decode()
    assert "SIGTERM received: stopping" in log and "live positions left protected on the exchange" in log


async def test_sigterm_during_a_close_lets_the_close_finish(world: World) -> None:
    await world.open_position()
    [position] = await world.positions()
    child = await world.spawn(f"close:{position.id}")
    try:
        # SIGTERM arrives while the close order is on its way; the venue carries it out after.
        world.sim.set_faults(signal_on="POST /fapi/v1/order", signal_when="before", signal_pid=child.proc.pid,
                             signal_num=int(signal.SIGTERM))
        await child.line("STOPPED")
        code = await child.exit_code()
    finally:
        child.kill()
    assert code == 0
    assert world.sim.signalled == [("POST", "/fapi/v1/order", "before", int(signal.SIGTERM))]
    [stored] = await world.positions()
    assert (stored.state, stored.close_cause) == (S.CLOSED, CloseCause.BOT)  # finished before the exit
    assert await world.converged(timeout=0) == []
    assert world.sim.venue.position(world.account, "BTCUSDT").amount == 0


async def test_sigterm_during_a_stop_move_lets_the_move_finish(world: World) -> None:
    await world.open_position()
    child = await world.spawn("idle")
    try:
        world.sim.set_faults(signal_on="POST /fapi/v1/algoOrder", signal_when="before", signal_pid=child.proc.pid,
                             signal_num=int(signal.SIGTERM))
        await child.line("READY")
        world.sim.venue.set_mark("BTCUSDT", D(60400))
        await child.line("STOPPED")
        code = await child.exit_code()
    finally:
        child.kill()
    assert code == 0
    assert world.sim.signalled == [("POST", "/fapi/v1/algoOrder", "before", int(signal.SIGTERM))]
    assert await world.converged(timeout=0) == []  # exactly one stop, the one the database records
    [stored] = await world.positions()
    assert stored.state is S.TS_ACTIVE and stored.stop_price is not None and stored.stop_price > D(59400)
    assert stored.side is Side.LONG
