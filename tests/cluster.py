"""Several real `lifecycle run` processes sharing the accounts of one PostgreSQL database (issue 14).

The simulator runs in the test process with one simulated account per configured account (its own key,
positions, orders and user stream); each service is a child process started with the real command line,
named by `LIFECYCLE_CLUSTER__INSTANCE`, with its own control API port and log. The database may be reached
through a `Cut`, a TCP relay the test can sever (the database "unreachable" from that process only).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from db.engine import create_engine
from db.leases import LeaseStore, LeaseView
from db.repository import Repository
from exchange.sim.server import SimServer
from exchange.sim.venue import Account
from tests.invariants import violations

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "cluster-test-token-0123456789"
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0,
                     every: float = 0.1) -> Any:
    """`check()`'s first truthy answer; AssertionError naming `what` (and the last answer) after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"not within {timeout:g} s: {what} (last: {last!r})")


@dataclass
class Member:
    name: str
    proc: asyncio.subprocess.Process
    port: int
    log: Path
    cut: Cut | None = None

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def metrics(self) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/metrics",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return str(answer.read().decode())

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read() or b"null")


class Cut:
    """A TCP relay to PostgreSQL that the test can sever: `cut()` drops every relayed connection and
    stalls new ones (the database unreachable: connects hang, as behind a dead network); `mend()` ends it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listen_port = 0
        self.severed = False
        self._server: asyncio.Server | None = None
        self._pairs: set[asyncio.StreamWriter] = set()

    async def start(self) -> Cut:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while self.severed:
            await asyncio.sleep(0.05)  # held, unanswered
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        self._pairs |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if self.severed:
                        return
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._pairs -= {writer, up_writer}

    def cut(self) -> None:
        self.severed = True
        for w in list(self._pairs):
            transport = w.transport
            transport.abort()

    def mend(self) -> None:
        self.severed = False

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Cluster:
    sim: SimServer
    pg_url: str
    tmp: Path
    accounts: dict[str, Account] = field(default_factory=dict)
    members: dict[str, Member] = field(default_factory=dict)
    lease_s: float = 3.0
    renew_s: float = 0.5
    margin_s: float = 0.5
    max_accounts: int = 0
    sync_interval_s: float | None = 2.0  # None: the default schedule

    def setup(self, count: int) -> Cluster:
        for i in range(count):
            name = f"acct{i:02d}"
            self.accounts[name] = self.sim.venue.add_account(name)
        lines = [f'database_url = "{self.pg_url}"', "shutdown_drain_s = 5", "",
                 "[cluster]", f"lease_s = {self.lease_s}", f"renew_s = {self.renew_s}",
                 f"margin_s = {self.margin_s}", f"max_accounts = {self.max_accounts}", ""]
        if self.sync_interval_s is not None:
            lines += ["[schedule]", f"sync_interval_s = {self.sync_interval_s}", ""]
        urls = ", ".join(f'"{k}" = "{v}"' for k, v in self.sim.ccxt_urls().items())
        for name in self.accounts:
            lines += ["[[accounts]]", f'name = "{name}"', f"symbols = {json.dumps(list(SYMBOLS))}",
                      f"urls = {{ {urls} }}", f'api_key_env = "SIMKEY_{name.upper()}"',
                      f'secret_env = "SIMSECRET_{name.upper()}"', "rate_limit = false", ""]
        (self.tmp / "lifecycle.toml").write_text("\n".join(lines))
        return self

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
        env.update({"PYTHONPATH": str(ROOT), "LIFECYCLE_API_TOKEN": TOKEN,
                    "LIFECYCLE_RECORDS__DIR": str(self.tmp / "records")})
        for name, account in self.accounts.items():
            env[f"SIMKEY_{name.upper()}"] = account.api_key
            env[f"SIMSECRET_{name.upper()}"] = account.secret
        return env

    async def spawn(self, name: str, *, through_cut: bool = False) -> Member:
        port = free_port()
        env = self.env()
        env.update({"LIFECYCLE_CLUSTER__INSTANCE": name, "LIFECYCLE_API__PORT": str(port),
                    "LIFECYCLE_LOG_DIR": str(self.tmp / "logs" / name)})
        cut = None
        if through_cut:
            url = make_url(self.pg_url)
            cut = await Cut(url.host or "127.0.0.1", url.port or 5432).start()
            env["LIFECYCLE_DATABASE_URL"] = url.set(port=cut.listen_port).render_as_string(hide_password=False)
        log = self.tmp / f"{name}.stderr"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lifecycle.app.cli", "run", "-c", str(self.tmp / "lifecycle.toml"), cwd=self.tmp,
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115 - the child owns it
        member = self.members[name] = Member(name, proc, port, log, cut)
        return member

    async def running(self, member: Member, timeout: float = 60.0) -> None:
        async def up() -> bool:
            if not member.alive:
                raise AssertionError(f"{member.name} exited with {member.proc.returncode}:\n{member.text()[-3000:]}")
            return "service running" in member.text()
        await wait_until(up, f"{member.name} running", timeout)

    async def leases(self) -> list[LeaseView]:
        engine = create_engine(self.pg_url)
        try:
            return await LeaseStore(engine).view()
        finally:
            await engine.dispose()

    async def owners(self) -> dict[str, str | None]:
        """account -> the instance holding a live lease on it (None: nobody)."""
        return {v.account: (v.owner if v.held else None) for v in await self.leases()}

    async def serving(self, names: set[str]) -> dict[str, set[str]]:
        """instance -> the accounts its control API says it runs (what the process itself believes)."""
        out: dict[str, set[str]] = {}
        for name in names:
            member = self.members[name]
            if not member.alive:
                continue
            try:
                health = await asyncio.to_thread(member.api, "GET", "/health")
            except OSError:
                continue
            # Listed and running: an account still starting (health says "not started") refuses commands.
            out[name] = {a for a, state in health.get("accounts", {}).items()
                         if "not started" not in state.get("reasons", [])}
        return out

    async def settled(self, expect: set[str] | None = None) -> dict[str, str | None]:
        """Every account held by one of `expect` (default: the live members), and each such process serving
        exactly the accounts the lease table gives it."""
        expect = expect or {n for n, m in self.members.items() if m.alive}
        owners = await self.owners()
        if any(owner not in expect for owner in owners.values()) or set(owners) != set(self.accounts):
            return {}
        serving = await self.serving(expect)
        for name in expect:
            mine = {a for a, o in owners.items() if o == name}
            if serving.get(name) != mine:
                return {}
        return owners

    async def violations(self, names: list[str] | None = None) -> list[str]:
        """The money invariants of these accounts (default: all), each problem prefixed with its account."""
        repo = await Repository.open(self.pg_url, run_migrations=False)
        try:
            problems: list[str] = []
            for account in [self.accounts[n] for n in (names if names is not None else self.accounts)]:
                problems += [f"{account.name}: {p}" for p in await violations(self.sim, account, repo)]
            return problems
        finally:
            await repo.close()

    async def converged(self, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            problems = await self.violations()
            if not problems or time.monotonic() > deadline:
                return problems
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        for member in self.members.values():
            if member.alive:
                member.signal(signal.SIGCONT)
                member.signal(signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await member.wait(10)
            if member.cut is not None:
                await member.cut.stop()
