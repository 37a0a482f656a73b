"""The first hour of a new user: where the configuration is looked for (and one line when there is none),
`lifecycle init` and `init --sim` (whose file brings `lifecycle run` up healthy against `python -m exchange.sim`
in processes of their own), `open` refusing bad numbers and sides before anything is asked, and an empty key
variable called empty."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from typer.testing import CliRunner

from exchange.sim.server import DEFAULT_REST_PORT, DEFAULT_WS_PORT, ccxt_urls
from exchange.sim.venue import VenueConfig
from lifecycle.app.cli import app
from lifecycle.app.settings import ConfigError, load

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "first-hour-token-7c1e"
CLI = [sys.executable, "-m", "lifecycle.app.cli"]


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any lifecycle configuration, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("LIFECYCLE_", "SIM_"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def lifecycle(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env if env is not None else clean_environment())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- where the configuration comes from -------------------------------------------------------------------


@pytest.mark.parametrize("command", [["run"], ["status"], ["history", "some-id"], ["close", "some-id"],
                                     ["open", "BTCUSDT", "long", "0.01"]])
def test_without_any_configuration_each_command_says_where_one_is_looked_for(tmp_path: Path,
                                                                           command: list[str]) -> None:
    result = lifecycle(tmp_path, *command)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: no configuration found"), line
    for named in ("-c FILE", "LIFECYCLE_CONFIG", "./lifecycle.toml", "lifecycle init"):
        assert named in line, (named, line)
    assert "Field required" not in line and list(tmp_path.iterdir()) == []  # nothing created


def test_the_configuration_is_c_then_lifecycle_config_then_the_working_directorys(tmp_path: Path) -> None:
    """Each candidate file names its own (missing) database, so `status` says which one it read."""
    for name in ("here", "variable", "option"):
        (tmp_path / f"{name}.toml").write_text(
            f'database_url = "sqlite:///{tmp_path / name}.sqlite"\n[[accounts]]\nname = "a"\nsymbols = ["BTCUSDT"]\n'
            'api_key_env = "K"\nsecret_env = "S"\n', encoding="utf-8")
    (tmp_path / "here.toml").rename(tmp_path / "lifecycle.toml")
    variable = clean_environment(LIFECYCLE_CONFIG=str(tmp_path / "variable.toml"))

    def read(*args: str, env: dict[str, str] | None = None) -> str:
        result = lifecycle(tmp_path, "status", *args, env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        return result.stderr.strip()

    assert read("-c", str(tmp_path / "option.toml"), env=variable).endswith("option.sqlite")
    assert read(env=variable).endswith("variable.sqlite")
    assert read().endswith("here.sqlite")


def test_the_environment_alone_still_configures_without_a_file(tmp_path: Path) -> None:
    accounts = json.dumps([{"name": "a", "symbols": ["BTCUSDT"], "api_key_env": "K", "secret_env": "S"}])
    result = lifecycle(tmp_path, "status", env=clean_environment(
        LIFECYCLE_ACCOUNTS=accounts, LIFECYCLE_DATABASE_URL=f"sqlite:///{tmp_path / 'env.sqlite'}"))
    assert result.returncode == 2 and result.stderr.strip().endswith("env.sqlite"), result.stderr


# --- lifecycle init -----------------------------------------------------------------------------------------


def assert_every_key_is_explained(text: str) -> None:
    """Each `key = value` line carries a comment, or follows a comment (a block explained above it)."""
    explained = False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            explained = False
        elif stripped.startswith("#") or (stripped.startswith("[") and "#" in stripped):
            explained = True
        elif stripped.startswith("["):
            explained = False
        elif "=" in stripped:
            assert "#" in stripped or explained, f"no comment says what this means: {line}"


def test_init_writes_a_commented_testnet_configuration_and_keeps_an_existing_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = lifecycle(tmp_path, "init")
    assert written.returncode == 0, written.stderr
    path = tmp_path / "lifecycle.toml"
    text = path.read_text(encoding="utf-8")
    assert_every_key_is_explained(text)
    for name, value in (("BINANCE_TESTNET_KEY", "k"), ("BINANCE_TESTNET_SECRET", "s"), ("LIFECYCLE_API_TOKEN", TOKEN)):
        monkeypatch.setenv(name, value)
    settings = load(path)  # the real loader, keys and token checked
    assert settings.accounts[0].sandbox and settings.api.token_env == "LIFECYCLE_API_TOKEN"
    path.write_text("# mine\n", encoding="utf-8")
    again = lifecycle(tmp_path, "init", "--sim")
    assert again.returncode == 1 and "--force" in again.stderr
    assert path.read_text(encoding="utf-8") == "# mine\n"  # untouched
    assert lifecycle(tmp_path, "init", "--sim", "--force").returncode == 0
    assert "exchange.sim" in path.read_text(encoding="utf-8")
    other = lifecycle(tmp_path, "init", "elsewhere.toml")
    assert other.returncode == 0 and "-c elsewhere.toml" in other.stdout and (tmp_path / "elsewhere.toml").exists()


async def test_init_sim_then_the_simulator_and_lifecycle_run_come_up_healthy_and_open_a_position(
        tmp_path: Path) -> None:
    """The walkthrough: `lifecycle init --sim`, `python -m exchange.sim` in one process, `lifecycle run` in
    another (finding ./lifecycle.toml by itself), then `open` with buy for long."""
    assert lifecycle(tmp_path, "init", "--sim").returncode == 0
    config = tmp_path / "lifecycle.toml"
    text = config.read_text(encoding="utf-8")
    assert_every_key_is_explained(text)
    env = clean_environment(SIM_API_KEY="sim-key", SIM_SECRET="sim-secret", LIFECYCLE_API_TOKEN=TOKEN)
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("SIM_API_KEY", "SIM_SECRET", "LIFECYCLE_API_TOKEN")})
    try:
        settings = load(config)  # the real loader, keys and token read
    finally:
        os.environ.clear()
        os.environ.update(saved)
    account = settings.accounts[0]
    assert account.urls == ccxt_urls(f"http://127.0.0.1:{DEFAULT_REST_PORT}", f"ws://127.0.0.1:{DEFAULT_WS_PORT}/ws")
    assert account.symbols == [s.symbol for s in VenueConfig().symbols]
    assert (account.api_key_env, account.secret_env, settings.api.token_env) == \
        ("SIM_API_KEY", "SIM_SECRET", "LIFECYCLE_API_TOKEN")
    # The default ports may be taken on a test machine: the simulator and the file move to free ones together.
    rest, ws, api = free_port(), free_port(), free_port()
    config.write_text(text.replace(f":{DEFAULT_REST_PORT}/", f":{rest}/").replace(f":{DEFAULT_WS_PORT}/", f":{ws}/"),
                      encoding="utf-8")
    env["LIFECYCLE_API__PORT"] = str(api)
    sim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exchange.sim", "--rest-port", str(rest), "--ws-port", str(ws), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    service: asyncio.subprocess.Process | None = None
    try:
        banner = await asyncio.wait_for(_json_printed(sim), 30)
        assert banner["symbols"] == account.symbols  # it lists what it serves ...
        assert banner["ccxt_url_overrides"] == ccxt_urls(f"http://127.0.0.1:{rest}", f"ws://127.0.0.1:{ws}/ws")
        assert (banner["api_key"], banner["key_from"]) == ("sim-key", "SIM_API_KEY and SIM_SECRET")
        service = await asyncio.create_subprocess_exec(*CLI, "run", cwd=tmp_path, env=env,
                                                       stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        health = await _healthy(service, api)
        assert health["accounts"]["sim"]["streams_healthy"] is True
        opened = await asyncio.to_thread(lifecycle, tmp_path, "open", "BTCUSDT", "buy", "0.01", "--stop-loss-pct",
                                         "1", env=env)
        assert opened.returncode == 0, opened.stderr
        assert json.loads(opened.stdout)["side"] == "long"
        # The live page of `lifecycle run`: a login form, the session cookie, then the page and its snapshot.
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            async with http.get(f"http://127.0.0.1:{api}/") as r:
                assert r.status == 200 and 'name="token"' in await r.text()
            async with http.post(f"http://127.0.0.1:{api}/session", data={"token": TOKEN}) as r:
                assert r.status == 200 and "Live positions" in await r.text()  # redirected to the page
            async with http.ws_connect(f"http://127.0.0.1:{api}/ws") as page:
                snapshot = json.loads((await page.receive(timeout=10)).data)
        assert [p["id"] for p in snapshot["positions"]] == [json.loads(opened.stdout)["id"]]
    finally:
        for process in (service, sim):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.communicate(), 30)
    assert service is not None and service.returncode == 0


async def _json_printed(process: asyncio.subprocess.Process) -> dict[str, Any]:
    """The JSON object the process prints first (over several lines)."""
    assert process.stdout is not None
    text = ""
    while True:
        line = await process.stdout.readline()
        assert line, f"the process ended before printing its JSON: {text!r}"
        text += line.decode()
        try:
            return dict(json.loads(text))
        except json.JSONDecodeError:
            continue


async def _healthy(process: asyncio.subprocess.Process, port: int, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/health",
                                       headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    last = await r.json()
                    if r.status == 200 and last.get("status") == "ok":
                        return dict(last)
            except aiohttp.ClientError as e:
                last = e
            assert process.returncode is None, "lifecycle run exited"
            assert time.monotonic() < deadline, f"/health not ok within {timeout_s} s: {last}"
            await asyncio.sleep(0.2)


# --- numbers and sides on the command line ------------------------------------------------------------------

REFUSED = [
    ("a negative quantity", ["BTCUSDT", "long", "-0.1"], "error: quantity must be positive, got -0.1"),
    ("zero", ["BTCUSDT", "long", "0"], "error: quantity must be positive, got 0"),
    ("a quantity that is no number", ["BTCUSDT", "long", "abc"], "error: quantity must be a number, got 'abc'"),
    ("an infinite quantity", ["BTCUSDT", "long", "inf"], "error: quantity must be a number, got 'inf'"),
    ("a side that is none", ["BTCUSDT", "up", "1"],
     "error: side must be one of long, short, buy, sell (buy is long, sell is short), got 'up'"),
    ("a price that is no number", ["BTCUSDT", "sell", "1", "--entry-price", "6e4x"],
     "error: --entry-price must be a number, got '6e4x'"),
    ("a negative price", ["BTCUSDT", "sell", "1", "--take-profit", "-5"],
     "error: --take-profit must be positive, got -5"),
    ("a percentage of 100 or more", ["BTCUSDT", "long", "1", "--stop-loss-pct", "150"],
     "error: --stop-loss-pct is a percentage: it must be below 100, got 150"),
    ("a mistyped flag taking an argument's place", ["--trailng", "BTCUSDT", "long"],
     "error: no such option: --trailng"),
]


@pytest.mark.parametrize(("what", "args", "message"), REFUSED, ids=[r[0].replace(" ", "_") for r in REFUSED])
def test_open_refuses_bad_numbers_and_sides_before_reading_the_configuration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str, args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)  # no configuration here: a refusal that came later would say so instead
    monkeypatch.delenv("LIFECYCLE_CONFIG", raising=False)
    result = CliRunner().invoke(app, ["open", *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == message


# --- keys ---------------------------------------------------------------------------------------------------


def test_an_empty_key_variable_is_called_empty_not_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[accounts]]\nname = "a"\nsymbols = ["BTCUSDT"]\napi_key_env = "K_FH"\nsecret_env = "S_FH"\n',
                    encoding="utf-8")
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", TOKEN)
    monkeypatch.setenv("S_FH", "s")
    monkeypatch.delenv("K_FH", raising=False)
    with pytest.raises(ConfigError, match=r"^accounts.0.api_key: the environment variable K_FH is not set$"):
        load(path)
    monkeypatch.setenv("K_FH", "")
    with pytest.raises(ConfigError, match=r"^accounts.0.api_key: the environment variable K_FH is set but empty$"):
        load(path)
    monkeypatch.setenv("K_FH", "k")
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", "  ")
    with pytest.raises(ConfigError, match=r"^api.token: the environment variable LIFECYCLE_API_TOKEN is set but empty"):
        load(path)
