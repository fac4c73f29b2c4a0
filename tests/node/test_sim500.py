"""500 nodes on the memory transport and trio's virtual clock, 10 rounds, churn: after every round
10% of the live nodes crash (no goodbye) and 10% new nodes join. Every live node ends with the same
merged adapter, and every round's merged adapter is the num_samples-weighted FedAvg of its accepted
updates, recomputed here from scratch (each update re-trained by a fresh FakeTrainer, averaged in
float64 by `checks.fedavg_float64`, not by fednode.aggregation).

Settings (documented, chosen for wall time on 2 shared cores, not to hide anything):
- heartbeats every 20 virtual s (liveness 50 s): every heartbeat is flooded to and verified by all
  ~500 nodes, so at 1 s the simulation would spend its time on 250,000 signature checks a virtual
  second; rounds still close early once every live member has submitted;
- the coordinator is never among the leavers (an election costs a liveness timeout; test_fork,
  test_crash and tests/chaos cover coordinator loss);
- sqlite without fsync (test_sim50's `no_fsync`): durability is test_crash's subject.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

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
WALL_BUDGET_SECONDS = 120.0  # the limit on 2 cores


@pytest.mark.scale_open
@pytest.mark.timeout(900)
async def test_five_hundred_nodes_ten_rounds_with_churn(tmp_path: Path, autojump_clock, no_fsync) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    wall = time.monotonic()
    autojump_clock.autojump_threshold = 0.05
    rng = random.Random(12)
    churn = max(1, round(N_NODES * CHURN_FRACTION))
    ever = N_NODES + churn * N_ROUNDS  # learning.num_nodes: every node's index is below it
    sections: dict[str, dict[str, Any]] = {
        "coordinator": {"heartbeat_interval_seconds": HEARTBEAT_SECONDS},
        "round": {"max_rounds": N_ROUNDS, "min_participants": 2, "max_participants": 2 * N_NODES,
                  "wait_for_members": N_NODES, "round_timeout_seconds": ROUND_TIMEOUT_SECONDS},
        "learning": {"evaluate": False},
        # an announce naming up to max_participants contributions must fit in one message (~164 B each)
        "network": {"max_message_bytes": 4 * 65536}}
    async with cluster(tmp_path, auto_link_degree=LINK_DEGREE) as c:
        for i in range(N_NODES):
            await c.start(i, ever, **sections)
        index_of = {node.node_id: i for i, node in c.nodes.items()}
        live: set[int] = set(range(N_NODES))
        joined_at: dict[int, int] = dict.fromkeys(live, 0)  # node index -> rounds finished when it joined
        left: set[int] = set()
        next_index = N_NODES
        for number in range(1, N_ROUNDS + 1):
            await wait_until(lambda n=number: all(c.nodes[i].driver.progress.rounds_completed >= n  # type: ignore[misc]
                                                  for i in live), timeout=ROUND_TIMEOUT_SECONDS * 3)
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
        # the last joiners catch up on the final round by sync
        await wait_until(lambda: all(c.nodes[i].driver.progress.rounds_completed >= N_ROUNDS for i in live),
                         timeout=ROUND_TIMEOUT_SECONDS * 3)
        survivors = [c.nodes[i] for i in sorted(live)]
        final = check_round_agreement(survivors, N_ROUNDS)  # every live node installed the same adapter
        # each round: the nodes that hold its record agree on it, and it is the FedAvg of its updates
        start: bytes | None = None
        joiners_accepted = 0
        for number in range(1, N_ROUNDS + 1):
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
        assert len(left) == churn * N_ROUNDS and len(live) == N_NODES
    elapsed = time.monotonic() - wall
    print(f"sim500: {N_NODES} nodes, {N_ROUNDS} rounds, churn {churn}/round: {elapsed:.1f} s wall")
    assert elapsed < WALL_BUDGET_SECONDS, elapsed


def _has_record(node: Node, number: int) -> bool:
    try:
        read_record(node, number)
    except FileNotFoundError:
        return False
    return True
