"""What cannot work stops cleanly: `lifecycle run` against the simulator with a key the venue refuses, a
symbol it does not list or a hedge-mode account exits 2 with one line naming the account and the problem
(no retry loop, no traceback, no secret); a key that stops working after the start makes the service
`degraded` with a CRITICAL line and leaves the protection on the venue."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from exchange.sim.server import SimServer
from tests.test_service import ROOT, TOKEN, account_block, write_config


def _config(sim: SimServer, tmp_path: Path, *, symbols: str = '["BTCUSDT", "ETHUSDT"]', port: int = 0) -> Path:
    block = account_block().replace('symbols = ["BTCUSDT", "ETHUSDT"]', f"symbols = {symbols}")
    return write_config(tmp_path / "lifecycle.toml", f'''
database_url = "sqlite:///{tmp_path / 'svc.sqlite'}"
log_dir = "{tmp_path / 'logs'}"
[schedule]
fast_sync_interval_s = 0.3
[records]
dir = "{tmp_path / 'records'}"
[api]
port = {port}
''' + block, sim.ccxt_urls())


async def _run(config: Path, env: dict[str, str], timeout: float = 30) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lifecycle.app.cli", "run",
                                                "--config", str(config), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise AssertionError("lifecycle run did not exit: it should refuse to start") from None
    return proc.returncode or 0, err.decode()


def _env(api_key: str, secret: str) -> dict[str, str]:
    return {**os.environ, "SIM_KEY": api_key, "SIM_SECRET": secret, "LIFECYCLE_API_TOKEN": TOKEN,
            "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("problem, expected", [
    ("revoked key", "accounts.0 (sim): the venue refuses the API key"),
    ("wrong secret", "accounts.0 (sim): the venue refuses the request signature"),
    ("unknown symbol", "accounts.0 (sim): NOPEUSDT is not listed"),
    ("hedge mode", "accounts.0 (sim): hedge mode is not supported; switch the account to one-way mode"),
])
async def test_what_cannot_work_exits_2_with_one_line(sim: SimServer, tmp_path: Path, problem: str,
                                                      expected: str) -> None:
    account = sim.venue.add_account("sim")
    secret = account.secret
    symbols = '["BTCUSDT", "NOPEUSDT"]' if problem == "unknown symbol" else '["BTCUSDT", "ETHUSDT"]'
    if problem == "revoked key":
        sim.revoke_key(account.api_key)
    elif problem == "wrong secret":
        secret = "0" * len(secret)
    elif problem == "hedge mode":
        sim.set_account(account.api_key, dual_side_position=True)
    started = time.monotonic()
    code, err = await _run(_config(sim, tmp_path, symbols=symbols), _env(account.api_key, secret))
    assert code == 2, err
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert line == f"error: {expected}" or line.startswith(f"error: {expected}"), err
    assert "Traceback" not in err and account.api_key not in err and account.secret not in err
    assert time.monotonic() - started < 20  # no retry loop
    assert not sim.venue.open_orders(account, None) and not sim.venue.open_algos(account, None)


async def test_a_key_refused_after_the_start_degrades_health_and_leaves_the_stop(sim: SimServer,
                                                                                  tmp_path: Path) -> None:
    account = sim.venue.add_account("sim")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _config(sim, tmp_path, port=port)
    env = _env(account.api_key, account.secret)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lifecycle.app.cli", "run",
                                                "--config", str(config), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with session.get(base + "/health", headers=auth) as r:
                        if r.status == 200 and (await r.json())["status"] == "ok":
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.returncode is None and time.monotonic() < deadline, "the service did not come up"
                await asyncio.sleep(0.1)
            async with session.post(base + "/positions", headers=auth, json={
                    "symbol": "BTCUSDT", "side": "long", "quantity": "0.01", "stop_loss_pct": "1"}) as r:
                assert r.status == 201
            while not sim.venue.open_algos(account, "BTCUSDT"):
                assert time.monotonic() < deadline + 10, "no stop placed"
                await asyncio.sleep(0.05)
            sim.revoke_key(account.api_key)
            reasons: list[str] = []
            deadline = time.monotonic() + 15
            while not any(r.startswith("sim: exchange key refused") for r in reasons):
                assert time.monotonic() < deadline, reasons
                await asyncio.sleep(0.1)
                async with session.get(base + "/health", headers=auth) as r:
                    health = await r.json()
                    reasons = health["reasons"]
            assert health["status"] == "degraded"
            assert [a.order_type for a in sim.venue.open_algos(account, "BTCUSDT")] == ["STOP_MARKET"]
            sim.revoke_key(account.api_key, revoked=False)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    log = stderr.decode()
    assert proc.returncode == 0, log
    assert "CRITICAL" in log and account.api_key not in log and account.secret not in log
    assert [a.order_type for a in sim.venue.open_algos(account, "BTCUSDT")] == ["STOP_MARKET"]  # left on the venue


async def test_a_refused_start_exits_2_even_when_stderr_cannot_be_written(sim: SimServer, tmp_path: Path) -> None:
    """Soak seed 503700: a service restarted while its disk was full could not open its database, and the
    one-line refusal could not be written either (stderr on the same full disk): the OSError became a
    traceback and exit code 1. /dev/full refuses every write, as a full disk does."""
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is not available on this machine")
    account = sim.venue.add_account("sim")
    sim.revoke_key(account.api_key)  # the start is refused (exit 2, one line on stderr)
    config = _config(sim, tmp_path)
    with open("/dev/full", "w") as full:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lifecycle.app.cli", "run", "--config",
                                                    str(config), env=_env(account.api_key, account.secret),
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=full)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 2
