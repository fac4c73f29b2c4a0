"""500 nodes on the memory transport and trio's virtual clock, 10 rounds, churn: between
consecutive rounds 10% of the live nodes crash (no goodbye) and 10% new nodes join, so every round
after the first has a different membership (9 churn steps; joiners take part from the next round).
Every live node ends with the same merged adapter, and every round's merged adapter is the
num_samples-weighted FedAvg of its accepted updates, recomputed here from scratch (each update
re-trained by a fresh FakeTrainer, averaged in float64 by `checks.fedavg_float64`, not by
fednode.aggregation).

Settings (documented, chosen for wall time on 2 shared cores, not to hide anything):
- heartbeats every 20 virtual s (liveness 50 s) for the coordinator; the members pace theirs by the
  community's size (election-v1 rule 14, the default heartbeat_fanin 4), i.e. every 30 s
  (max_heartbeat_interval): every heartbeat is flooded to and handled by all ~500 nodes in this one
  process; rounds still close early once every live member has submitted;
- the coordinator is never among the leavers (an election costs a liveness timeout; test_fork,
  test_crash and tests/chaos cover coordinator loss);
- sqlite without fsync (test_sim50's `no_fsync`): durability is test_crash's subject.
"""

from __future__ import annotations

import collections
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from fednode.node.daemon import Node
from tests.node.checks import check_fedavg, check_round_agreement, read_record, sha256
from tests.node.conftest import cluster, wait_until
from tests.node.test_sim50 import no_fsync  # noqa: F401  (fixture)

N_NODES = int(os.environ.get("FEDNODE_SIM_NODES", "500"))
N_ROUNDS = int(os.environ.get("FEDNODE_SIM_ROUNDS", "10"))
CHURN_FRACTION = 0.10  # of the live nodes, after every round: this many leave and as many join
LINK_DEGREE = 3
HEARTBEAT_SECONDS = 20.0
ROUND_TIMEOUT_SECONDS = 600.0
PROGRESS_SECONDS = 60.0  # virtual seconds between progress lines (run with -s to see them)
PAUSE_SECONDS = 2 * HEARTBEAT_SECONDS  # between rounds: the churn happens here, and joiners hear the coordinator
# A gross-regression guard, not a goal: every node handles every message, so one process does
# O(nodes^2) work per round (200 nodes, 3 rounds: ~185 s alone on this 2-core box).
WALL_BUDGET_SECONDS = float(os.environ.get("FEDNODE_SIM_WALL_BUDGET", "3600"))
SMALL_WALL_BUDGET_SECONDS = 600.0  # 100 nodes: 73 s alone; a gross-regression guard under CI load


@pytest.mark.scale_open
@pytest.mark.timeout(WALL_BUDGET_SECONDS + 300)
async def test_five_hundred_nodes_ten_rounds_with_churn(tmp_path: Path, autojump_clock, no_fsync,  # type: ignore[no-untyped-def]  # noqa: F811
                                                       inline_threads) -> None:
    await churn_sim(tmp_path, autojump_clock, N_NODES, N_ROUNDS, WALL_BUDGET_SECONDS)


@pytest.mark.timeout(900)
async def test_a_hundred_nodes_ten_rounds_with_churn(tmp_path: Path, autojump_clock, no_fsync,  # type: ignore[no-untyped-def]  # noqa: F811
                                                     inline_threads) -> None:
    """The same simulation at 100 nodes, in ./scripts/test (~75 s alone on 2 cores)."""
    await churn_sim(tmp_path, autojump_clock, 100, 10, SMALL_WALL_BUDGET_SECONDS)


async def churn_sim(tmp_path: Path, autojump_clock: Any, n_nodes: int, n_rounds: int,
                    budget: float) -> None:
    wall = time.monotonic()
    autojump_clock.autojump_threshold = 0.0
    rng = random.Random(12)
    churn = max(1, round(n_nodes * CHURN_FRACTION))
    ever = n_nodes + churn * n_rounds  # learning.num_nodes: every node's index is below it
    sections: dict[str, dict[str, Any]] = {
        "coordinator": {"heartbeat_interval_seconds": HEARTBEAT_SECONDS},
        "round": {"max_rounds": n_rounds, "pause_seconds": PAUSE_SECONDS, "min_participants": 2,
                  "max_participants": 2 * n_nodes, "wait_for_members": n_nodes,
                  "round_timeout_seconds": ROUND_TIMEOUT_SECONDS},
        "learning": {"evaluate": False},
        # an announce naming up to max_participants contributions must fit in one message (~164 B each)
        "network": {"max_message_bytes": 4 * 65536}}
    async with cluster(tmp_path, auto_link_degree=LINK_DEGREE) as c:
        c.nursery.start_soon(_report_progress, c, wall)
        for i in range(n_nodes):
            await c.start(i, ever, **sections)
        index_of = {node.node_id: i for i, node in c.nodes.items()}
        live: set[int] = set(range(n_nodes))
        joined_at: dict[int, int] = dict.fromkeys(live, 0)  # node index -> the first round it could take part in
        left: set[int] = set()
        next_index = n_nodes
        for number in range(1, n_rounds + 1):
            if number > 1:
                # between rounds (round.pause_seconds): 10% leave (crash, no goodbye) and as many join,
                # who learn the coordinator from heartbeats and take part from the next round on
                coordinators = {c.nodes[i].driver.coordinator for i in live}
                assert len(coordinators) == 1, coordinators
                candidates = sorted(i for i in live if c.nodes[i].node_id not in coordinators)
                for i in rng.sample(candidates, churn):
                    c.kill(i)
                    live.discard(i)
                    left.add(i)
                for _ in range(churn):
                    await c.start(next_index, ever, **sections)
                    index_of[c.nodes[next_index].node_id] = next_index
                    live.add(next_index)
                    joined_at[next_index] = number
                    next_index += 1
            try:
                await wait_until(lambda n=number: all(installed(c.nodes[i]) >= n for i in live),  # type: ignore[misc]
                                 timeout=ROUND_TIMEOUT_SECONDS * 3)
            except trio.TooSlowError:
                behind = [(i, joined_at[i], installed(c.nodes[i]), opened(c.nodes[i])) for i in sorted(live)
                          if installed(c.nodes[i]) < number]
                raise AssertionError(f"round {number}: (node, joined before round, installed, opened) behind: "
                                     f"{behind}") from None
            assert installed(c.nodes[min(live)]) == number, "the next round opened before the churn"
            print(f"churn sim: round {number}/{n_rounds} installed by {len(live)} live nodes after "
                  f"{time.monotonic() - wall:.0f} s wall", flush=True)
        survivors = [c.nodes[i] for i in sorted(live)]
        final = check_round_agreement(survivors, n_rounds)  # every live node installed the same adapter
        # each round: the nodes that hold its record agree on it, and it is the FedAvg of its updates
        start: bytes | None = None
        joiners_accepted = 0
        for number in range(1, n_rounds + 1):
            holders = [node for node in survivors if _has_record(node, number)]
            assert holders, f"no live node holds round {number}'s record"
            record = check_round_agreement(holders, number)
            accepted = {a["node_id"] for a in record["accepted"]}
            assert len(accepted) >= 2, (number, len(accepted))
            joiners_accepted += sum(1 for a in accepted if joined_at[index_of[a]] > 0)
            merged = holders[0].store.read(record["merged_sha256"])
            check_fedavg(record, merged, start, index_of)
            start = merged
        assert sha256(start or b"") == final["merged_sha256"]
        assert joiners_accepted > 0, "no node that joined later ever contributed an update"
        assert len(left) == churn * (n_rounds - 1) and len(live) == n_nodes
    elapsed = time.monotonic() - wall
    print(f"churn sim: {n_nodes} nodes, {n_rounds} rounds, churn {churn}/round: {elapsed:.1f} s wall")
    assert elapsed < budget, elapsed


async def _report_progress(c: Any, wall: float) -> None:
    """Every PROGRESS_SECONDS of virtual time: what the live nodes agree on (a long run shows where it is)."""
    while True:
        await trio.sleep(PROGRESS_SECONDS)
        nodes = [n for i, n in c.nodes.items() if not c.scopes[i].cancel_called]
        coordinators = collections.Counter(n.driver.coordinator for n in nodes)
        rounds = [installed(n) for n in nodes]
        term = max((n.election.term for n in nodes), default=0)
        working = sum(1 for n in nodes if n.driver.open_round())
        phases = collections.Counter(f"r{latest.manifest.round_number}:{latest.phase.name.lower()}"
                                     for n in nodes if (latest := n.driver.book.latest()) is not None)
        print(f"churn sim: t={trio.current_time():.0f} s virtual, {time.monotonic() - wall:.0f} s wall: "
              f"{len(nodes)} live, coordinators {len(coordinators) - (None in coordinators)} "
              f"(+{coordinators[None]} none), max term {term}, in a round {working}, "
              f"installed {min(rounds, default=0)}..{max(rounds, default=0)}, latest rounds {dict(phases)}", flush=True)


def installed(node: Node) -> int:
    """The latest round whose merged adapter this node installed (a joiner installs the latest round
    by sync, not the ones before it joined, so rounds_completed counts fewer)."""
    return int(node.driver.progress.last_merged.get("round_number", 0))


def opened(node: Node) -> int:
    """The latest round this node knows to be open or installed."""
    state = node.driver.open_round()
    return max(installed(node), state.manifest.round_number if state is not None else 0)


def _has_record(node: Node, number: int) -> bool:
    try:
        read_record(node, number)
    except FileNotFoundError:
        return False
    return True
