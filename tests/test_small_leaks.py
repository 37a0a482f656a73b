"""Small leaks and rough edges of the service a user runs: the control API token never reaches a log (not even
through aiohttp's own report of a malformed request), secret files others may read are refused, a database
that cannot be opened is one line and exit 2 for every command, and libpq's `sslmode` works in a URL."""
from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from exchange.sim.server import SimServer
from lifecycle.app.settings import ConfigError, load
from tests.conftest import PG_ADMIN_URL, _pg_admin, _pg_dsn
from tests.test_service import ROOT, TOKEN, account_block, write_config

CLI = [sys.executable, "-m", "lifecycle.app.cli"]


def lifecycle(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a refused command (exit 2, no traceback, nothing on stdout)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "", result.stdout
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1. the control API token never reaches a log ----------------------------------------------------------


def windows(text: str, size: int = 12) -> list[str]:
    """Every `size`-character piece of `text`: finding any of them in an output is a leak."""
    return [text[i:i + size] for i in range(len(text) - size + 1)]


async def raw_request(port: int, data: bytes, deadline: float) -> bytes:
    """Send `data` as is on a new connection; the answer's status line (aiohttp closes after a bad request)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), max(0.1, deadline - time.monotonic()))
    finally:
        writer.close()


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_the_token_reaches_no_log_when_aiohttp_refuses_a_malformed_request(
        sim: SimServer, tmp_path: Path, parser: str) -> None:
    """aiohttp reports a request it cannot parse on its `aiohttp.server` logger with the exception, whose
    message quotes the offending bytes (the first 100 of an over-long header, the whole malformed line): with
    `Authorization: Bearer <token>` that is the token. The service must log the kind of error only."""
    token = "leak-" + secrets.token_hex(24)
    account = sim.venue.add_account("sim")
    port = free_port()
    config = write_config(tmp_path / "lifecycle.toml", f'''
database_url = "sqlite:///{tmp_path / 'svc.sqlite'}"
log_dir = "{tmp_path / 'logs'}"
[records]
dir = "{tmp_path / 'records'}"
[api]
port = {port}
''' + account_block(), sim.ccxt_urls())
    env = {**os.environ, "SIM_KEY": account.api_key, "SIM_SECRET": account.secret, "LIFECYCLE_API_TOKEN": token,
           "PYTHONPATH": str(ROOT)}
    if parser == "python":
        env["AIOHTTP_NO_EXTENSIONS"] = "1"  # aiohttp's pure-Python parser words its errors differently
    proc = await asyncio.create_subprocess_exec(*CLI, "run", "--config", str(config), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    auth = b"Authorization: Bearer " + token.encode()
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    bad = {
        "over-long header": head + auth + b"A" * 9000 + b"\r\n\r\n",
        "control character in the header": head + auth + b"\x01\r\n\r\n",
        "NUL in the header": head + auth + b"\x00x\r\n\r\n",
        "space before the colon": head + auth.replace(b":", b" :", 1) + b"\r\n\r\n",
        "over-long request line": b"GET /health?t=" + token.encode() + b"B" * 9000 + b" HTTP/1.1\r\n\r\n",
    }
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while True:  # until the service has started (/positions answers 503 before)
                try:
                    async with session.get(f"http://127.0.0.1:{port}/positions",
                                           headers={"Authorization": f"Bearer {token}"}) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.returncode is None and time.monotonic() < deadline, "the service did not come up"
                await asyncio.sleep(0.1)
        for what, data in bad.items():
            answer = await raw_request(port, data, time.monotonic() + 10)
            assert answer.split(b" ")[1:2] == [b"400"], (what, answer)  # refused, and logged before the answer
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr_bytes = await asyncio.wait_for(proc.communicate(), 30)
    stderr = stderr_bytes.decode(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    outputs = {"stderr": stderr, **{str(p): p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*")
                                    if p.is_file()}}
    for name, text in outputs.items():
        leaked = [w for w in windows(token) if w in text]
        assert not leaked, f"{name} holds part of the token: {leaked[:3]}\n{text[-3000:]}"
    # The fact is kept: one line per refused request, saying what kind of error it was.
    refused = [line for line in stderr.splitlines() if "control API: refused a malformed request" in line]
    assert len(refused) == len(bad), stderr[-3000:]
    assert any("LineTooLong" in line for line in refused) and any("Invalid" in line for line in refused), refused
    log = (tmp_path / "logs" / "lifecycle.log").read_text()
    assert log.count("control API: refused a malformed request") == len(bad)


def test_an_error_of_our_own_handler_keeps_its_traceback_but_not_the_token() -> None:
    """Not a refused request but an error of ours (a handler raising): the traceback stays, the token not."""
    from loguru import logger

    from lifecycle.app.http_log import http_logger

    token = "tok-" + secrets.token_hex(16)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG", format="{level} {message}")
    try:
        log = http_logger("test", [token])
        try:
            raise RuntimeError(f"a handler bug that quotes {token}")
        except RuntimeError as e:
            log.exception("Error handling request from %s", "127.0.0.1", exc_info=e)
    finally:
        logger.remove(sink)
    text = "".join(lines)
    assert text.startswith("ERROR control API (aiohttp): Error handling request from 127.0.0.1")
    assert "RuntimeError: a handler bug that quotes ***" in text and "Traceback" in text
    assert token not in text


# --- 2. secret files others may read are refused, as ssh does -----------------------------------------------


def secret_files_config(tmp_path: Path) -> Path:
    for name, value in (("key", "the-key"), ("secret", "the-secret"), ("token", "the-token")):
        (tmp_path / name).write_text(value + "\n")
        (tmp_path / name).chmod(0o600)
    return write_config(tmp_path / "lifecycle.toml", f'''
[[accounts]]
name = "a"
symbols = ["BTCUSDT"]
api_key_file = "{tmp_path / 'key'}"
secret_file = "{tmp_path / 'secret'}"
[api]
token_file = "{tmp_path / 'token'}"
''')


@pytest.mark.parametrize(("file", "key"), [("key", "accounts.0.api_key_file"), ("secret", "accounts.0.secret_file"),
                                           ("token", "api.token_file")])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_secret_file_open_to_group_or_others_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           file: str, key: str, mode: int) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIFECYCLE_API_TOKEN", raising=False)
    config = secret_files_config(tmp_path)
    assert load(config).api_token().reveal() == "the-token"  # 0600: fine
    (tmp_path / file).chmod(0o400)
    load(config)  # read-only for the owner: fine too
    (tmp_path / file).chmod(mode)
    expected = (f"{key}: {tmp_path / file} is open to group or others (mode {mode:04o}); "
                f"chmod 600 {tmp_path / file}")
    with pytest.raises(ConfigError) as refused:
        load(config)
    assert str(refused.value) == expected
    result = lifecycle("run", "--config", str(config), cwd=tmp_path)
    assert one_error_line(result) == f"configuration error: {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "lifecycle.toml", "secret", "token"]  # nothing else
    if file == "token":  # the commands that talk to the service read the token too
        assert one_error_line(lifecycle("close", "some-id", "--config", str(config), cwd=tmp_path)) == \
            f"configuration error: {expected}"


# --- 3. a database that cannot be opened: one line naming it, exit 2, for every command ----------------------


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in which no file can be created (root ignores modes: then sysfs, which refuses even root)."""
    if os.geteuid() != 0:
        directory = tmp_path / "read-only"
        directory.mkdir()
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    directory = Path("/sys")
    probe = directory / f"lc-{uuid.uuid4().hex}.sqlite"
    try:
        probe.touch()
    except OSError:
        yield directory
        return
    probe.unlink()
    pytest.skip("running as root and /sys accepts new files: no directory here refuses a new file")


def sqlite_in(directory: Path) -> str:
    return f"sqlite:///{directory / 'lifecycle.sqlite'}"


COMMANDS = {"status": ["status"], "history": ["history", "some-position"], "migrate": ["migrate"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unreachable_postgresql_is_one_line_with_the_password_hidden(command: str) -> None:
    result = lifecycle(*COMMANDS[command], "--db", "postgresql://postgres:hunter2@127.0.0.1:1/x")
    line = one_error_line(result)
    assert line.startswith("error: cannot open postgresql://postgres:***@127.0.0.1:1/x: ConnectionRefusedError"), line
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize("query", ["password=S3CRETPW",
                                   "dsn=postgresql%3A%2F%2Fpostgres%3AS3CRETPW%40127.0.0.1%3A1%2Fx"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_password_in_the_urls_query_is_hidden_too(command: str, query: str) -> None:
    """SQLAlchemy hands `?password=` to asyncpg as the password, and `?dsn=` as a whole URL; the message showed
    them (reviews, seventh session)."""
    result = lifecycle(*COMMANDS[command], "--db", f"postgresql://postgres@127.0.0.1:1/x?{query}")
    line = one_error_line(result)
    assert line.startswith(f"error: cannot open postgresql://postgres@127.0.0.1:1/x?{query.split('=')[0]}=***: "), line
    assert "S3CRETPW" not in result.stderr + result.stdout


def test_the_service_hides_a_password_in_the_urls_query(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", 'database_url = "postgresql://postgres@127.0.0.1:1/x?password=S3CRETPW"\n'
                          + account_block())
    result = lifecycle("run", "--config", str(config),
                       env={"LIFECYCLE_API_TOKEN": TOKEN, "SIM_KEY": "k", "SIM_SECRET": "s"})
    line = one_error_line(result)
    assert line.startswith("error: database_url: cannot open postgresql://postgres@127.0.0.1:1/x?password=***: "), line
    assert "S3CRETPW" not in result.stderr + result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_a_sqlite_file_in_a_missing_directory_is_one_line(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "no" / "such" / "directory"
    line = one_error_line(lifecycle(*COMMANDS[command], "--db", sqlite_in(missing)))
    if command == "migrate":
        assert line == (f"error: cannot open {sqlite_in(missing)}: OperationalError: unable to open database file "
                        f"(the directory {missing} does not exist)")
    else:  # the reading commands never create a database
        assert line == f"error: no database file at {missing / 'lifecycle.sqlite'}"
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_sqlite_file_in_an_unwritable_directory_is_one_line(unwritable_dir: Path, command: str) -> None:
    line = one_error_line(lifecycle(*COMMANDS[command], "--db", sqlite_in(unwritable_dir)))
    if command == "migrate":
        assert line.startswith(f"error: cannot open {sqlite_in(unwritable_dir)}: OperationalError: unable to open "
                               "database file"), line
    else:
        assert line == f"error: no database file at {unwritable_dir / 'lifecycle.sqlite'}"


@pytest.mark.parametrize("command", ["status", "history"])
def test_the_configured_database_is_named_by_its_key(tmp_path: Path, command: str) -> None:
    config = write_config(tmp_path / "c.toml", 'database_url = "postgresql://postgres:hunter2@127.0.0.1:1/x"\n'
                          + account_block())
    line = one_error_line(lifecycle(*COMMANDS[command], "--config", str(config), env={"LIFECYCLE_API_TOKEN": TOKEN}))
    assert line.startswith("error: database_url: cannot open postgresql://postgres:***@127.0.0.1:1/x: "), line


def test_a_database_without_the_schema_says_to_migrate(tmp_path: Path) -> None:
    (tmp_path / "empty.sqlite").touch()
    line = one_error_line(lifecycle("status", "--db", sqlite_in(tmp_path).replace("lifecycle.sqlite", "empty.sqlite")))
    assert line.endswith("no such table: positions (no schema yet: run `lifecycle migrate --db URL`)"), line


# --- 4. libpq's sslmode in a PostgreSQL URL -----------------------------------------------------------------


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    """A new, empty PostgreSQL database (no schema), dropped after; skips when the server is absent."""
    name = f"lc_ssl_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except (TimeoutError, OSError) as e:
        reason = f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({type(e).__name__}: {e})"
        if os.environ.get("LIFECYCLE_REQUIRE_POSTGRES") == "1":  # CI: a skipped backend is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    yield _pg_dsn(name)
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _server_ssl(url: str) -> bool:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=3)
    try:
        return await conn.fetchval("SHOW ssl") == "on"
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["disable", "prefer"])
def test_sslmode_in_the_url_opens_and_migrates_a_fresh_database(fresh_pg: str, mode: str) -> None:
    url = f"{fresh_pg}?sslmode={mode}"
    migrated = lifecycle("migrate", "--db", url)
    assert migrated.returncode == 0 and "schema is at head" in migrated.stdout, migrated.stderr
    status = lifecycle("status", "--db", url)
    assert status.returncode == 0 and "no positions in the database" in status.stdout, status.stderr
    # alembic opening its own connection from the URL (no engine handed in) takes it too.
    from alembic import command

    from db.engine import alembic_config

    command.upgrade(alembic_config(url), "head")


@pytest.mark.postgres
def test_sslmode_reaches_the_driver(fresh_pg: str) -> None:
    """Not silently dropped: `require` against a server without TLS fails, and so does a root certificate that
    does not exist (asyncpg looks for the named file, not for ~/.postgresql/root.crt)."""
    if not asyncio.run(_server_ssl(fresh_pg)):
        line = one_error_line(lifecycle("migrate", "--db", f"{fresh_pg}?sslmode=require"))
        assert line.endswith("rejected SSL upgrade"), line
    missing = f"{fresh_pg}?sslmode=verify-full&sslrootcert=/nonexistent/lifecycle-ca.pem"
    line = one_error_line(lifecycle("migrate", "--db", missing))
    assert "FileNotFoundError" in line, line


def test_an_invalid_sslmode_is_one_line_naming_database_url(tmp_path: Path) -> None:
    url = "postgresql://postgres:hunter2@127.0.0.1:5432/x?sslmode=bogus"
    expected = "sslmode in the database url must be one of disable, allow, prefer, require, verify-ca, verify-full"
    assert one_error_line(lifecycle("migrate", "--db", url)) == f"error: {expected}"
    config = write_config(tmp_path / "lifecycle.toml", f'database_url = "{url}"\n' + account_block())
    env = {"SIM_KEY": "k", "SIM_SECRET": "s", "LIFECYCLE_API_TOKEN": TOKEN}
    assert one_error_line(lifecycle("status", "--config", str(config), env=env)) == f"error: database_url: {expected}"
    result = lifecycle("run", "--config", str(config), cwd=tmp_path, env=env)
    assert one_error_line(result) == f"error: database_url: {expected}"
    assert "hunter2" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lifecycle.toml"]  # nothing started
