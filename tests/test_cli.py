"""The command line as a user runs it: a separate process, real files."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lifecycle(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lifecycle.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_demo_walks_every_ending_restarts_and_replays(tmp_path: Path) -> None:
    result = lifecycle("demo", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = dict(re.findall(r"^(\w+USDT)\s+\w+\s+(\w+)\s+\w+\s+\d+$", result.stdout, re.M))
    assert rows == {"BTCUSDT": "CLOSED", "ETHUSDT": "CLOSED_EXTERNAL", "SOLUSDT": "CANCELLED",
                    "XRPUSDT": "PHANTOM", "DOGEUSDT": "CLOSED_EXTERNAL", "ADAUSDT": "CLOSED"}
    assert "positions rehydrated after restart: 1" in result.stdout
    assert "every journal replays to its stored state: yes" in result.stdout
    assert (tmp_path / "lifecycle.sqlite").exists()
    closures = (tmp_path / "records" / "closure.jsonl").read_text().splitlines()
    assert len(closures) == 6
    assert "OPEN --ts_activated--> TS_ACTIVE" in result.stderr  # a readable line per transition


def test_history_prints_a_positions_journal(tmp_path: Path) -> None:
    assert lifecycle("demo", "--workdir", str(tmp_path)).returncode == 0
    import sqlite3

    pid = sqlite3.connect(tmp_path / "lifecycle.sqlite").execute(
        "select id from positions where symbol='DOGEUSDT'").fetchone()[0]
    result = lifecycle("history", pid, "--db", f"sqlite:///{tmp_path / 'lifecycle.sqlite'}")
    assert result.returncode == 0, result.stderr
    assert re.findall(r"--(\w+)--> (\w+)", result.stdout) == [
        ("created", "OPENING"), ("entry_filled", "OPEN"), ("stop_moved", "OPEN"), ("reduced", "OPEN"),
        ("close_requested", "CLOSING_BY_BOT"), ("close_failed", "OPEN"), ("flat", "CLOSED_EXTERNAL")]
    assert result.stdout.rstrip().endswith("liquidation")
    assert lifecycle("history", "nope", "--db", f"sqlite:///{tmp_path / 'lifecycle.sqlite'}").returncode == 1


def test_diagrams_check_fails_on_stale_files_and_passes_after_regeneration(tmp_path: Path) -> None:
    stale = lifecycle("diagrams", "--check", "--out", str(tmp_path))
    assert stale.returncode == 1 and "stale" in stale.stderr
    assert lifecycle("diagrams", "--out", str(tmp_path)).returncode == 0
    assert lifecycle("diagrams", "--check", "--out", str(tmp_path)).returncode == 0


def test_migrate_refuses_an_unsupported_url_with_one_clear_line(tmp_path: Path) -> None:
    result = lifecycle("migrate", "--db", "mysql://root:hunter2@localhost/x")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: database url scheme 'mysql' is not supported")
    assert "hunter2" not in result.stderr + result.stdout
    ok = lifecycle("migrate", "--db", f"sqlite:///{tmp_path / 'x.sqlite'}")
    assert ok.returncode == 0 and "schema is at head" in ok.stdout
