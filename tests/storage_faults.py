"""Real storage failures for tests: a small filesystem that fills up, and PostgreSQL stopped and started.

Both need root (mount, pg_ctlcluster); where the machine refuses, the fixtures skip with the reason.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


class SmallDisk:
    """A tmpfs of a few MiB mounted at `path`: `fill()` takes every free byte (writes then fail with
    ENOSPC, as on a full disk), `free()` gives them back."""

    def __init__(self, path: Path, size: str = "8m") -> None:
        self.path = path
        self.size = size
        self._filler = path / ".filler"
        self._filling = threading.Event()
        self._keeper: threading.Thread | None = None

    def mount(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") is None:
            pytest.skip("no mount command here: a small filesystem cannot be mounted to fill it")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small filesystem here (root needed): {done.stderr.strip()}")
        return self

    def fill(self) -> None:
        """Take every free byte, and keep taking what frees up (as another process filling the disk would)
        until `free()`."""
        self._filling.set()
        self._take()
        self._keeper = threading.Thread(target=self._keep_full, daemon=True)
        self._keeper.start()

    def free(self) -> None:
        self._filling.clear()
        if self._keeper is not None:
            self._keeper.join()
            self._keeper = None
        self._filler.unlink(missing_ok=True)

    def _keep_full(self) -> None:
        while self._filling.wait(0) and self._filling.is_set():
            self._take()
            time.sleep(0.005)

    def _take(self) -> None:
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        chunk = b"\0" * 65536
        try:
            while self._filling.is_set():
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        break
                    chunk = chunk[: len(chunk) // 2]
        finally:
            os.close(fd)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "small").mount()
    try:
        yield disk
    finally:
        disk.free()
        disk.unmount()


def postgres_cluster() -> list[str]:
    """`pg_ctlcluster VERSION main` for this machine's cluster, or a skip with the reason."""
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        pytest.skip("pg_ctlcluster is not available: PostgreSQL cannot be restarted by a test here")
    versions = sorted(os.listdir("/etc/postgresql"))
    if not versions:
        pytest.skip("no PostgreSQL cluster configured in /etc/postgresql")
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"]


def postgres(action: str) -> None:
    """Stop (fast: connections cut, as a crash or restart does) or start the local PostgreSQL cluster; a
    start waits until it accepts connections. Doing what is already done is fine."""
    cluster = postgres_cluster()
    running = subprocess.run([*cluster, "status"], capture_output=True).returncode == 0
    if running is (action == "start"):
        return
    command = cluster + [action] + (["-m", "fast"] if action == "stop" else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {(done.stderr or done.stdout).strip()}")
    if action == "start":
        for _ in range(300):
            if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("PostgreSQL did not accept connections within 30 s of its start")


class DriverErrors:
    """The database driver's own error (its DBAPI `OperationalError`, "disk I/O error"), raised at the
    connection level for every statement of `repo` (a Repository: each of its engines, the SQLite writer's
    included) while switched on: what a lost connection or a failing disk looks like to the code above the
    driver."""

    def __init__(self, repo: Any) -> None:
        from sqlalchemy import event

        # The hooks are installed once, here, and switched by a flag: SQLAlchemy's listen/remove must not run
        # while another thread (the SQLite writer's) dispatches the same event.
        self.active = False
        for engine in repo.sync_engines:
            dbapi = engine.dialect.dbapi

            def fail(*_: Any, dbapi: Any = dbapi) -> None:
                if self.active:
                    raise dbapi.OperationalError("chaos: disk I/O error (connection lost)")

            event.listen(engine, "before_cursor_execute", fail)

    def on(self) -> None:
        self.active = True

    def off(self) -> None:
        self.active = False
