"""python -m chaos: run seeded schedules, replay one, or let hypothesis explore (see chaos/__init__.py)."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from chaos.runner import _failure_text, replay, replay_command, run_many, shrink
from chaos.schedule import for_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--schedules", type=int, default=100, help="how many consecutive seeds to run")
    parser.add_argument("--seed", type=int, default=1, help="the first seed")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--kill-every", type=int, default=10, help="every Nth seed kills the service process")
    parser.add_argument("--report", type=Path, help="write the results and the coverage as JSON here")
    parser.add_argument("--matrix", type=Path, help="write the coverage matrix (Markdown) here")
    parser.add_argument("--log", type=Path, help="append every result here as a JSON line, as it comes")
    parser.add_argument("--shrink", action="store_true", help="shrink the first failing schedule")
    parser.add_argument("--replay", type=int, help="run the schedule of this seed, print its timeline and verdict")
    parser.add_argument("--times", type=int, default=1, help="with --replay: how many times (reproduction rate)")
    parser.add_argument("--hypothesis", type=int, metavar="N", help="let hypothesis explore N schedules (shrinks)")
    args = parser.parse_args(argv)

    if args.replay is not None:
        from loguru import logger

        logger.remove()  # the failure text carries the service's output
        schedule = for_seed(args.replay, kill_every=args.kill_every)
        print(schedule.timeline())
        results = asyncio.run(replay(schedule, args.times))
        failed = [r for r in results if r.get("violations")]
        for r in failed[:1]:
            print(_failure_text(r))
        print(f"reproduced {len(failed)} of {len(results)} runs"
              + (f"; {results[0]['duration_s']} s each" if results else ""))
        if failed and args.shrink:
            small = asyncio.run(shrink(schedule))
            print("shrunk schedule:\n" + small.timeline())
        return 1 if failed else 0

    if args.hypothesis is not None:
        from chaos.explore import explore

        return explore(args.hypothesis)

    seeds = list(range(args.seed, args.seed + args.schedules))
    summary = asyncio.run(run_many(seeds, workers=args.workers, kill_every=args.kill_every, progress=True,
                                   log=args.log))
    print(summary.matrix())
    for failure in summary.failures:
        print()
        print(_failure_text(failure))
    if args.report:
        args.report.write_text(json.dumps({"coverage": summary.coverage(), "wall_s": summary.wall_s,
                                           "results": summary.results}, indent=1, default=str))
    if args.matrix:
        args.matrix.write_text(summary.matrix() + "\n")
    if summary.failures and args.shrink:
        first = summary.failures[0]
        if first.get("seed") is not None:
            small = asyncio.run(shrink(for_seed(first["seed"], kill_every=args.kill_every)))
            print("\nshrunk schedule of seed", first["seed"], f"(replay: {replay_command(first['seed'])}):")
            print(small.timeline())
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
