"""What the chaos scenarios share: their options, a federation of real daemons watched through
their control sockets, and waiting for a condition with a bound (never an unbounded hang).

A scenario is an `async def (opts, run_dir) -> dict` that drives a `Federation`, raises
`ScenarioFailed` when a check does not hold, and returns the figures it measured.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from fednode.errors import FednodeError
from fednode.harness.cluster import LocalCluster, NodeProcess
from fednode.harness.run import poll
from fednode.node.records import read_records
from fednode.node.reports import CurrentRound, NodeStatus, RecordState, RoundRecord, TrainingProgress

T = TypeVar("T")
Statuses = dict[int, NodeStatus]  # node index -> its latest answer

DEFAULT_CHAOS_NODES = 5
DEFAULT_POLL_SECONDS = 0.2
DEFAULT_SEED_WAIT_SECONDS = 60.0
LOG_TAIL_BYTES = 1500


class ScenarioFailed(FednodeError):
    """A chaos scenario's check did not hold (or its condition never came)."""


@dataclass(frozen=True)
class ChaosOptions:
    """Timings of the scenarios. Node i's fake steps take (1 + i mod 4) x `step_seconds`, so with the
    defaults a round's submissions arrive 1-4 s after its manifest, spread out."""

    nodes: int = DEFAULT_CHAOS_NODES
    heartbeat_seconds: float = 0.5
    liveness_heartbeats: float = 4.0  # failover after 2 s of silence with the defaults
    step_seconds: float = 0.1
    local_steps: int = 10
    round_timeout_seconds: float = 60.0  # scenarios other than the straggler's close early, not at it
    straggler_deadline_seconds: float = 8.0  # the straggler scenario's round deadline
    straggler_slack_seconds: float = 5.0  # its round must be published within deadline + this
    aggregate_delay_seconds: float = 3.0  # coordinator-restart scenario: the gap it is killed in
    # ...failover after 40 s, slower than a restart: a daemon took 14 s from exec to "up" while ./scripts/test
    # ran two pytest workers and the fault test beside it, and the 15 s used before then let the others fail over
    restart_liveness_heartbeats: float = 80.0
    recovery_bound_seconds: float = 30.0  # coordinator killed: kill -> survivors' round published
    scenario_timeout_seconds: float = 150.0  # any single wait inside a scenario
    poll_seconds: float = DEFAULT_POLL_SECONDS
    seeds_first: bool = True  # start the two bootstrap nodes first, the others once they answer


@dataclass
class ScenarioResult:
    name: str
    passed: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    run_dir: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "seconds": round(self.seconds, 2),
                "metrics": self.metrics, "error": self.error, "run_dir": self.run_dir}


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioFailed(message)


def base_overrides(opts: ChaosOptions, *, rounds: int, min_participants: int,
                   liveness_heartbeats: float | None = None) -> dict[str, dict[str, Any]]:
    n = opts.nodes
    return {
        "learning": {"task": "fake", "fake_step_seconds": opts.step_seconds},
        "round": {"local_steps": opts.local_steps, "round_timeout_seconds": opts.round_timeout_seconds,
                  "max_rounds": rounds, "min_participants": min_participants, "wait_for_members": n,
                  "max_participants": n},
        "coordinator": {"heartbeat_interval_seconds": opts.heartbeat_seconds,
                        "liveness_timeout_heartbeats": liveness_heartbeats or opts.liveness_heartbeats},
        "community": {"id": "chaos"},
        "network": {"gossip_heartbeat_seconds": 1.0},
    }


def _merge(base: dict[str, dict[str, Any]], top: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in top.items():
        out.setdefault(k, {}).update(v)
    return out


class Federation:
    """A LocalCluster of federated fake-task daemons plus what a scenario asks of it."""

    def __init__(self, cluster: LocalCluster, opts: ChaosOptions) -> None:
        self.cluster = cluster
        self.opts = opts
        self.statuses: Statuses = {}

    @classmethod
    def create(cls, run_dir: Path, opts: ChaosOptions, *, rounds: int, min_participants: int,
               overrides: dict[str, dict[str, Any]] | None = None,
               node_overrides: dict[int, dict[str, dict[str, Any]]] | None = None,
               keys_from: Path | None = None, liveness_heartbeats: float | None = None) -> Federation:
        if run_dir.exists() and any(run_dir.iterdir()):  # a daemon would resume the old run's state
            raise ScenarioFailed(f"{run_dir} exists and is not empty; choose a fresh run dir")
        sections = _merge(base_overrides(opts, rounds=rounds, min_participants=min_participants,
                                         liveness_heartbeats=liveness_heartbeats), overrides or {})
        cluster = LocalCluster.create(run_dir, federated=opts.nodes, gate_off=0, template={}, overrides=sections,
                                      node_overrides=node_overrides, keys_from=keys_from)
        return cls(cluster, opts)

    @property
    def nodes(self) -> list[NodeProcess]:
        return self.cluster.nodes

    async def start(self, nodes: list[NodeProcess] | None = None) -> None:
        """Start `nodes` (default all); the two bootstrap nodes first when they are among them."""
        todo = list(self.nodes if nodes is None else nodes)
        seeds = [n for n in todo if n.index < 2] if self.opts.seeds_first else []
        if seeds:
            self.cluster.start(seeds)
            await self.wait_for(lambda st: len([s for s in seeds if s.index in st]) == len(seeds) or None,
                                "the bootstrap nodes answer", timeout=DEFAULT_SEED_WAIT_SECONDS)
        self.cluster.start([n for n in todo if n not in seeds])

    def kill(self, node: NodeProcess) -> float:
        """SIGKILL; returns the wall-clock time of the kill (the daemons' clock, for their records)."""
        at = time.time()
        self.cluster.kill(node)
        return at

    def stop(self) -> None:
        self.cluster.stop()

    async def refresh(self) -> Statuses:
        self.statuses = await poll(self.cluster)
        return self.statuses

    async def wait_for(self, predicate: Callable[[Statuses], T | None], what: str, *,
                       timeout: float | None = None) -> T:
        """Poll every node's status until `predicate` returns something (not None/False)."""
        limit = self.opts.scenario_timeout_seconds if timeout is None else timeout
        with trio.move_on_after(limit):
            while True:
                statuses = await self.refresh()
                self._check_no_unplanned_death()
                self._check_no_failed_round()
                value = predicate(statuses)
                if value is not None and value is not False:
                    return value
                await trio.sleep(self.opts.poll_seconds)
        raise ScenarioFailed(f"timed out after {limit:.0f} s waiting until {what}; last status: "
                             f"{json.dumps(self.summary())}")

    def _check_no_unplanned_death(self) -> None:
        for node in self.nodes:
            if node.process is not None and not node.alive and not node.killed:
                raise ScenarioFailed(f"node-{node.index} exited on its own (code {node.process.returncode}): "
                                     f"{log_tail(node)}")

    def _check_no_failed_round(self) -> None:
        """Every scenario keeps >= min_participants alive: a failed round is a broken promise (and
        with max_rounds reached nothing would happen any more; fail now, not at the timeout)."""
        for node in self.nodes:
            status = self.statuses.get(node.index)
            if status is not None and status.progress.rounds_failed:
                failed = [r for r in read_records(node.folder) if r.state is RecordState.FAILED]
                raise ScenarioFailed(f"node-{node.index} saw a round fail: " + "; ".join(
                    f"round {r.round_number}: {r.failure_reason}; rejected "
                    f"{[(x.node_id[-8:], x.detail[:160]) for x in r.rejected]}" for r in failed))

    def summary(self) -> dict[int, dict[str, Any]]:
        out = {}
        for i, s in self.statuses.items():
            cur, training = s.progress.current_round, s.progress.training
            out[i] = {"coordinator": s.coordinator[-8:], "term": s.term,
                      "round": cur.round_number if cur else None, "state": cur.state.value if cur else None,
                      "role": cur.role.value if cur else None, "submissions": cur.submissions if cur else None,
                      "completed": s.progress.rounds_completed,
                      "training": training.state.value if training else None}
        return out

    def agreed_coordinator(self, statuses: Statuses,
                           among: list[NodeProcess] | None = None) -> NodeProcess | None:
        """The node every live node of `among` (default all) names as coordinator, if it is one of ours,
        alive, and names itself too."""
        group = [n for n in (among or self.nodes) if n.alive]
        if any(n.index not in statuses for n in group):
            return None
        named = {statuses[n.index].coordinator for n in group}
        if len(named) != 1:
            return None
        coordinator_id = named.pop()
        for node in self.nodes:
            own = statuses.get(node.index)
            if node.node_id == coordinator_id and node.alive and own is not None and own.coordinator == coordinator_id:
                return node
        return None

    def node_by_id(self, node_id: str) -> NodeProcess | None:
        return next((n for n in self.nodes if n.node_id == node_id), None)

    def records(self, node: NodeProcess) -> dict[int, RoundRecord]:
        """Published round records of `node`, by round number."""
        return {r.round_number: r for r in read_records(node.folder) if r.published}

    def published(self, nodes: list[NodeProcess], round_number: int) -> dict[int, RoundRecord]:
        """round `round_number`'s record from each of `nodes`; ScenarioFailed if one lacks it."""
        out = {}
        for node in nodes:
            record = self.records(node).get(round_number)
            check(record is not None, f"node-{node.index} has no published record of round {round_number}")
            assert record is not None
            out[node.index] = record
        return out


def completed(nodes: list[NodeProcess], rounds: int) -> Callable[[Statuses], bool]:
    def predicate(statuses: Statuses) -> bool:
        return all((s := statuses.get(n.index)) is not None and s.progress.rounds_completed >= rounds for n in nodes)

    return predicate


def current_round(status: NodeStatus | None) -> CurrentRound | None:
    return status.progress.current_round if status is not None else None


def training(status: NodeStatus | None) -> TrainingProgress | None:
    return status.progress.training if status is not None else None


def one_merged_hash(records: dict[int, RoundRecord], what: str) -> str:
    hashes = {r.merged_sha256 for r in records.values()}
    check(len(hashes) == 1, f"{what}: nodes disagree on the merged adapter: "
                            f"{ {i: r.merged_sha256[:12] for i, r in records.items()} }")
    return hashes.pop()


def accepted_ids(record: RoundRecord) -> set[str]:
    return record.accepted_ids()


def log_tail(node: NodeProcess) -> str:
    path = node.folder / "log.txt"
    if not path.exists():
        return "(no log)"
    data = path.read_bytes()[-LOG_TAIL_BYTES:]
    return data.decode("utf-8", "replace")
