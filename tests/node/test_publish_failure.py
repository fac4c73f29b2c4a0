"""A coordinator whose outcome did not go out on gossip (the transport refused or failed the publish)
still installs the round: the outcome is saved, its heartbeats then name the round as finished, and
the members fetch the outcome by sync (sync-v1). Before, the failed publish skipped the install, the
heartbeats kept naming the previous round, and the round never finished anywhere (found by the
500-node simulation, whose transport refused the announce as too large)."""

from __future__ import annotations

from pathlib import Path

from fednode.errors import TransportError
from fednode.node.daemon import Node
from fednode.wire.messages import AggregateAnnounce, Message
from tests.node.conftest import cluster, wait_until


def fail_first_announce(node: Node) -> list[str]:
    failed: list[str] = []
    real = node.publish

    async def publish(message: Message) -> None:
        if isinstance(message, AggregateAnnounce) and not failed:
            failed.append(message.round_id)
            raise TransportError("injected: the announce did not go out")
        await real(message)

    node.publish = publish  # type: ignore[method-assign]
    node.driver.publish = publish
    return failed


async def test_a_coordinator_whose_announce_failed_still_installs_and_members_sync_it(  # type: ignore[no-untyped-def]
        tmp_path: Path, clock) -> None:
    n = 3
    async with cluster(tmp_path) as c:
        nodes = [c.make(i, n, round={"max_rounds": 1}) for i in range(n)]
        failed = [fail_first_announce(node) for node in nodes]
        for i, node in enumerate(nodes):
            await c.run_node(i, node)
        await wait_until(lambda: all(node.driver.progress.rounds_completed >= 1 for node in nodes), timeout=120)
        assert sum(len(f) for f in failed) == 1  # the coordinator's one announce failed
        assert len({node.driver.progress.last_merged["sha256"] for node in nodes}) == 1


async def test_a_record_names_the_announced_contributions_when_a_full_disk_kept_the_outcome_in_memory(  # type: ignore[no-untyped-def]
        tmp_path: Path, clock) -> None:
    """Fault seed 1356839167 s22/s28: the node whose disk was full when the announce came kept it in
    memory only, and its round record listed its own view of the contributions instead."""
    n = 3
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, n, round={"max_rounds": 1}) for i in range(n)]
        await wait_until(lambda: all(node.driver.progress.rounds_completed >= 1 for node in nodes), timeout=120)
        driver = nodes[1].driver
        state = next(iter(driver.rounds.values()))
        row = driver.db.get_round(state.round_id)
        assert row is not None and row.outcome
        announce = driver._announce_of(state, row.merged_sha256)
        assert announce is not None
        driver.db.set_outcome(state.round_id, b"")  # as if the disk had been full when it came ...
        assert driver._announce_of(state, row.merged_sha256) is None
        driver.job(state.round_id).unsaved_outcome = row.outcome  # ... and it was kept in memory
        assert driver._announce_of(state, row.merged_sha256) == announce
