"""`fednode harness`: run a local multi-node federation and collect what it did.

Starts N federated daemons (plus optional members with federated_learning = false) as OS
processes over libp2p on 127.0.0.1, watches them through their control sockets (live progress:
round, members joined, submissions, training steps, blob transfer), optionally SIGKILLs the
coordinator in the middle of a round, waits for R rounds, stops everything with SIGTERM and
writes a report (JSON + PNG) from the nodes' own round records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from fednode.consensus.round_state import Phase, Role
from fednode.errors import FednodeError
from fednode.harness.cluster import LocalCluster, NodeProcess, load_template
from fednode.harness.view import LiveView
from fednode.node.control import ControlError, query_status
from fednode.node.records import read_records, record_path
from fednode.node.reports import NodeStatus

logger = logging.getLogger("fednode.harness")

POLL_INTERVAL_SECONDS = 0.5
BOOTSTRAP_WAIT_SECONDS = 120.0
DEFAULT_HARNESS_TIMEOUT_SECONDS = 1800.0


class HarnessError(FednodeError):
    """The federation did not complete what was asked."""


@dataclass
class HarnessOptions:
    nodes: int = 4
    rounds: int = 3
    config: Path | None = None
    kill_coordinator_at: int | None = None
    gate_off_nodes: int = 0
    run_dir: Path | None = None
    timeout: float = DEFAULT_HARNESS_TIMEOUT_SECONDS
    live: bool = True
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class HarnessResult:
    run_dir: Path
    completed: bool
    rounds: list[dict[str, Any]]
    statuses: dict[int, NodeStatus]
    killed: list[dict[str, Any]]
    exit_codes: dict[int, int | None]
    wall_seconds: float
    problems: list[str]


def default_overrides(opts: HarnessOptions) -> dict[str, dict[str, Any]]:
    """What a local federation needs on top of the user's config (all overridable by --config)."""
    n = opts.nodes
    # With a planned kill, the round needs every survivor: an announcement lost while the mesh
    # re-forms around the dead coordinator is re-published (round.reannounce_seconds, with backoff).
    min_participants = n - 1 if opts.kill_coordinator_at is not None and n > 2 else n
    return {
        # Wait for everyone before the first round; with a planned kill, the survivors must suffice.
        "round": {"max_rounds": opts.rounds, "wait_for_members": max(1, min_participants),
                  "min_participants": max(1, min_participants), "max_participants": n,
                  "reannounce_seconds": 2.0},
        "coordinator": {"heartbeat_interval_seconds": 1.0},
        "community": {"id": "local-harness"},
    }


def _merge(base: dict[str, dict[str, Any]], top: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in top.items():
        out.setdefault(k, {}).update(v)
    return out


async def run_harness(opts: HarnessOptions) -> HarnessResult:
    run_dir = opts.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    template = load_template(opts.config)
    overrides = _merge(default_overrides(opts), template)  # the user's config wins over our defaults
    overrides = _merge(overrides, opts.overrides)
    cluster = LocalCluster.create(run_dir, federated=opts.nodes, gate_off=opts.gate_off_nodes, template={},
                                  overrides=overrides)
    started = time.monotonic()
    # The bootstrap nodes first: peers that dial before anyone listens only back off and retry.
    seeds = cluster.nodes[:2]
    cluster.start(seeds)
    with trio.move_on_after(BOOTSTRAP_WAIT_SECONDS):
        while len(await poll(cluster)) < len(seeds) and all(n.alive for n in seeds):
            await trio.sleep(0.2)
    cluster.start(cluster.nodes[2:])
    view = LiveView(cluster, opts.rounds, enabled=opts.live)
    killed: list[dict[str, Any]] = []
    statuses: dict[int, NodeStatus] = {}
    problems: list[str] = []
    completed = False
    try:
        with view, trio.move_on_after(opts.timeout) as scope:
            while True:
                statuses = await poll(cluster)
                view.update(statuses, time.monotonic() - started)
                dead = [n for n in cluster.nodes if not n.alive and not n.killed]
                if dead:
                    problems += [f"node-{n.index} exited early (code {n.process.returncode if n.process else '?'}); "
                                 f"see {n.folder / 'log.txt'}" for n in dead]
                    break
                maybe_kill(cluster, statuses, opts, killed, time.monotonic() - started)
                if all_done(cluster, statuses, opts.rounds):
                    completed = True
                    break
                await trio.sleep(POLL_INTERVAL_SECONDS)
        if scope.cancelled_caught:
            problems.append(f"timed out after {opts.timeout:.0f} s")
    finally:
        exit_codes = cluster.stop()
    wall = time.monotonic() - started
    rounds = collect_rounds(cluster, opts.rounds)
    for r in rounds:
        if len(r["merged_sha256_by_node"]) > 1:
            problems.append(f"round {r['round_number']}: nodes disagree on the merged adapter")
    if len(rounds) < opts.rounds:
        problems.append(f"only {len(rounds)} of {opts.rounds} rounds have records")
    result = HarnessResult(run_dir, completed and not problems, rounds, statuses, killed, exit_codes, wall, problems)
    (run_dir / "harness.json").write_text(json.dumps(result_json(result, cluster), indent=2, sort_keys=True))
    return result


async def poll(cluster: LocalCluster, timeout: float = 2.0) -> dict[int, NodeStatus]:
    """Each live node's status. A node that does not answer is left out (asked again next time);
    one that answers with a status that does not fit NodeStatus raises ReportError, naming the field."""
    out: dict[int, NodeStatus] = {}

    async def one(node: NodeProcess) -> None:
        if not node.alive:
            return
        # not up yet, busy, or dying (the connection reset): the next poll asks again
        with contextlib.suppress(ControlError, trio.BrokenResourceError, OSError):
            out[node.index] = await query_status(node.control_socket, timeout=timeout)

    async with trio.open_nursery() as nursery:
        for node in cluster.nodes:
            nursery.start_soon(one, node)
    return out


def maybe_kill(cluster: LocalCluster, statuses: dict[int, NodeStatus], opts: HarnessOptions,
               killed: list[dict[str, Any]], elapsed: float) -> None:
    """SIGKILL the coordinator once, mid-collection of round `kill_coordinator_at`, after at least one
    submission arrived (so there is accepted work a successor must not lose)."""
    if opts.kill_coordinator_at is None or killed:
        return
    for node in cluster.nodes:
        s = statuses.get(node.index)
        cur = s.progress.current_round if s else None
        if (s and cur and node.alive and s.coordinator == node.node_id and cur.role is Role.COORDINATOR
                and cur.round_number == opts.kill_coordinator_at and cur.state is Phase.COLLECTING
                and cur.submissions >= 1):
            cluster.kill(node)
            killed.append({"node": node.index, "node_id": node.node_id, "round_number": cur.round_number,
                           "submissions_at_kill": cur.submissions, "at_seconds": round(elapsed, 2)})
            logger.warning("harness: SIGKILLed coordinator node-%d in round %d", node.index, cur.round_number)
            return


def all_done(cluster: LocalCluster, statuses: dict[int, NodeStatus], rounds: int) -> bool:
    live_fl = [n for n in cluster.nodes if n.federated_learning and n.alive]
    if not live_fl:
        return False
    # Done when every live node installed `rounds` rounds and has scored them (records complete).
    return all((s := statuses.get(n.index)) is not None and s.progress.rounds_completed >= rounds
               and s.progress.pending_evaluations == 0 for n in live_fl)


def collect_rounds(cluster: LocalCluster, rounds: int) -> list[dict[str, Any]]:
    """One entry per published round, from every federated node's records."""
    by_number: dict[int, dict[str, Any]] = {}
    for node in cluster.nodes:
        for record in read_records(node.folder):
            if not record.published:
                continue
            entry = by_number.setdefault(record.round_number, {
                "round_number": record.round_number, "round_id": record.round_id,
                "aggregation": record.aggregation, "merged_sha256_by_node": {}, "participants": [],
                "merged_metrics": {}, "local_metrics": {}, "records": {}, "wall_seconds": None,
                "coordinator": record.final_coordinator_node_id, "bytes_moved": 0,
            })
            entry["merged_sha256_by_node"].setdefault(record.merged_sha256, []).append(node.index)
            entry["records"][node.index] = str(record_path(node.folder, record.round_number))
            merged = record.metrics.get("merged")  # absent until the coordinator scored it
            if merged:
                entry["merged_metrics"][node.index] = merged
            local = record.metrics.get("local")
            if local:
                entry["local_metrics"][node.index] = local
            if node.node_id == record.final_coordinator_node_id or not entry["participants"]:
                entry["participants"] = [a.node_id for a in record.accepted]
                entry["merged_size"] = record.merged_size
                entry["delta_bytes"] = sum(_blob_size(node, a.blob_sha256) for a in record.accepted)
                entry["wall_seconds"] = round(record.finished_at - record.created_at, 2)
    out = []
    for number in sorted(by_number):
        e = by_number[number]
        receivers = sum(1 for n in cluster.nodes if n.federated_learning) - 1
        e["bytes_moved"] = int(e.get("delta_bytes", 0) + e.get("merged_size", 0) * max(receivers, 0))
        out.append(e)
    return out[:rounds] if rounds else out


def _blob_size(node: NodeProcess, sha: str) -> int:
    path = node.folder / "blobs" / sha
    return path.stat().st_size if path.exists() else 0


def result_json(result: HarnessResult, cluster: LocalCluster) -> dict[str, Any]:
    return {
        "run_dir": str(result.run_dir),
        "completed": result.completed,
        "problems": result.problems,
        "wall_seconds": round(result.wall_seconds, 2),
        "killed": result.killed,
        "exit_codes": {str(k): v for k, v in result.exit_codes.items()},
        "nodes": [{"index": n.index, "node_id": n.node_id, "federated_learning": n.federated_learning,
                   "folder": str(n.folder), "port": n.port} for n in cluster.nodes],
        "rounds": result.rounds,
        "final_status": {str(k): v.to_json() for k, v in result.statuses.items()},
    }
