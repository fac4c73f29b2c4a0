"""`scripts/faults` (python -m fednode.harness.faults): randomised fault sequences over real daemons.

A few federations of `fednode run` processes (libp2p on 127.0.0.1, fake task, rounds of about a
second) each run many short fault sequences back to back (fault_plan: SIGKILL / SIGTERM / restart of
the coordinator or a participant at a moment of the round, a corrupted or deleted blob, including the
latest merged one, with the node running or stopped, and a full disk: one node's data dir is a small
tmpfs when we are root). After each sequence every stopped node is started again, the federation
must finish a round opened after that on every node, and the checker (fault_check) reads every
node's round records, state.sqlite and log. A sequence FAILs on any broken promise: two merged
adapters for one round, an accepted submission lost or counted twice, a daemon exit we did not
cause (or a SIGTERM that did not exit 0), a traceback, work abandoned on a local blob fault, or no
progress. Prints PASS/FAIL per sequence; the last line is one JSON object. The plan depends only on
--seed (printed first and on failure); rerun with it to replay the same sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from fednode.harness import fault_check
from fednode.harness.fault_cluster import (
    DEFAULT_CLUSTERS,
    DEFAULT_SEQUENCES,
    DEFAULT_TIME_BOUND_SECONDS,
    LIVENESS_KINDS,
    MIN_NODES,
    FaultCluster,
    FaultOptions,
    ProgressLost,
    SequenceResult,
    SequenceStopped,
)
from fednode.harness.fault_plan import ACTION_KINDS, make_plan
from fednode.harness.fault_plan import Sequence as FaultSequence

__all__ = ["SEED_ENV", "FaultOptions", "FaultRun", "SequenceResult", "default_seed", "main", "run_faults"]

SEED_ENV = "FEDNODE_FAULTS_SEED"
FULL_RECOVERY_EVERY = 3  # every 3rd sequence (and a federation's last) waits for all nodes, not just the live


@dataclass
class FaultRun:
    seed: int
    results: list[SequenceResult]
    wall_seconds: float
    disk: str  # "tmpfs" or why the disk-full sequences were skipped
    planned: int
    sigterm_seconds: list[float] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and len(self.results) == self.planned and all(r.passed for r in self.results)

    def violations_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            for v in r.violations:
                out[v.kind] = out.get(v.kind, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        executed: dict[str, int] = {}
        for r in self.results:
            for kind in r.executed:
                executed[kind] = executed.get(kind, 0) + 1
        return {"passed": self.passed, "seed": self.seed, "planned": self.planned, "run": len(self.results),
                "passed_sequences": sum(r.passed for r in self.results), "wall_seconds": round(self.wall_seconds, 2),
                "disk_full": self.disk, "executed_actions": executed, "sigterms": len(self.sigterm_seconds),
                "sigterm_to_exit_max_seconds": round(max(self.sigterm_seconds, default=0.0), 2),
                "violations_by_kind": self.violations_by_kind(),
                "replay": f"scripts/faults --seed {self.seed} --sequences {self.planned}",
                "results": [r.to_json() for r in self.results]}


def _echo(result: SequenceResult, seed: int) -> None:
    verdict = "PASS" if result.passed else "FAIL"
    print(f"{verdict} {result.name} [cluster {result.cluster}] {result.seconds:.1f} s: {result.actions}", flush=True)
    for note in result.notes:
        print(f"     . {note}", flush=True)
    for v in result.violations:
        mark = "~" if v.kind in LIVENESS_KINDS and result.passed else "!"
        print(f"     {mark} {v.kind}: {v.detail[:fault_check.MAX_DETAIL_CHARS]}", flush=True)
    if not result.passed:
        print(f"     (replay: scripts/faults --seed {seed})", flush=True)


async def run_cluster(index: int, sequences: list[FaultSequence], opts: FaultOptions, root: Path,
                      limiter: trio.CapacityLimiter, start_lock: trio.Lock, deadline: float,
                      echo: bool) -> tuple[list[SequenceResult], str, list[float]]:
    async with limiter:
        rng = random.Random(f"{opts.seed}/cluster-{index}")
        results: list[SequenceResult] = []
        fc = FaultCluster(index, root / f"c{index}", opts, rng)
        try:
            try:
                async with start_lock:  # one federation imports its stack at a time: 2 cores
                    await fc.start()
            except ProgressLost as exc:
                fc.check()
                for seq in sequences:
                    results.append(SequenceResult(seq.index, seq.name, index, False, 0.0, seq.describe(),
                                                  [fault_check.Violation("no_progress", "start", str(exc)),
                                                   *fc.violations], ["not run: the federation never started"]))
                return results, fc.disk_reason, fc.sigterm_seconds
            for k, seq in enumerate(sequences):
                if trio.current_time() > deadline:
                    results += [SequenceResult(rest.index, rest.name, index, False, 0.0, rest.describe(), [],
                                               [f"not run: over the run's time bound of "
                                                f"{opts.time_bound_seconds:.0f} s"]) for rest in sequences[k:]]
                    break
                full = (k + 1) % FULL_RECOVERY_EVERY == 0 or k == len(sequences) - 1
                try:
                    result = await fc.run_sequence(seq, full=full)
                except SequenceStopped as stop:
                    results.append(stop.result)
                    if echo:
                        _echo(stop.result, opts.seed)
                    for rest in sequences[k + 1:]:
                        results.append(SequenceResult(rest.index, rest.name, index, False, 0.0, rest.describe(),
                                                      [], [f"not run: cluster {index} made no progress after "
                                                           f"{seq.name}"]))
                    break
                results.append(result)
                if echo:
                    _echo(result, opts.seed)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await fc.stop()
                finally:
                    fc.unmount()
            ran = [r for r in results if r.seconds > 0]
            if fc.violations and ran:  # found at teardown: charged to the last sequence that ran
                ran[-1].violations.extend(fc.violations)
                ran[-1].passed = False
                if echo:
                    for v in fc.violations:
                        print(f"FAIL {ran[-1].name} [cluster {index}] at teardown: {v.kind}: {v.detail[:600]}",
                              flush=True)
        return results, fc.disk_reason, fc.sigterm_seconds


async def run_faults(opts: FaultOptions, root: Path, *, echo: bool = True) -> FaultRun:
    started = time.monotonic()
    plan = make_plan(opts.seed, opts.sequences, disk_full=opts.disk_full and os.geteuid() == 0, kinds=opts.kinds,
                     r36=opts.r36)
    groups = [[s for s in plan if s.index % opts.clusters == k] for k in range(opts.clusters)]
    limiter = trio.CapacityLimiter(max(1, opts.parallel))
    start_lock = trio.Lock()
    deadline = trio.current_time() + opts.time_bound_seconds
    outcomes: list[tuple[list[SequenceResult], str, list[float]]] = []

    async def one(k: int) -> None:
        outcomes.append(await run_cluster(k, groups[k], opts, root, limiter, start_lock, deadline, echo))

    async with trio.open_nursery() as nursery:
        for k in range(opts.clusters):
            if groups[k]:
                nursery.start_soon(one, k)
    results = sorted((r for rs, _, _ in outcomes for r in rs), key=lambda r: r.index)
    reasons = {reason for _, reason, _ in outcomes}
    disk = "tmpfs" if reasons == {""} else "; ".join(sorted(r for r in reasons if r)) or "tmpfs"
    stops = [t for _, _, ts in outcomes for t in ts]
    return FaultRun(opts.seed, results, time.monotonic() - started, disk, len(plan), stops)


async def _until_signalled(fn: Callable[[], Awaitable[FaultRun]]) -> FaultRun | None:
    """SIGTERM/SIGINT cancel the run, so each federation's `finally` stops its daemons and unmounts."""
    out: list[FaultRun] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                async for signum in signals:
                    print(f"faults: {signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
                    nursery.cancel_scope.cancel()

            async def work() -> None:
                out.append(await fn())
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(work)
    return out[0] if out else None


def default_seed() -> int:
    env = os.environ.get(SEED_ENV, "").strip()
    return int(env) if env else random.SystemRandom().randrange(2**31)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/faults", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seed", type=int, default=None, help=f"plan seed (default: ${SEED_ENV}, else random)")
    p.add_argument("--sequences", type=int, default=DEFAULT_SEQUENCES, help="fault sequences in all (>= 1)")
    p.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS, help="federations the sequences are spread over")
    p.add_argument("--parallel", type=int, default=None, help="federations running at once (default: all)")
    p.add_argument("--nodes", type=int, default=MIN_NODES, help=f"daemons per federation (>= {MIN_NODES})")
    p.add_argument("--no-disk-full", action="store_true", help="never mount a tmpfs (no disk-full sequences)")
    p.add_argument("--kinds", default="", help=f"comma-separated fault kinds to draw from: {','.join(ACTION_KINDS)}")
    p.add_argument("--no-r36", action="store_true", help="leave out the fixed r36 case (sequence 0)")
    p.add_argument("--time-bound", type=float, default=DEFAULT_TIME_BOUND_SECONDS,
                   help="seconds after which sequences not started yet FAIL as not run")
    p.add_argument("--strict-liveness", action="store_true",
                   help="a node that stops making progress FAILs its sequence (default: reported only)")
    p.add_argument("--keep", action="store_true", help="keep the run dir even when everything passed")
    p.add_argument("--run-dir", type=Path, default=None, help="where run dirs go (default runs/faults-<time>)")
    args = p.parse_args(argv)
    if args.nodes < MIN_NODES:
        p.error(f"--nodes must be >= {MIN_NODES}")
    if args.sequences < 1 or args.clusters < 1:
        p.error("--sequences and --clusters must be >= 1")
    args.kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip()) or None
    if args.kinds and set(args.kinds) - set(ACTION_KINDS):
        p.error(f"--kinds: unknown {sorted(set(args.kinds) - set(ACTION_KINDS))}; known: {', '.join(ACTION_KINDS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seed = default_seed() if args.seed is None else args.seed
    opts = FaultOptions(seed=seed, sequences=args.sequences, clusters=args.clusters,
                        parallel=args.parallel or args.clusters, nodes=args.nodes, disk_full=not args.no_disk_full,
                        kinds=args.kinds, r36=not args.no_r36, time_bound_seconds=args.time_bound,
                        strict_liveness=args.strict_liveness)
    root = args.run_dir or Path("runs") / time.strftime("faults-%Y%m%d-%H%M%S")
    print(f"faults: seed {seed} ({args.sequences} sequences over {args.clusters} federations of {args.nodes} "
          f"daemons; run dir {root})", flush=True)
    run = trio.run(_until_signalled, lambda: run_faults(opts, root))
    if run is None:
        print(json.dumps({"passed": False, "seed": seed, "interrupted": True}), flush=True)
        return 1
    ok = sum(r.passed for r in run.results)
    print(f"faults: {ok}/{run.planned} sequences passed in {run.wall_seconds:.1f} s (seed {seed}; disk full: "
          f"{run.disk}); violations: {run.violations_by_kind() or 'none'}", flush=True)
    if run.passed and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(run.to_json(), sort_keys=True), flush=True)
    return 0 if run.passed else 1


if __name__ == "__main__":
    sys.exit(main())
