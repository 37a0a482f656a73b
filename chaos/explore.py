"""Hypothesis explores schedules (every choice recorded), and shrinks a failing one to a small one.

    python -m chaos --hypothesis 200

Slower per schedule than the seeded mode (one process, no workers, and shrinking reruns the engine many
times), so it is for hunting, not for CI. A failure prints the shrunk schedule's timeline and its verdict.
"""
from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings

from chaos.runner import Env, PgAdmin, _failure_text, mount_small_disk, run_schedule
from chaos.schedule import Schedule, schedules


def explore(max_examples: int, *, kill: bool | None = False) -> int:
    from loguru import logger

    logger.remove()  # a failure's text carries the service's output
    scratch = Path(tempfile.mkdtemp(prefix="chaos-hyp-"))
    disk, why = mount_small_disk(scratch / "disk")
    base = scratch / "disk" if disk is not None else scratch
    admin = PgAdmin("chaos_hypothesis")
    pg: PgAdmin | None = admin
    pg_why = asyncio.run(admin.create())
    if pg_why is not None:
        pg = None
    env = Env(base, Path(tempfile.gettempdir()) / "chaos-failures", disk, why, pg, pg_why)
    env.keep.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []

    @settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    @given(schedules(kill=kill, database=None if pg is not None else "sqlite"))
    def check(schedule: Schedule) -> None:
        result = asyncio.run(run_schedule(schedule, env))
        if result.get("violations"):
            failures.append(_failure_text(result))
            raise AssertionError(_failure_text(result))

    try:
        check()
        print(f"{max_examples} schedules explored, no invariant broken")
        return 0
    except AssertionError as e:
        print(f"shrunk failing schedule ({len(failures)} failing runs while shrinking):\n{e}")
        return 1
    finally:
        if pg is not None:
            asyncio.run(pg.drop())
        if disk is not None:
            disk.free()
            disk.unmount()
        with contextlib.suppress(OSError):
            scratch.rmdir()
