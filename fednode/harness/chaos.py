"""`scripts/chaos` (python -m fednode.harness.chaos): fault-injection scenarios over real daemons.

Each scenario starts its own federation of `fednode run` processes over libp2p on 127.0.0.1 (fake
task), injects a fault (SIGKILL, restart, straggler), checks what fednode promises and prints
PASS/FAIL with its timing. The last line of the output is one JSON object with every result; the
exit code is 0 only if all scenarios passed. Run dirs are deleted unless --keep (a failed
scenario's dir is always kept, for its logs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from fednode.harness.chaos_scenarios import SCENARIOS
from fednode.harness.chaos_support import DEFAULT_CHAOS_NODES, ChaosOptions, ScenarioResult

MIN_NODES = 4  # scenario b kills two participants and still needs two contributions


async def run_scenario(name: str, opts: ChaosOptions, run_dir: Path) -> ScenarioResult:
    """Run one scenario; never raises for a broken promise (that is a FAIL result)."""
    started = time.monotonic()
    try:
        metrics = await SCENARIOS[name](opts, run_dir)
    except Exception as exc:  # a broken promise (ScenarioFailed) or a bug: either way this one FAILs, the rest run
        return ScenarioResult(name, False, time.monotonic() - started, error=f"{type(exc).__name__}: {exc}"[:4000],
                              run_dir=str(run_dir))
    return ScenarioResult(name, True, time.monotonic() - started, metrics, run_dir=str(run_dir))


async def run_all(names: Sequence[str], opts: ChaosOptions, root: Path, *, keep: bool = False,
                  echo: bool = True) -> list[ScenarioResult]:
    results = []
    for name in names:
        run_dir = root / name
        if echo:
            doc = (SCENARIOS[name].__doc__ or "").strip().splitlines()
            print(f"---- {name}: {doc[0] if doc else ''}", flush=True)
        result = await run_scenario(name, opts, run_dir)
        results.append(result)
        if echo:
            verdict = "PASS" if result.passed else "FAIL"
            detail = json.dumps(result.metrics, sort_keys=True) if result.passed else result.error
            print(f"{verdict} {name} {result.seconds:.1f} s {detail}", flush=True)
        if result.passed and not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return results


async def _until_signalled(fn: Callable[[], Awaitable[list[ScenarioResult]]]) -> list[ScenarioResult]:
    """SIGTERM/SIGINT cancel the run, so each scenario's `finally` stops its daemons (they run in
    their own sessions and would otherwise outlive us)."""
    results: list[ScenarioResult] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                async for signum in signals:
                    print(f"chaos: {signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
                    nursery.cancel_scope.cancel()

            async def work() -> None:
                results.extend(await fn())
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(work)
    return results


def summary_json(results: Sequence[ScenarioResult], opts: ChaosOptions, wall: float) -> dict[str, Any]:
    return {"passed": all(r.passed for r in results) and bool(results), "nodes": opts.nodes,
            "wall_seconds": round(wall, 2), "options": dataclasses.asdict(opts),
            "scenarios": {r.name: r.to_json() for r in results}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--nodes", type=int, default=DEFAULT_CHAOS_NODES, help=f"daemons per scenario (>= {MIN_NODES})")
    p.add_argument("--only", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                   help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    p.add_argument("--keep", action="store_true", help="keep every run dir (failed ones are always kept)")
    p.add_argument("--run-dir", type=Path, default=None, help="where run dirs go (default runs/chaos-<time>)")
    p.add_argument("--heartbeat", type=float, default=ChaosOptions.heartbeat_seconds,
                   help="heartbeat interval in seconds")
    args = p.parse_args(argv)
    if args.nodes < MIN_NODES:
        p.error(f"--nodes must be >= {MIN_NODES}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    opts = ChaosOptions(nodes=args.nodes, heartbeat_seconds=args.heartbeat)
    root = args.run_dir or Path("runs") / time.strftime("chaos-%Y%m%d-%H%M%S")
    names = args.only or list(SCENARIOS)
    started = time.monotonic()
    results = trio.run(_until_signalled, lambda: run_all(names, opts, root, keep=args.keep))
    wall = time.monotonic() - started
    passed = sum(r.passed for r in results)
    print(f"chaos: {passed}/{len(results)} scenarios passed with {opts.nodes} nodes in {wall:.1f} s", flush=True)
    if not args.keep and root.exists() and not any(root.iterdir()):
        root.rmdir()
    print(json.dumps(summary_json(results, opts, wall), sort_keys=True), flush=True)
    return 0 if passed == len(results) == len(names) else 1  # an interrupted run is no pass


if __name__ == "__main__":
    sys.exit(main())
