#!/usr/bin/env python3
"""Start-up benchmark (not a test): one fake-task `fednode run` daemon, from its process start to
"up", with py-libp2p's import trimmed (fednode/transport/libp2p_import.py, the default) and in full
(FEDNODE_LIBP2P_FULL_IMPORT=1), alternating, --reps times each.

Per start, measured side by side: seconds from Popen to the daemon's "running" line, and the CPU
seconds (user + sys) it had used by then. A lone daemon waits for members after "up"; it is stopped
there. Run it on an otherwise idle machine: the wall figure is the issue's "start" figure.

The last line printed is a JSON object of the figures with a "goals" object of booleans (issue 12:
fake-task start <= 3 s): every trimmed start within 3 s, and the trimmed start cheaper in CPU than
the full one (medians).

    python scripts/bench_start.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import trio
from bench_scale import GOAL_START_SECONDS, start_timed, wait_up

from fednode.harness.cluster import LocalCluster
from fednode.transport.libp2p_import import FULL_IMPORT_ENV

MODES = {"trimmed": "0", "full": "1"}


async def start_once(root: Path, full_import: str) -> tuple[float, float]:
    cluster = LocalCluster.create(root, federated=1, gate_off=0, template={},
                                  overrides={"learning": {"task": "fake"}})
    old = os.environ.get(FULL_IMPORT_ENV)
    os.environ[FULL_IMPORT_ENV] = full_import
    try:
        started: dict[int, float] = {}
        up: dict[int, tuple[float, float]] = {}
        start_timed(cluster, cluster.nodes, started)
        await wait_up(cluster.nodes, started, 120.0, up)
        if 0 not in up:
            raise SystemExit(f"the daemon did not come up in 120 s: see {root}/node-0/log.txt")
        return up[0]
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop(FULL_IMPORT_ENV, None)
        else:
            os.environ[FULL_IMPORT_ENV] = old


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="starts per mode (default 5)")
    args = ap.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="fednode-bench-start-") as tmp:
        for rep in range(args.reps):
            order = list(MODES) if rep % 2 == 0 else list(reversed(MODES))  # neither mode always goes first
            for mode in order:
                wall, cpu = await start_once(Path(tmp) / f"{mode}-{rep}", MODES[mode])
                runs[mode].append((wall, cpu))
                print(f"rep {rep} {mode:8s} up {wall:5.2f} s  cpu {cpu:5.2f} s", flush=True)
    out: dict[str, Any] = {}
    print(f"{'mode':8s} {'up median':>10s} {'up max':>7s} {'cpu median':>11s}")
    for mode, rows in runs.items():
        walls, cpus = [w for w, _ in rows], [c for _, c in rows]
        out[mode] = {"up_seconds": [round(w, 2) for w in walls], "up_cpu_seconds": [round(c, 2) for c in cpus],
                     "up_median_s": round(statistics.median(walls), 2), "up_max_s": round(max(walls), 2),
                     "cpu_median_s": round(statistics.median(cpus), 2)}
        row = out[mode]
        print(f"{mode:8s} {row['up_median_s']:10.2f} {row['up_max_s']:7.2f} {row['cpu_median_s']:11.2f}")
    out["loadavg_at_end"] = list(os.getloadavg())
    out["goals"] = {
        "start_le_3s": out["trimmed"]["up_max_s"] <= GOAL_START_SECONDS,
        "trimmed_cheaper_than_full": out["trimmed"]["cpu_median_s"] < out["full"]["cpu_median_s"],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    trio.run(main)
