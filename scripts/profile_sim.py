"""cProfile of an in-process federation: N daemons on the memory transport and trio's virtual clock
(fake trainer, 1 s heartbeats, sqlite without fsync), the set-up of tests/node/test_sim50.py.

    PYTHONPATH=. python scripts/profile_sim.py --nodes 40 --rounds 3 --out /tmp/sim.prof

Prints the wall and CPU time, the virtual time the rounds took and the functions with the most
cumulative time (CPU timer unless --wall: comparable between runs on a loaded machine); `--out`
keeps the profile for `python -m pstats`.

Issue 12, 40 nodes, 3 rounds, profiled (CPU timer), c4e65c7 -> its fix: 108.8 -> 54.1 s, 28.4M ->
16.4M calls; codec.decode 24,720 calls / 28.5 s -> 447 / 1.8 s; verify_signature 12,300 / 6.3 s ->
327 / 0.1 s; live_members 3.2 -> 0.1 s; memory._handle 136,789 -> 89,502 calls.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fednode.state
from tests.node.conftest import cluster, wait_until

LINK_DEGREE = 3  # as test_sim50: each joining node links to 3 earlier ones


class _NoSyncConnection(sqlite3.Connection):
    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.strip().upper().startswith("PRAGMA SYNCHRONOUS"):
            sql = "PRAGMA synchronous=OFF"
        return super().execute(sql, *args)


def _no_fsync() -> None:
    real_connect = sqlite3.connect

    class Sqlite3Shim:
        def __getattr__(self, name: str) -> Any:
            return getattr(sqlite3, name)

        @staticmethod
        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            return real_connect(*args, factory=_NoSyncConnection, **kwargs)

    fednode.state.sqlite3 = Sqlite3Shim()  # type: ignore[assignment]
    os.fsync = lambda fd: None


async def simulate(tmp: Path, nodes: int, rounds: int) -> float:
    """Run `nodes` daemons until each completed `rounds` rounds; returns the virtual seconds it took."""
    sections: dict[str, dict[str, Any]] = {
        "round": {"max_rounds": rounds, "min_participants": 2, "max_participants": nodes,
                  "wait_for_members": nodes, "round_timeout_seconds": 120.0},
        "learning": {"evaluate": False}}
    async with cluster(tmp, auto_link_degree=LINK_DEGREE) as c:
        started = [await c.start(i, nodes, **sections) for i in range(nodes)]
        t0 = trio.current_time()
        await wait_until(lambda: all(n.driver.progress.rounds_completed >= rounds for n in started), timeout=3600.0)
        return trio.current_time() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top", type=int, default=30, help="functions to print, by cumulative time")
    p.add_argument("--sort", default="cumulative", help="pstats sort key (cumulative, tottime, ...)")
    p.add_argument("--out", type=Path, help="write the profile here")
    p.add_argument("--no-profile", action="store_true", help="time only")
    p.add_argument("--wall", action="store_true",
                   help="profile wall time (default: CPU time, comparable between runs on a loaded machine)")
    args = p.parse_args()
    _no_fsync()
    logging.getLogger("fednode").setLevel(logging.ERROR)  # drop warnings would flood the output
    clock = trio.testing.MockClock(autojump_threshold=0.05)  # as test_sim50
    timer = time.perf_counter if args.wall else time.process_time
    profiler = None if args.no_profile else cProfile.Profile(timer)
    with tempfile.TemporaryDirectory(prefix="fednode-sim-") as tmp:
        wall, cpu = time.monotonic(), time.process_time()
        if profiler is not None:
            profiler.enable()
        virtual = trio.run(simulate, Path(tmp), args.nodes, args.rounds, clock=clock)
        if profiler is not None:
            profiler.disable()
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    print(f"{args.nodes} nodes, {args.rounds} rounds: {wall:.1f} s wall, {cpu:.1f} s CPU, {virtual:.1f} virtual s")
    if profiler is not None:
        if args.out:
            profiler.dump_stats(str(args.out))
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
