"""The gate: a node with `[research] federated_learning = false` in a federated community joins as a
member (heartbeats, status) and never creates, joins, coordinates or trains for a round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
import trio.testing

from fednode.node.daemon import Node
from fednode.node.trainers import FakeTrainer, TrainOutput
from fednode.transport.memory import open_memory_transport
from tests.node.checks import read_record
from tests.node.conftest import Cluster, clock, cluster, node_config, seed_identity, wait_until

N_FEDERATED = 3
ROUNDS = 2
AUTOJUMP_THRESHOLD = 0.01  # see test_crash.py: worker threads must not let the virtual clock run away


class SpyTrainer(FakeTrainer):
    """A FakeTrainer that counts every call a daemon could make on it."""

    def __init__(self, node_index: int) -> None:
        super().__init__(node_index)
        self.calls: list[str] = []

    def train(self, *args: Any, **kwargs: Any) -> TrainOutput:
        self.calls.append("train")
        return super().train(*args, **kwargs)

    def evaluate(self, adapter: bytes | None) -> dict[str, float]:
        self.calls.append("evaluate")
        return super().evaluate(adapter)

    def install(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("install")
        super().install(*args, **kwargs)


async def start_gated(c: Cluster, i: int, n: int, trainer: SpyTrainer) -> Node:
    """Like Cluster.start, but hands the gated node a real trainer: the gate must ignore it."""
    cfg = node_config(c.tmp / f"node-{i}", i, n, research={"federated_learning": False})
    node = Node(cfg, seed_identity(i), trainer=trainer, clock=clock, inline_training=True,
                transport_factory=lambda ident: open_memory_transport(c.network, ident))
    scope = trio.CancelScope()

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await node.run(task_status=task_status)

    await c.nursery.start(run)
    c.nodes[i], c.scopes[i] = node, scope
    return node


async def test_gated_node_is_a_member_but_never_in_a_round(tmp_path: Path,
                                                           autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.autojump_threshold = AUTOJUMP_THRESHOLD
    spy = SpyTrainer(N_FEDERATED)
    sections: dict[str, dict[str, Any]] = {"round": {"max_rounds": ROUNDS, "wait_for_members": N_FEDERATED,
                                                     "max_participants": N_FEDERATED + 1}}
    async with cluster(tmp_path) as c:
        gated = await start_gated(c, N_FEDERATED, N_FEDERATED + 1, spy)
        nodes = [await c.start(i, N_FEDERATED, **sections) for i in range(N_FEDERATED)]
        await wait_until(lambda: all(n.driver.progress.rounds_completed >= ROUNDS for n in nodes))
        await trio.sleep(5.0)  # a few more heartbeats and timer ticks: still nothing may happen

        # it runs, and the others list it as a (non-federated, alive) member
        assert gated.started.is_set()
        for node in nodes:
            members = {m.node_id: m for m in node.status().members}
            assert gated.node_id in members
            assert members[gated.node_id].federated_learning is False
            assert members[gated.node_id].alive is True
        # its own status says rounds are disabled, naming the key
        status = gated.status()
        assert status.federated_learning is False
        reason = status.progress.disabled_reason
        assert "disabled" in reason and "federated_learning = false" in reason
        assert status.to_json()["rounds"] == reason  # the JSON key it always had
        assert status.progress.current_round is None and status.progress.rounds_completed == 0
        assert {m.node_id for m in status.members} == {n.node_id for n in nodes}
        # it refuses to start a round, naming the config key
        assert "federated_learning = false" in gated._start_round_now()["error"]
        # it never trained, installed or evaluated anything, and holds no round
        assert spy.calls == []
        assert gated.trainer is None and gated.driver.trainer is None
        assert gated.driver.rounds == {} and gated.db.rounds() == []
        assert gated.db.get_own_update(1, "") is None
        assert not (gated.config.data_dir / "rounds").exists()
        assert not (gated.config.data_dir / "adapters").exists()
        # and appears in no round record, as participant or coordinator
        for number in range(1, ROUNDS + 1):
            for node in nodes:
                record = read_record(node, number)
                assert record["state"] == "published"
                assert gated.node_id not in json.dumps(record), (number, node.config.node.name)
                assert len(record["accepted"]) == N_FEDERATED
        # nobody ever made it coordinator
        for node in nodes:
            assert node.election.coordinator != gated.node_id
            assert gated.node_id not in node.election.live_members(clock())
