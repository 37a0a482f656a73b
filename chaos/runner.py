"""Many schedules in worker processes, the coverage matrix, replays and shrinking.

Each worker is a process of its own (`python -m chaos.runner --worker ...`): its own event loop, its own small
filesystem (a tmpfs of a few MiB, mounted where the machine allows it, for the full-disk fault) and its own
PostgreSQL database (schedules on PostgreSQL use it, each with an account name of its own). It runs its seeds
one after another and prints one JSON line per schedule; the parent gathers them.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from chaos.schedule import Schedule, for_seed

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("LIFECYCLE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


# --- the worker's own storage ---------------------------------------------------------------------------

def mount_small_disk(path: Path, size: str = "64m") -> tuple[Any, str | None]:
    """A tmpfs at `path` (a SmallDisk that can be filled), or (None, why not)."""
    from tests.storage_faults import SmallDisk

    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return None, "no mount command"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        return None, f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"
    return SmallDisk(path, size), None


class PgAdmin:
    """The worker's PostgreSQL database, and the `pg_outage` fault on it: every connection to it cut and new
    ones refused (what a restarting server looks like to its clients), then allowed again."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cut_now = False

    @property
    def url(self) -> str:
        return PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + self.name

    async def _admin(self, *statements: str) -> None:
        import asyncpg

        for attempt in range(20):
            conn = await asyncpg.connect(PG_ADMIN_DSN.replace("postgresql+asyncpg://", "postgresql://"), timeout=3)
            try:
                for statement in statements:
                    await conn.execute(statement)
                return
            except asyncpg.InternalServerError as e:  # "tuple concurrently updated": another worker's ALTER
                if attempt == 19:
                    raise
                await asyncio.sleep(0.02 * (attempt + 1))
                del e
            finally:
                await conn.close()

    async def create(self) -> str | None:
        try:
            await self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)', f'CREATE DATABASE "{self.name}"')
        except Exception as e:  # noqa: BLE001 - absent server: postgres schedules run on SQLite, the report says why
            return f"PostgreSQL not reachable at {PG_ADMIN_DSN}: {type(e).__name__}: {e}"
        return None

    async def drop(self) -> None:
        with contextlib.suppress(Exception):
            await self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true',
                              f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    async def cut(self) -> None:
        self.cut_now = True
        await self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false',
                          f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self.name}' "
                          "AND pid <> pg_backend_pid()")

    async def restore(self) -> None:
        if self.cut_now:
            await self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')
            self.cut_now = False


# --- one schedule -------------------------------------------------------------------------------------------

@dataclass
class Env:
    base: Path  # where schedules' directories go (on the small disk when there is one)
    keep: Path  # where a failing schedule's directory is copied
    disk: Any = None
    disk_why: str | None = None
    pg: PgAdmin | None = None
    pg_why: str | None = None


# A schedule takes seconds; one that runs this long is hung, reported as a failure (CHAOS_SCHEDULE_TIMEOUT_S: the
# test of a worker's restart after a hang sets it low).
SCHEDULE_TIMEOUT_S = float(os.environ.get("CHAOS_SCHEDULE_TIMEOUT_S", "120"))


class ScheduleHung(Exception):
    """The schedule did not finish in time: something awaited forever (its tasks' stacks are in the message)."""


async def _bounded(work: Any, timeout_s: float) -> Any:
    """Await `work`; past `timeout_s`, describe where every task of the loop waits, cancel it (waiting at most
    30 s for its cleanup) and raise ScheduleHung: a hang is a failure to report, never a CI run that hangs
    (CI hung on one schedule of 500, 2026-12-04, which did not hang again in replays)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        return task.result()
    stacks = io.StringIO()
    for other in asyncio.all_tasks():
        if other is not asyncio.current_task():
            other.print_stack(limit=12, file=stacks)
    task.cancel()
    await asyncio.wait({task}, timeout=30)
    raise ScheduleHung(f"the schedule did not finish within {timeout_s:g} s; where its tasks waited:\n"
                       + stacks.getvalue()[-20000:])


async def run_schedule(schedule: Schedule, env: Env) -> dict[str, Any]:
    """Run one schedule and judge it; a JSON-able result."""
    from chaos.checks import judge
    from chaos.world import World

    notes: list[str] = []
    if schedule.database == "postgres" and env.pg is None:
        notes.append(f"postgres schedule ran on SQLite: {env.pg_why}")
        schedule = Schedule(schedule.seed, schedule.symbols, schedule.steps, "sqlite", schedule.kill_at_ms,
                            schedule.length_ms)
    workdir = Path(tempfile.mkdtemp(prefix=f"s{schedule.seed}-", dir=env.base))
    started = time.monotonic()
    result: dict[str, Any] = {"seed": schedule.seed, "database": schedule.database,
                              "kill": schedule.kill_at_ms is not None, "notes": notes}
    try:
        world = World(schedule, workdir, pg_url=env.pg.url if env.pg else None, pg_admin=env.pg, disk=env.disk)
        run = await _bounded(world.run(), SCHEDULE_TIMEOUT_S)
        verdict = judge(run)
        result.update(
            violations=[{"invariant": x.invariant, "text": x.describe()} for x in verdict.violations],
            checks={str(k): n for k, n in verdict.checks.items()},
            applied=run.applied, skipped=run.skipped, settled_in=run.settled_in, restarts=run.restarts,
            commands={o.error_type or "ok": 1 for o in run.outcomes}, notes=notes + run.notes,
            stalls=sum(1 for w in run.windows if w[2] == "stall"),
            unprotected_max=max([(i.end or run.clear_at) - i.start for i in run.ledger.intervals] or [0.0]))
        if verdict.violations:
            result["output_tail"] = run.output[-6000:]
            result["venue"] = run.venue[-60:]
    except Exception as e:  # noqa: BLE001 - the harness itself failed: reported as such, never as a pass
        detail = "" if isinstance(e, ScheduleHung) else traceback.format_exc()[-3000:]  # its message says where
        result["hung"] = isinstance(e, ScheduleHung)
        result.update(violations=[{"invariant": 0, "text": f"harness error: {type(e).__name__}: {e}\n"
                                                              + detail}],
                      checks={}, applied={}, skipped={})
    result["duration_s"] = round(time.monotonic() - started, 3)
    if result["violations"]:
        result["timeline"] = schedule.timeline()
        kept = env.keep / workdir.name
        with contextlib.suppress(Exception):
            shutil.copytree(workdir, kept, dirs_exist_ok=True)
            result["kept"] = str(kept)
    shutil.rmtree(workdir, ignore_errors=True)
    return result


@contextlib.asynccontextmanager
async def worker_env(worker: str, keep: Path) -> Any:
    scratch = Path(tempfile.mkdtemp(prefix=f"chaos-{worker}-"))
    disk, why = mount_small_disk(scratch / "disk")
    base = scratch / "disk" if disk is not None else scratch / "plain"
    base.mkdir(parents=True, exist_ok=True)
    admin = PgAdmin(f"chaos_{worker}_{os.getpid()}")
    pg: PgAdmin | None = admin
    pg_why = await admin.create()
    if pg_why is not None:
        pg = None
    keep.mkdir(parents=True, exist_ok=True)
    try:
        yield Env(base, keep, disk, why, pg, pg_why)
    finally:
        if pg is not None:
            await pg.drop()
        if disk is not None:
            disk.free()
            disk.unmount()
        shutil.rmtree(scratch, ignore_errors=True)


async def _worker(worker: str, seeds: list[int], keep: Path, kill_every: int) -> None:
    logger.remove()  # the schedules' own sinks collect what they need
    tainted = False
    async with worker_env(worker, keep) as env:
        print(json.dumps({"worker": worker, "disk": env.disk_why or "tmpfs", "postgres": env.pg_why or "ok"}),
              flush=True)
        for index, seed in enumerate(seeds):
            result = await run_schedule(for_seed(seed, kill_every=kill_every), env)
            print(json.dumps(result, default=str), flush=True)
            if result.get("hung"):
                # What the hung world left running (its scheduler's jobs, its clients, its threads) cannot be
                # trusted to stop: in one CI run it failed the next 106 schedules of this worker. A new process
                # takes the rest (`run_many`); this one ends without waiting for those leftovers.
                print(json.dumps({"restart": seeds[index + 1:]}), flush=True)
                tainted = True
                break
    if tainted:  # the tmpfs and the database are gone (worker_env); the leftovers die with the process
        os._exit(0)


# --- many schedules -----------------------------------------------------------------------------------------

@dataclass
class Summary:
    results: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r.get("violations")]

    def coverage(self) -> dict[str, Any]:
        """Each kind × schedules that exercised it (and that found nothing to act on), each invariant × checks."""
        exercised: Counter[str] = Counter()
        skipped: Counter[str] = Counter()
        checks: Counter[str] = Counter()
        for r in self.results:
            for kind, n in (r.get("applied") or {}).items():
                exercised[kind] += 1 if n else 0
            for kind, n in (r.get("skipped") or {}).items():
                skipped[kind] += 1 if n else 0
            for inv, n in (r.get("checks") or {}).items():
                checks[inv] += n
        databases = Counter(r.get("database") for r in self.results)
        return {"schedules": len(self.results), "killed": sum(1 for r in self.results if r.get("kill")),
                "databases": dict(databases), "exercised": dict(exercised), "skipped": dict(skipped),
                "checks": dict(checks)}

    def matrix(self) -> str:
        from chaos.checks import INVARIANTS
        from chaos.schedule import CATEGORIES

        cov = self.coverage()
        lines = [f"{cov['schedules']} schedules ({cov['killed']} with a killed service process; databases "
                 f"{cov['databases']}), {len(self.failures)} with violations, {self.wall_s:.0f} s "
                 f"({60 * cov['schedules'] / max(self.wall_s, 1e-9):.0f} schedules/minute)", "",
                 "| category | kind | schedules exercising it | found nothing to act on |", "|---|---|---:|---:|"]
        for category, kinds in CATEGORIES.items():
            for kind in kinds:
                lines.append(f"| {category} | {kind} | {cov['exercised'].get(kind, 0)} | "
                             f"{cov['skipped'].get(kind, 0)} |")
        lines += ["", "| invariant | checks |", "|---|---:|"]
        for number, text in INVARIANTS.items():
            lines.append(f"| {number}. {text} | {cov['checks'].get(str(number), 0)} |")
        return "\n".join(lines)


async def run_many(seeds: list[int], *, workers: int = 2, keep: Path | None = None, kill_every: int = 10,
                   progress: bool = False, log: Path | None = None) -> Summary:
    """`log`: every result is appended there as one JSON line as it comes (a long soak stopped early keeps
    what it ran)."""
    keep = keep or Path(tempfile.gettempdir()) / "chaos-failures"
    summary = Summary()
    started = time.monotonic()
    shares = [seeds[i::workers] for i in range(workers)]

    async def worker(name: str, share: list[int]) -> None:
        """One worker process for `share`; a worker that stops after a hung schedule hands the rest of its
        share to a new process (`_worker`)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chaos.runner", "--worker", name, "--seeds", ",".join(map(str, share)),
            "--keep", str(keep), "--kill-every", str(kill_every), cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=2 ** 24)
        rest: list[int] = []
        reading = asyncio.ensure_future(read(proc, rest))
        assert proc.stderr is not None
        err = await proc.stderr.read()
        await reading
        code = await proc.wait()
        if code != 0:
            summary.results.append({"seed": None, "violations": [{"invariant": 0, "text":
                                    f"a worker exited with {code}: {err.decode(errors='replace')[-3000:]}"}]})
        if rest:
            await worker(f"{name}r", rest)  # after a hung schedule: the rest of the share in a new process

    async def read(proc: asyncio.subprocess.Process, rest: list[int]) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            try:
                item = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if "worker" in item:
                summary.workers.append(item)
                continue
            if "restart" in item:
                rest.extend(int(seed) for seed in item["restart"])
                continue
            summary.results.append(item)
            if log is not None:
                with open(log, "a", encoding="utf-8") as out:
                    out.write(json.dumps(item, default=str) + "\n")
            if progress and (len(summary.results) % 50 == 0 or item.get("violations")):
                elapsed = time.monotonic() - started
                print(f"  {len(summary.results)}/{len(seeds)} schedules, {len(summary.failures)} failing, "
                      f"{elapsed:.0f} s", file=sys.stderr, flush=True)
                if item.get("violations"):
                    print(_failure_text(item), file=sys.stderr, flush=True)

    await asyncio.gather(*(worker(f"w{index}", share) for index, share in enumerate(shares) if share))
    done = {r.get("seed") for r in summary.results}
    for seed in seeds:
        if seed not in done:
            summary.results.append({"seed": seed, "violations": [{"invariant": 0, "text": "no result (worker died)"}]})
    summary.wall_s = time.monotonic() - started
    return summary


def replay_command(seed: int | None) -> str:
    return f"python -m chaos --replay {seed}"


def _failure_text(result: dict[str, Any]) -> str:
    lines = [f"FAILED seed {result.get('seed')} ({result.get('database')}, kill={result.get('kill')}); replay: "
             f"{replay_command(result.get('seed'))}"]
    if result.get("timeline"):
        lines.append(result["timeline"])
    for v in result.get("violations", []):
        lines.append(v["text"])
    if result.get("venue"):
        lines.append("  the venue's orders for the account at the end:")
        lines += [f"    {line}" for line in result["venue"]]
    if result.get("kept"):
        lines.append(f"  files kept in {result['kept']}")
    return "\n".join(lines)


# --- replay and shrink ----------------------------------------------------------------------------------------

async def replay(schedule: Schedule, times: int = 1) -> list[dict[str, Any]]:
    keep = Path(tempfile.gettempdir()) / "chaos-failures"
    results = []
    async with worker_env("replay", keep) as env:
        for _ in range(times):
            results.append(await run_schedule(schedule, env))
    return results


async def shrink(schedule: Schedule, *, budget_s: float = 120.0, tries: int = 2) -> Schedule:
    """Delta debugging on the timeline: drop steps one at a time, keep a drop when the smaller schedule still
    breaks an invariant (tried `tries` times: interleavings vary). Bounded by `budget_s`."""
    keep = Path(tempfile.gettempdir()) / "chaos-failures"
    deadline = time.monotonic() + budget_s
    current = schedule
    async with worker_env("shrink", keep) as env:
        index = len(current.steps) - 1
        while index >= 0 and time.monotonic() < deadline:
            candidate = current.without(index)
            for _ in range(tries):
                result = await run_schedule(candidate, env)
                if result.get("violations"):
                    current = candidate
                    break
            index -= 1
    return current


def _worker_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--seeds", required=True)
    parser.add_argument("--keep", required=True, type=Path)
    parser.add_argument("--kill-every", type=int, default=10)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    # Stopped from outside (a soak cut short): unwind, so the tmpfs is unmounted and the database dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    asyncio.run(_worker(args.worker, seeds, args.keep, args.kill_every))


if __name__ == "__main__":
    _worker_main()
