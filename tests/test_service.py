"""The service a user runs: configuration errors, `lifecycle run` against the simulator with `open`,
`status` and `close` through the control API, and the API's token and binding."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from typer.testing import CliRunner

import lifecycle.app.service as service_module
from exchange.sim.server import SimServer
from exchange.sim.venue import Account
from lifecycle.app.cli import app
from lifecycle.app.service import Service
from lifecycle.app.settings import ConfigError, load, service_config
from lifecycle.domain import Side
from lifecycle.live import OpenCommand
from lifecycle.machines.states import PositionState as S
from tests.storage_faults import SmallDisk, small_disk  # noqa: F401 - fixture
from tests.waiting import until

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-4b1d"


def write_config(path: Path, body: str, urls: dict[str, str] | None = None) -> Path:
    text = body
    if urls is not None:
        text += "\n[accounts.urls]\n" + "\n".join(f'"{k}" = "{v}"' for k, v in urls.items()) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def account_block(key_env: str = "SIM_KEY", secret_env: str = "SIM_SECRET") -> str:
    return f'''
[[accounts]]
name = "sim"
symbols = ["BTCUSDT", "ETHUSDT"]
api_key_env = "{key_env}"
secret_env = "{secret_env}"
rate_limit = false
'''


# --- configuration errors: one line naming the key, exit 2, nothing started -----------------------------

BAD = [
    ("unknown key", 'bogus = 1\n' + account_block(), "bogus: Extra inputs are not permitted"),
    ("negative interval", '[schedule]\nsync_interval_s = -5\n' + account_block(),
     "schedule.sync_interval_s: Input should be greater than 0 (got -5)"),
    ("callback rate outside (0, 100)", '[trailing]\ncallback_rate = 150\n' + account_block(),
     "trailing.callback_rate: Input should be less than 100"),
    ("a key written in the file", account_block() + 'api_key = "abc"\n',
     "accounts.0: 'api_key' must not be written in the configuration"),
    ("an exchange without keys", account_block(key_env="NOT_SET_ANYWHERE"),
     "accounts.0.api_key: the environment variable NOT_SET_ANYWHERE is not set"),
    ("an API on a public address", '[api]\nhost = "0.0.0.0"\n' + account_block(),
     "api: host is not a loopback address"),
    ("no accounts", 'database_url = "sqlite:///x.sqlite"\n', "accounts: Field required"),
]


@pytest.mark.parametrize(("what", "body", "message"), BAD, ids=[b[0].replace(" ", "_") for b in BAD])
def test_each_configuration_error_names_its_key_and_starts_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str, body: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIM_KEY", "k")
    monkeypatch.setenv("SIM_SECRET", "s")
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", TOKEN)
    config = write_config(tmp_path / "lifecycle.toml", body)
    result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("configuration error: ") and len(line.splitlines()) == 1, line
    assert message.replace("Value error, ", "") in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lifecycle.toml"]  # no database, no logs, no records


def test_an_unreachable_database_is_named_and_nothing_else_starts(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIM_KEY", "k")
    monkeypatch.setenv("SIM_SECRET", "s")
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", TOKEN)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(tmp_path / "lifecycle.toml",
                          f'database_url = "postgresql://postgres:hunter2@127.0.0.1:{port}/nope"\n' + account_block())
    result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2
    assert result.output.startswith("error: database_url: cannot open postgresql://postgres:***@127.0.0.1"), \
        result.output
    assert "hunter2" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lifecycle.toml"]


def test_the_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_KEY", "k")
    monkeypatch.setenv("SIM_SECRET", "s")
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", TOKEN)
    monkeypatch.setenv("LIFECYCLE_SCHEDULE__SYNC_INTERVAL_S", "7")
    config = write_config(tmp_path / "c.toml", '[schedule]\nsync_interval_s = 30\n' + account_block())
    settings = load(config)
    assert settings.schedule.sync_interval_s == 7
    monkeypatch.setenv("LIFECYCLE_SCHEDULE__SYNC_INTERVAL_S", "-1")
    with pytest.raises(ConfigError, match=r"schedule.sync_interval_s"):
        load(config)


def test_keys_from_a_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "key").write_text("the-key\n")
    (tmp_path / "secret").write_text("the-secret\n")
    for name in ("key", "secret"):
        (tmp_path / name).chmod(0o600)  # a secret file others may read is refused
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", TOKEN)
    config = write_config(tmp_path / "c.toml", f'''
[[accounts]]
name = "a"
symbols = ["BTCUSDT"]
api_key_file = "{tmp_path / 'key'}"
secret_file = "{tmp_path / 'secret'}"
''')
    exchange = load(config).exchange_settings(load(config).accounts[0])
    assert (exchange.api_key.reveal(), exchange.secret.reveal()) == ("the-key", "the-secret")
    assert "the-secret" not in repr(exchange)
    (tmp_path / "secret").write_text("")
    with pytest.raises(ConfigError, match=r"accounts.0.secret: the file .* is empty"):
        load(config)


def test_environment_typos_and_pasted_secrets_are_refused_without_echoing_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_KEY", "k")
    monkeypatch.setenv("SIM_SECRET", "s")
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", TOKEN)
    config = write_config(tmp_path / "c.toml", account_block())
    monkeypatch.setenv("LIFECYCLE_SCHEDULE_SYNC_INTERVAL_S", "5")  # one underscore: would be ignored
    with pytest.raises(ConfigError, match=r"LIFECYCLE_SCHEDULE_SYNC_INTERVAL_S is not a setting \(did you mean "
                                          r"LIFECYCLE_SCHEDULE__"):
        load(config)
    monkeypatch.delenv("LIFECYCLE_SCHEDULE_SYNC_INTERVAL_S")
    monkeypatch.setenv("LIFECYCLE_API__TOKEN", "SuperSecretToken123")
    with pytest.raises(ConfigError) as refused:
        load(config)
    assert "api.token" in str(refused.value) and "SuperSecret" not in str(refused.value)
    monkeypatch.delenv("LIFECYCLE_API__TOKEN")
    pasted = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"  # a key in the wrong place
    write_config(config, account_block(key_env=pasted))
    with pytest.raises(ConfigError) as refused:
        load(config)
    assert "accounts.0.api_key_env: must be the NAME of an environment variable" in str(refused.value)
    assert pasted not in str(refused.value)
    write_config(config, account_block() + 'exchange = "nope"\n')
    with pytest.raises(ConfigError, match=r"accounts.0.exchange: not a ccxt exchange with WebSocket support"):
        load(config)
    write_config(config, "shutdown_drain_s = inf\n" + account_block())
    with pytest.raises(ConfigError, match="shutdown_drain_s"):
        load(config)


def test_the_demo_settings_ignore_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lifecycle.app.settings import Settings

    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", "postgresql://prod@db.example/prod")
    settings = Settings.without_environment(database_url=f"sqlite:///{tmp_path / 'demo.sqlite'}", accounts=[
        {"name": "d", "symbols": ["BTCUSDT"], "api_key_env": "K", "secret_env": "S"}])
    assert settings.database_url.startswith("sqlite:///")


def test_a_taken_api_port_stops_the_start_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIM_KEY", "k")
    monkeypatch.setenv("SIM_SECRET", "s")
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", TOKEN)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "lifecycle.toml", f"[api]\nport = {port}\n" + account_block(),
                              {"fapiPrivate": "http://127.0.0.1:9/fapi/v1"})
        # A process of its own: `run` configures the global logger.
        result = subprocess.run([sys.executable, "-m", "lifecycle.app.cli", "run", "--config", str(config)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: api.port: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_the_testnet_example_configuration_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BINANCE_TESTNET_KEY", "k")
    monkeypatch.setenv("BINANCE_TESTNET_SECRET", "s")
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", TOKEN)
    settings = load(ROOT / "deploy" / "binance-testnet.toml")
    assert settings.accounts[0].sandbox and settings.api.host == "127.0.0.1"
    config = service_config(settings)
    assert config.accounts[0].exchange.sandbox and config.api is not None
    unit = (ROOT / "deploy" / "lifecycle.service").read_text()
    assert "ExecStart=/opt/lifecycle/.venv/bin/lifecycle run" in unit and "RestartPreventExitStatus=2" in unit


# --- the running service ------------------------------------------------------------------------------------


async def test_lifecycle_run_serves_open_status_close_and_stops_on_sigterm(sim: SimServer, tmp_path: Path) -> None:
    account = sim.venue.add_account("sim")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(tmp_path / "lifecycle.toml", f'''
database_url = "sqlite:///{tmp_path / 'svc.sqlite'}"
log_dir = "{tmp_path / 'logs'}"
[records]
dir = "{tmp_path / 'records'}"
[api]
port = {port}
''' + account_block(), sim.ccxt_urls())
    env = {**os.environ, "SIM_KEY": account.api_key, "SIM_SECRET": account.secret, "LIFECYCLE_API_TOKEN": TOKEN,
           "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "lifecycle.app.cli"]
    proc = await asyncio.create_subprocess_exec(*cli, "run", "--config", str(config), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    async def call(*args: str) -> tuple[int, str, str]:
        p = await asyncio.create_subprocess_exec(*cli, *args, "--config", str(config), env=env,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await p.communicate()
        return p.returncode or 0, out.decode(), err.decode()

    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while True:  # until the API answers
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health",
                                           headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.returncode is None and time.monotonic() < deadline, "the service did not come up"
                await asyncio.sleep(0.2)
        code, out, err = await call("status")
        assert code == 0 and "positions (0 live)" in out, err
        code, out, err = await call("open", "BTCUSDT", "long", "0.01", "--stop-loss-pct", "1")
        assert code == 0, err
        opened = json.loads(out)
        assert opened["symbol"] == "BTCUSDT" and opened["side"] == "long"
        deadline = time.monotonic() + 20
        while True:
            code, out, _ = await call("status")
            if (" OPEN " in out and "59400" in out) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert opened["id"] in out and "59400" in out and "60000" in out  # state, stop and the live mark
        assert [a.order_type for a in sim.venue.open_algos(account, "BTCUSDT")] == ["STOP_MARKET"]
        code, out, err = await call("close", opened["id"], "--reason", "signal")
        assert code == 0 and json.loads(out)["accepted"] is True, err
        deadline = time.monotonic() + 20
        while True:  # flat on the venue, the stop cancelled, the row terminal
            code, out, _ = await call("status", "--ended", "1")
            if (sim.venue.position(account, "BTCUSDT").amount == 0 and not sim.venue.open_algos(account, None)
                    and "CLOSED" in out):
                break
            assert time.monotonic() < deadline, f"the close did not complete within 20 s:\n{out}"
            await asyncio.sleep(0.1)
        code, out, err = await call("close", "no-such-position")
        assert code == 1 and "404" in err
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    log = stderr.decode()
    assert proc.returncode == 0, log
    assert "SIGTERM received: stopping" in log and "OPEN --close_requested--> CLOSING_BY_BOT" in log
    assert (tmp_path / "logs" / "lifecycle.log").exists()
    assert "CLOSING_BY_BOT --flat--> CLOSED" in (tmp_path / "logs" / "lifecycle.log").read_text()


def sim_service_config(sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str,
                       records: Path | None = None, token: str = TOKEN) -> tuple[Account, Path]:
    """A configuration file for one account "sim" on the simulator (its keys and the API token set in the
    environment), `db_url`, records in `records` (tmp_path/records by default), the API on a free port."""
    account = sim.venue.add_account("sim")
    monkeypatch.setenv("SIM_KEY", account.api_key)
    monkeypatch.setenv("SIM_SECRET", account.secret)
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", token)
    config = write_config(tmp_path / "c.toml", f'''
database_url = "{db_url}"
[records]
dir = "{records or tmp_path / 'records'}"
[api]
port = 0
''' + account_block(), sim.ccxt_urls())
    return account, config


async def test_a_records_directory_that_hangs_keeps_no_account_from_starting(sim: SimServer, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the review of the seventh session: the start read the closure records (to write again those a
    crash lost) before the account's live engine started, with no bound. A records file that never answers (a
    FIFO without a writer stands for a disk that hangs) kept the account starting: a stop fill on the venue went
    unseen, and a SIGTERMed service never exited (the read's thread held the interpreter). Records are books:
    the start waits RECORDS_CHECK_BOUND_S for them, then goes on; closures are detected; the stop ends."""
    monkeypatch.setattr(service_module, "RECORDS_CHECK_BOUND_S", 0.5, raising=False)
    records = tmp_path / "records"
    records.mkdir()
    hanging = records / f"closure-{(datetime.now(UTC).date() - timedelta(days=1)).isoformat()}.jsonl"
    os.mkfifo(hanging)
    account, config = sim_service_config(sim, tmp_path, monkeypatch, f"sqlite:///{tmp_path / 'hang.sqlite'}", records)
    service = Service(service_config(load(config)))
    try:
        await asyncio.wait_for(service.start(), 20)
        live = service.accounts["sim"].live
        assert live is not None
        position = await live.open(OpenCommand("BTCUSDT", Side.LONG, D("0.01"), stop_loss_pct=D(2)))
        sim.venue.force_close(account, "BTCUSDT", "liquidation")
        await until(lambda: position.id not in live.engine.positions, 10.0, "the liquidation detected")
        await asyncio.wait_for(service.stop(), 30)
    finally:
        with contextlib.suppress(OSError):  # let the read go (no reader waiting: ENXIO, nothing to let go)
            os.close(os.open(hanging, os.O_WRONLY | os.O_NONBLOCK))
        if not service._stopped.is_set():
            await service.stop()


async def test_the_control_api_refuses_values_of_the_wrong_kind(sim: SimServer, tmp_path: Path, db_url: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the review of the seventh session: the text "false" for `trailing` opened a real position with a
    trailing stop (any non-empty text was true); 100,000 nested brackets answered 500 with a traceback; a NUL
    in a position id asked PostgreSQL, which answered 500. Each is a 400 or 404 now, and nothing is opened."""
    _, config = sim_service_config(sim, tmp_path, monkeypatch, db_url)
    service = await Service(service_config(load(config))).start()
    try:
        assert service.api is not None
        base, good = f"http://127.0.0.1:{service.api.port}", {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as session:
            flags: list[Any] = ["false", "true", 0, 1, [], {}]
            for flag in flags:
                async with session.post(base + "/positions", headers=good, json={
                        "symbol": "BTCUSDT", "side": "long", "quantity": "0.01", "trailing": flag}) as r:
                    answer = await r.json()
                    assert r.status == 400 and "trailing must be true or false" in answer["error"], (flag, answer)
            async with session.post(base + "/positions", headers={**good, "Content-Type": "application/json"},
                                    data="[" * 100_000) as r:
                assert r.status == 400 and "nested too deeply" in (await r.json())["error"]
            for odd in ("a%00b", "x" * 65, "%E2%82%AC"):
                async with session.get(base + f"/positions/{odd}/journal", headers=good) as r:
                    assert r.status == 404 and "no journal" in (await r.json())["error"], odd
            async with session.post(base + "/positions", headers=good, json={
                    "symbol": "BTCUSDT", "side": "long", "quantity": "0.01", "trailing": False}) as r:
                assert r.status == 201 and (await r.json())["trailing"] is None
        assert len(service.accounts["sim"].engine.positions) == 1  # only the last open: the refused opened nothing
    finally:
        await service.stop()


async def test_the_control_api_refuses_a_missing_or_wrong_token_and_binds_loopback(sim: SimServer, tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch
                                                                                   ) -> None:
    account, config = sim_service_config(sim, tmp_path, monkeypatch, f"sqlite:///{tmp_path / 'api.sqlite'}")
    service = await Service(service_config(load(config))).start()
    try:
        api = service.api
        assert api is not None and api.host == "127.0.0.1"
        base = f"http://127.0.0.1:{api.port}"
        async with aiohttp.ClientSession() as session:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                            {"Authorization": f"Bearer {TOKEN}x"}):
                for method, path in (("GET", "/health"), ("GET", "/positions"), ("GET", "/metrics"),
                                     ("POST", "/positions")):
                    async with session.request(method, base + path, headers=headers, json={}) as r:
                        assert r.status == 401, (headers, path)
            good = {"Authorization": f"Bearer {TOKEN}"}
            async with session.post(base + "/positions", headers=good, json={
                    "symbol": "ETHUSDT", "side": "short", "quantity": "0.1", "stop_loss_pct": "2"}) as r:
                assert r.status == 201
                pid = (await r.json())["id"]
            live = service.accounts["sim"].live
            assert live is not None
            for _ in range(200):
                p = live.engine.positions.get(pid)
                if p is not None and p.stop_price is not None:
                    break
                await asyncio.sleep(0.01)
            assert p is not None and p.side is Side.SHORT and p.state is S.OPEN and p.stop_price == D("3060.00")
            async with session.post(base + "/positions", headers=good, json={
                    "symbol": "BTCUSDT", "side": "long", "quantity": "0.01", "trailing": True}) as r:
                assert r.status == 201
                trailing = (await r.json())["trailing"]
                assert (D(trailing["activation_price"]), D(trailing["callback_rate"])) == (D("60300"), D("0.5"))
            async with session.post(base + "/positions", headers=good, json={
                    "symbol": "ETHUSDT", "side": "short", "quantity": "0.0001"}) as r:  # below the venue's step
                assert r.status == 400 and "minimum" in (await r.json())["error"]  # refused before anything exists
            async with session.post(base + "/positions", headers=good, json={
                    "symbol": "ETHUSDT", "side": "long", "quantity": "0.1"}) as r:  # one-way: our short is live
                assert r.status == 409 and pid in (await r.json())["error"]
            async with session.post(base + f"/positions/{pid}/close", headers=good, json={"reason": "shutdown"}) as r:
                assert r.status == 400  # an internal reason is not the operator's to give
            async with session.post(base + "/positions", headers=good, json={"symbol": "ETHUSDT"}) as r:
                assert r.status == 400 and "side" in (await r.json())["error"]
            async with session.get(base + f"/positions/{pid}/journal", headers=good) as r:
                assert [e["event"] for e in await r.json()] == ["created", "entry_filled", "stop_moved"]
            async with session.get(base + "/health", headers=good) as r:
                health = await r.json()
                assert health["status"] == "ok", health
                assert health["accounts"]["sim"]["live_positions"] == 2
            # An account is listed while it starts (its positions loading, its live engine not yet running; a
            # takeover in CI hit that window): a command then is refused with 503 and says why, never a 500.
            runtime = service.accounts["sim"]
            runtime.live = None
            try:
                async with session.post(base + "/positions", headers=good, json={
                        "symbol": "BTCUSDT", "side": "long", "quantity": "0.01"}) as r:
                    assert r.status == 503 and "starting" in (await r.json())["error"]
                async with session.post(base + f"/positions/{pid}/close", headers=good, json={}) as r:
                    assert r.status == 503 and "starting" in (await r.json())["error"]
            finally:
                runtime.live = live
            sim.venue.force_close(account, "ETHUSDT", "liquidation")
            for _ in range(200):
                if pid not in live.engine.positions:
                    break
                await asyncio.sleep(0.01)
            async with session.get(base + "/metrics", headers=good) as r:
                text = await r.text()
            assert 'lifecycle_closures_total{account="sim",state="CLOSED_EXTERNAL",cause="liquidation"} 1' in text
            assert "lifecycle_closure_detection_latency_ms_count 1" in text
            moves = re.search(r'^lifecycle_stop_moves_total\{account="sim"\} (\d+)$', text, re.M)
            assert moves is not None and int(moves.group(1)) >= 1
            assert 'lifecycle_stream_healthy{account="sim",stream="positions"} 1' in text
            assert 'lifecycle_degraded{account="sim"} 0' in text
            assert 'lifecycle_storage_backlog{account="sim"} 0' in text
            assert 'lifecycle_unprotected_positions{account="sim"} 0' in text
            assert 'lifecycle_closure_cause_sources_total{account="sim",source="fill_update"} 1' in text
            full = re.search(r'^lifecycle_gc_collections_total\{generation="2"\} (\d+)$', text, re.M)
            assert full is not None and int(full.group(1)) >= 1  # the start's own gc.collect() at the least
            assert re.search(r'^lifecycle_gc_pause_ms_total\{generation="0"\} [0-9.]+$', text, re.M)
            assert service.collector.running
            # Not reachable on this machine's other addresses.
            for address in _non_loopback_addresses():
                with pytest.raises(OSError), socket.create_connection((address, api.port), timeout=1):
                    pass
    finally:
        await service.stop()
    assert not service.collector.running


def _non_loopback_addresses() -> list[str]:
    found = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            address = str(info[4][0])  # AF_INET: (host, port)
            if not address.startswith("127."):
                found.add(address)
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: picks the outgoing interface's address
            address = s.getsockname()[0]
            if not address.startswith("127."):
                found.add(address)
        except OSError:
            pass
    return sorted(found)


async def test_a_second_service_on_one_sqlite_file_refuses_to_start(sim: SimServer, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One service process per SQLite database (issue 14): the second says who holds it and starts nothing;
    once the first stops, it starts."""
    from lifecycle.app.service import StartError

    account = sim.venue.add_account("sim")
    monkeypatch.setenv("SIM_KEY", account.api_key)
    monkeypatch.setenv("SIM_SECRET", account.secret)
    config = write_config(tmp_path / "c.toml", f'''
database_url = "sqlite:///{tmp_path / 'one.sqlite'}"
[records]
dir = "{tmp_path / 'records'}"
[api]
enabled = false
''' + account_block(), sim.ccxt_urls())
    first = await Service(service_config(load(config))).start()
    try:
        second = Service(service_config(load(config)))
        with pytest.raises(StartError) as refused:
            await second.start()
        assert str(refused.value) == (
            f"database_url: {tmp_path / 'one.sqlite'} is used by another lifecycle service (pid {os.getpid()}); one "
            "service process per SQLite database: stop the other one, or use PostgreSQL to run several")
        assert second.repo is None and not second.accounts
    finally:
        await first.stop()
    again = await Service(service_config(load(config))).start()
    await again.stop()


def test_a_killed_service_does_not_keep_its_sqlite_file_locked(tmp_path: Path) -> None:
    from db.engine import SqliteInUse, SqliteLock

    url = f"sqlite:///{tmp_path / 'k.sqlite'}"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom db.engine import SqliteLock\n"
                               f"lock = SqliteLock.take({url!r})\nprint('held', flush=True)\ntime.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(SqliteInUse, match=f"pid {holder.pid}"):
            SqliteLock.take(url)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    lock = SqliteLock.take(url)
    assert lock is not None
    lock.release()


def test_a_service_restarted_on_a_full_disk_takes_its_sqlite_lock(small_disk: SmallDisk) -> None:
    """Chaos seed 503700 (CI, 2026-12-05): a service killed and started again while its disk was full failed to
    write its pid into the lock file and exited with a traceback. The pid is only for a second service's message:
    the lock is taken without it."""
    from db.engine import SqliteInUse, SqliteLock

    url = f"sqlite:///{small_disk.path / 'full.sqlite'}"
    first = SqliteLock.take(url)  # the lock file is there, as the killed service left it
    assert first is not None
    first.release()
    small_disk.fill()
    try:
        lock = SqliteLock.take(url)
        assert lock is not None
        with pytest.raises(SqliteInUse, match="is used by another lifecycle service"):
            SqliteLock.take(url)  # held all the same
        lock.release()
    finally:
        small_disk.free()


def test_a_refused_second_service_touches_neither_the_database_nor_the_log(tmp_path: Path) -> None:
    """`lifecycle run` takes the lock before it migrates the database or configures its log: a second service
    (maybe a newer build) refused on a held file has not upgraded the schema under the first."""
    from db.engine import SqliteLock

    (tmp_path / "logs").mkdir()
    url = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    config = write_config(tmp_path / "c.toml", f'database_url = "{url}"\nlog_dir = "{tmp_path / "logs"}"\n'
                          '[api]\nenabled = false\n' + account_block(),
                          {"fapiPrivate": "http://127.0.0.1:9/fapi/v1"})
    held = SqliteLock.take(url)
    try:
        env = {**os.environ, "SIM_KEY": "k", "SIM_SECRET": "s"}
        result = subprocess.run([sys.executable, "-m", "lifecycle.app.cli", "run", "-c", str(config)], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60)
    finally:
        assert held is not None
        held.release()
    assert result.returncode == 2, result.stderr
    assert f"{tmp_path / 'fresh.sqlite'} is used by another lifecycle service (pid {os.getpid()})" in result.stderr
    assert not (tmp_path / "fresh.sqlite").exists() and not list((tmp_path / "logs").iterdir())


def test_one_lock_however_the_sqlite_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from db.engine import SqliteInUse, SqliteLock

    (tmp_path / "one.sqlite").touch()
    (tmp_path / "link.sqlite").symlink_to(tmp_path / "one.sqlite")
    monkeypatch.chdir(tmp_path)
    held = SqliteLock.take(f"sqlite:///{tmp_path / 'one.sqlite'}")
    try:
        for other in ("sqlite:///one.sqlite", f"sqlite:///{tmp_path / 'link.sqlite'}"):
            with pytest.raises(SqliteInUse):
                SqliteLock.take(other)
    finally:
        assert held is not None
        held.release()


async def test_a_stop_during_the_start_leaves_no_collector_ticking(sim: SimServer, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of 3300299: `stop()` while `start()` was still starting an account returned, then `start()` went on
    and started the quiet collector, which ticked on after both."""
    account = sim.venue.add_account("sim")
    monkeypatch.setenv("SIM_KEY", account.api_key)
    monkeypatch.setenv("SIM_SECRET", account.secret)
    config = write_config(tmp_path / "c.toml", f'''
database_url = "sqlite:///{tmp_path / 'stop.sqlite'}"
[records]
dir = "{tmp_path / 'records'}"
[api]
enabled = false
''' + account_block(), sim.ccxt_urls())
    service = Service(service_config(load(config)))
    started_one = asyncio.Event()
    go_on = asyncio.Event()
    original = service._start_account

    async def held(*args: Any, **kwargs: Any) -> None:  # the account started, the start not yet done
        await original(*args, **kwargs)
        started_one.set()
        await go_on.wait()

    monkeypatch.setattr(service, "_start_account", held)
    start = asyncio.ensure_future(service.start())
    await asyncio.wait_for(started_one.wait(), 30)
    await service.stop()
    go_on.set()
    await asyncio.wait_for(start, 30)
    assert not service.collector.running
