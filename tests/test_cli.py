"""The command line as a user runs it: a separate process, real files."""
from __future__ import annotations

import re
import subprocess
import sys
from decimal import Decimal as D
from pathlib import Path

from lifecycle.records import JsonlRecords

ROOT = Path(__file__).resolve().parent.parent


def lifecycle(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lifecycle.app.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_demo_history_and_status_show_what_happened(tmp_path: Path) -> None:
    """The demo on the simulator (fast pace), then `history` and `status` read its database."""
    import os

    result = subprocess.run([sys.executable, "-m", "lifecycle.app.cli", "demo", "--workdir", str(tmp_path), "-v"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "LIFECYCLE_DEMO_PACE": "0.2"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OPEN --ts_activated--> TS_ACTIVE" in result.stderr  # -v: a readable line per transition
    summary = result.stdout[result.stdout.index("summary: every ending"):]
    assert "exit price" in summary and "PnL (net of fee)" in summary
    closures = JsonlRecords(tmp_path / "records").read("closure")
    # The liquidation at the long's liquidation price (XRPUSDT, entry 0.6, 20x: 0.6 × 0.954), a loss net of the
    # fee; the ADL of a short in profit; the summary row shows both figures.
    liquidation = next(c for c in closures if c["cause"] == "liquidation")
    shown_net = f"{round(D(liquidation['net_pnl']), 4).normalize():+f}"  # as the tables show a PnL
    assert (D(liquidation["entry_price"]), D(liquidation["exit_price"])) == (D("0.6"), D("0.5724"))
    assert D(liquidation["pnl"]) == (D("0.5724") - D("0.6")) * D(liquidation["quantity"]) < 0
    assert D(liquidation["net_pnl"]) == D(liquidation["pnl"]) - D(liquidation["fee"])
    row = next(line for line in summary.splitlines() if " liquidation " in line)
    assert "0.5724" in row and shown_net in row, row
    adl = next(c for c in closures if c["cause"] == "adl")
    assert D(adl["pnl"]) > 0 and D(adl["exit_price"]) < D(adl["entry_price"])
    assert sorted((c["state"], c["cause"]) for c in closures) == sorted([
        ("CLOSED", "bot"), ("CLOSED_EXTERNAL", "stop_loss"), ("CLOSED_EXTERNAL", "trailing_stop"),
        ("CLOSED_EXTERNAL", "liquidation"), ("CLOSED_EXTERNAL", "adl"), ("CLOSED_EXTERNAL", "manual"),
        ("PHANTOM", "not_found"), ("CLOSED_EXTERNAL", "manual")])
    import sqlite3

    db = f"sqlite:///{tmp_path / 'lifecycle.sqlite'}"
    pid = sqlite3.connect(tmp_path / "lifecycle.sqlite").execute(
        "select id from positions where symbol='SOLUSDT'").fetchone()[0]
    history = lifecycle("history", pid, "--db", db)
    assert history.returncode == 0, history.stderr
    events = re.findall(r"--(\w+)--> (\w+)", history.stdout)
    assert events[:4] == [("created", "OPENING"), ("entry_filled", "OPEN"), ("stop_moved", "OPEN"),
                          ("ts_activated", "TS_ACTIVE")]
    assert ("stop_moved", "TS_ACTIVE") in events and events[-1] == ("flat", "CLOSED_EXTERNAL")
    assert re.search(r"--flat--> CLOSED_EXTERNAL trailing_stop  \| exit [\d.]+, pnl [+-][\d.]+, fee [\d.]+$",
                     history.stdout.rstrip().splitlines()[-1]), history.stdout
    assert re.search(r"--entry_filled--> OPEN  \| filled 1\.0, price 150\.0$", history.stdout, re.M), history.stdout
    assert lifecycle("history", "nope", "--db", db).returncode == 1
    status = lifecycle("status", "--db", db, "--ended", "8")
    assert status.returncode == 0, status.stderr
    assert "positions (0 live)" in status.stdout and status.stdout.count("CLOSED_EXTERNAL") == 6
    assert "PHANTOM" in status.stdout
    row = next(line for line in status.stdout.splitlines() if "XRPUSDT" in line)  # exit, net PnL and cause
    assert re.findall(r"[\w.+-]+", row)[-3:] == ["0.5724", shown_net, "liquidation"]


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
