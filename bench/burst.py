"""A liquidation cascade through the real service: many positions flattened on the venue within milliseconds.

The simulator runs in its own process (`python -m exchange.sim --symbols N`), the service in another
(`lifecycle run`, SQLite, the defaults of a production configuration). The positions are opened through the
service's control API, one per symbol, each protected by its stop; then one control call makes the
simulator flatten all of them at once, in turns: a liquidation, a manual close by another client, an ADL, and
a stop fill (the mark moved through the stop). The records the service writes are read as they appear: the
latency of each close is from the venue's own time of the closing fill to the `committed_at` of its terminal
transition record (the commit acknowledged, both clocks this machine's); the time until its closure record
is seen in its file (after the records thread's write and this script's poll) is printed too.

Printed: p50 / p99 / max per cause and overall, how many ended in the right terminal state with the right
cause, the service's CPU and garbage collections (count and pause by generation, from its metrics) from the
flatten call to the last closure seen, and its group-commit figures (transitions per transaction).

Run: python -m bench.burst [--positions 50] [--rounds 1]   (BURST_KEEP=1 keeps the service's files)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("liquidation", "manual", "adl", "stop")
EXPECTED_CAUSE = {"liquidation": "liquidation", "manual": "manual", "adl": "adl", "stop": "stop_loss"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_ms(pid: int) -> tuple[float, float] | None:
    """CPU time (user + system, ms) of a process's main thread (its event loop) and of its other threads, from
    /proc (Linux); None elsewhere. Less noisy than a latency when two versions of the code are compared."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        main = other = 0.0
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            used = (int(fields[11]) + int(fields[12])) * 1000 / tick  # utime, stime
            if task.name == str(pid):
                main += used
            else:
                other += used
        return main, other
    except (OSError, ValueError, IndexError):
        return None


async def _gc_figures(http: aiohttp.ClientSession, api: str, auth: dict[str, str]) -> dict[str, float]:
    """The service's garbage-collection counters from its metrics (lifecycle/app/garbage.py)."""
    async with http.get(f"{api}/metrics", headers=auth) as answer:
        text = await answer.text()
    figures = {}
    for line in text.splitlines():
        if line.startswith(("lifecycle_gc_collections_total{", "lifecycle_gc_pause_ms_total{",
                            "lifecycle_gc_quiet_collections_total{")):
            name, value = line.rsplit(" ", 1)
            figures[name] = float(value)
    return figures


def _gc_window(before: dict[str, float], after: dict[str, float]) -> str:
    parts = []
    for g in range(3):
        label = f'{{generation="{g}"}}'
        count = after.get(f"lifecycle_gc_collections_total{label}", 0) - before.get(
            f"lifecycle_gc_collections_total{label}", 0)
        if count:
            took = after.get(f"lifecycle_gc_pause_ms_total{label}", 0) - before.get(
                f"lifecycle_gc_pause_ms_total{label}", 0)
            quiet = after.get(f"lifecycle_gc_quiet_collections_total{label}", 0) - before.get(
                f"lifecycle_gc_quiet_collections_total{label}", 0)
            quietly = f", {quiet:.0f} at quiet moments" if quiet else ""
            parts.append(f"generation {g}: {count:.0f} ({took:.1f} ms{quietly})")
    return ", ".join(parts) or "none"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _read_json_line(stream: asyncio.StreamReader) -> dict[str, Any]:
    text = ""
    while True:
        line = (await stream.readline()).decode()
        if not line:
            raise RuntimeError(f"the simulator ended before printing its keys: {text!r}")
        text += line
        try:
            found: dict[str, Any] = json.loads(text)
            return found
        except json.JSONDecodeError:
            continue


class Closures:
    """Tails the record files of one kind (`closure`, `transition`) of the service and notes when each line
    appeared; `keep` picks the lines (the terminal transitions)."""

    def __init__(self, directory: Path, kind: str = "closure",
                 keep: Callable[[dict[str, Any]], bool] = lambda record: True) -> None:
        self.directory, self.kind, self.keep = directory, kind, keep
        self.seen: dict[str, tuple[float, dict[str, Any]]] = {}  # position id -> (wall ms seen, record)
        self._offsets: dict[Path, int] = {}

    def poll(self) -> None:
        now = time.time() * 1000
        for path in sorted(self.directory.glob(f"{self.kind}-*.jsonl")):
            with path.open("rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            self._offsets[path] = self._offsets.get(path, 0) + len(complete)
            for line in complete.splitlines():
                record = json.loads(line)
                if self.keep(record):
                    self.seen.setdefault(record["position_id"], (now, record))


async def run(positions: int, rounds: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="burst-"))
    rest_port, ws_port, api_port = _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
    env["PYTHONPATH"] = str(ROOT)
    sim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exchange.sim", "--rest-port", str(rest_port), "--ws-port", str(ws_port),
        "--random-walk", "0", "--symbols", str(positions + 6), cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE)
    service: asyncio.subprocess.Process | None = None
    failures = 0
    try:
        assert sim.stdout is not None
        keys = await asyncio.wait_for(_read_json_line(sim.stdout), 30)
        control = f"http://127.0.0.1:{rest_port}/_sim"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{control}/symbols") as answer:
                # the synthetic ones (mark 100): one notional for all, whatever the real symbols' prices
                symbols: list[str] = [s for s in (await answer.json())["symbols"] if s[1:4].isdigit()][:positions]
            urls = "\n".join(f'"{k}" = "{v}"' for k, v in keys["ccxt_url_overrides"].items())
            config = work / "lifecycle.toml"
            config.write_text(f'''database_url = "sqlite:///{work / 'lifecycle.sqlite'}"
log_dir = "{work / 'logs'}"
[records]
dir = "{work / 'records'}"
[api]
port = {api_port}
[[accounts]]
name = "burst"
symbols = {json.dumps(symbols)}
api_key_env = "BURST_KEY"
secret_env = "BURST_SECRET"
[accounts.urls]
{urls}
''', encoding="utf-8")
            token = secrets.token_hex(16)
            service = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lifecycle.app.cli", "run", "-c", str(config), cwd=ROOT,
                env={**env, "BURST_KEY": keys["api_key"], "BURST_SECRET": keys["secret"],
                     "LIFECYCLE_API_TOKEN": token},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            api = f"http://127.0.0.1:{api_port}"
            auth = {"Authorization": f"Bearer {token}"}
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.get(f"{api}/health", headers=auth) as answer:
                        if (await answer.json()).get("status") == "ok":
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline or service.returncode is not None:
                    raise RuntimeError(f"the service did not come up; its log is in {work / 'logs'}")
                await asyncio.sleep(0.2)
            closures = Closures(work / "records")
            terminal = Closures(work / "records", "transition",
                                lambda r: r.get("dest") in ("CLOSED", "CLOSED_EXTERNAL", "PHANTOM", "CANCELLED"))
            for round_no in range(1, rounds + 1):
                failures += await _round(http, api, auth, control, keys["api_key"], symbols, closures, terminal,
                                         round_no, service.pid)
            async with http.get(f"{api}/metrics", headers=auth) as answer:
                metrics = await answer.text()
            for line in metrics.splitlines():
                if line.startswith("lifecycle_commit_"):
                    print("  " + line)
    finally:
        for process in (service, sim):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
        if os.environ.get("BURST_KEEP"):
            print(f"  (kept: {work}: the service's database, records and log)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return failures


async def _round(http: aiohttp.ClientSession, api: str, auth: dict[str, str], control: str, api_key: str,
                 symbols: list[str], closures: Closures, terminal: Closures, round_no: int, service_pid: int) -> int:
    opened: dict[str, str] = {}  # symbol -> position id
    deadline = time.monotonic() + 60
    while True:  # the previous round's positions finish their cleanup (cancels) before the symbols reopen
        async with http.get(f"{api}/positions", headers=auth) as answer:
            if not await answer.json():
                break
        if time.monotonic() > deadline:
            raise RuntimeError("the previous round's positions are still live after 60 s")
        await asyncio.sleep(0.1)

    async def open_one(symbol: str) -> None:
        body = {"account": "burst", "symbol": symbol, "side": "long", "quantity": "1", "stop_loss_pct": "2"}
        async with http.post(f"{api}/positions", json=body, headers=auth) as answer:
            if answer.status != 201:
                raise RuntimeError(f"open {symbol}: {answer.status} {await answer.text()}")
            opened[symbol] = (await answer.json())["id"]

    started = time.monotonic()
    for chunk in range(0, len(symbols), 25):  # the API serves them concurrently; 25 at a time is polite
        await asyncio.gather(*(open_one(s) for s in symbols[chunk:chunk + 25]))
    while True:  # every one protected before the cascade
        async with http.get(f"{api}/positions", headers=auth) as answer:
            listed = {p["id"]: p for p in await answer.json()}
        if all(listed.get(pid, {}).get("stop_price") for pid in opened.values()):
            break
        limit = max(120.0, 0.5 * len(symbols))  # ccxt's rate limiter paces the opens (about 3 requests each)
        if time.monotonic() - started > limit:
            raise RuntimeError(f"positions not protected within {limit:.0f} s")
        await asyncio.sleep(0.2)
    opened_s = time.monotonic() - started
    initial = Closures(closures.directory, "stop_move", keep=lambda record: record.get("mode") == "initial")
    wanted = set(opened.values())
    deadline = time.monotonic() + 10
    while not wanted <= initial.seen.keys() and time.monotonic() < deadline:  # written by the records thread
        initial.poll()
        await asyncio.sleep(0.05)
    stop_ms = [float(initial.seen[pid][1]["latency_ms"]) for pid in wanted if pid in initial.seen]
    kind_of = {symbol: KINDS[i % len(KINDS)] for i, symbol in enumerate(symbols)}
    profile = os.environ.get("BURST_PROFILE")  # a py-spy profile of the service during the cascade
    # (BURST_PROFILE_FORMAT=speedscope keeps the order of the samples: a timeline)
    spy = None if not profile else await asyncio.create_subprocess_exec(
        "py-spy", "record", "--pid", str(service_pid), "--duration", "3", "--rate", "500", "--format",
        os.environ.get("BURST_PROFILE_FORMAT", "raw"), "-o", f"{profile}.{round_no}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    if spy is not None:
        await asyncio.sleep(1.0)  # py-spy attached
    gc_before = await _gc_figures(http, api, auth)
    cpu_before = _cpu_ms(service_pid)
    async with http.post(f"{control}/burst", json={"api_key": api_key, "closes": [
            {"symbol": s, "kind": kind_of[s]} for s in symbols]}) as answer:
        venue = await answer.json()
    venue_ms = {row["symbol"]: float(row["at_ms"]) for row in venue["closed"]}
    spread = max(venue_ms.values()) - min(venue_ms.values())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(pid in closures.seen and pid in terminal.seen
                                                  for pid in opened.values()):
        closures.poll()
        terminal.poll()
        await asyncio.sleep(0.02)  # the figure is committed_at: polling often would only take CPU from the service
    cpu_after = _cpu_ms(service_pid)
    gc_after = await _gc_figures(http, api, auth)
    if spy is not None:
        await spy.wait()
    by_kind: dict[str, list[float]] = {k: [] for k in KINDS}  # venue close -> terminal transition committed
    on_disk: list[float] = []  # venue close -> closure record seen in its file
    wrong: list[str] = []
    for symbol, pid in opened.items():
        if pid not in closures.seen or pid not in terminal.seen:
            wrong.append(f"{symbol}: no closure record or terminal transition within 30 s")
            continue
        seen_ms, record = closures.seen[pid]
        on_disk.append(seen_ms - venue_ms[symbol])
        committed = datetime.fromisoformat(terminal.seen[pid][1]["committed_at"]).timestamp() * 1000
        by_kind[kind_of[symbol]].append(committed - venue_ms[symbol])
        if record["state"] != "CLOSED_EXTERNAL" or record["cause"] != EXPECTED_CAUSE[kind_of[symbol]]:
            wrong.append(f"{symbol}: {record['state']} cause {record['cause']} (expected CLOSED_EXTERNAL "
                         f"{EXPECTED_CAUSE[kind_of[symbol]]})")
    every = [v for values in by_kind.values() for v in values]
    decided = [float(r["detection_latency_ms"]) for _, r in closures.seen.values()
               if r.get("detection_latency_ms") is not None and r["position_id"] in opened.values()]
    if decided:
        print(f"  (the service's own figure, venue event time -> terminal transition decided: p50 "
              f"{_pct(decided, 0.5):.1f} ms, p99 {_pct(decided, 0.99):.1f} ms, max {max(decided):.1f} ms)")
    print(f"round {round_no}: {len(opened)} positions opened and protected in {opened_s:.1f} s, flattened on the "
          f"venue within {spread:.1f} ms")
    if stop_ms:
        print(f"  initial stops, request -> the venue's acknowledgement (rate limiter wait included): n={len(stop_ms)} "
              f"p50 {_pct(stop_ms, 0.5):.0f} ms  p99 {_pct(stop_ms, 0.99):.0f} ms  max {max(stop_ms):.0f} ms")
    print("  venue close -> terminal transition committed (its record's committed_at):")
    for kind, values in [*by_kind.items(), ("all", every), ("(closure record seen on disk)", on_disk)]:
        if values:
            print(f"  {kind:12s} n={len(values):4d}  p50 {_pct(values, 0.5):7.1f} ms  p99 {_pct(values, 0.99):7.1f} ms"
                  f"  max {max(values):7.1f} ms  mean {statistics.fmean(values):7.1f} ms")
    print(f"  right terminal state and cause: {len(opened) - len(wrong)}/{len(opened)}")
    if cpu_before is not None and cpu_after is not None:
        print(f"  the service's CPU from the flatten call to the last closure seen: event loop's thread "
              f"{cpu_after[0] - cpu_before[0]:.0f} ms, its other threads {cpu_after[1] - cpu_before[1]:.0f} ms")
    print(f"  garbage collections in the service from the flatten call to the last closure seen: "
          f"{_gc_window(gc_before, gc_after)}")
    for line in wrong[:20]:
        print("    " + line)
    return len(wrong)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    sys.exit(1 if asyncio.run(run(args.positions, args.rounds)) else 0)


if __name__ == "__main__":
    main()
