"""Two coordinators open round n around a contested election (each published its manifest before
it heard the other's claim): a member follows the later term's round and closes the other."""

from __future__ import annotations

from pathlib import Path

import trio

from fednode.consensus import CoordinatorChanged, Phase
from fednode.wire import codec
from fednode.wire.messages import RoundManifest
from tests.node.conftest import clock, cluster, seed_identity, wait_until


def manifest(round_id: str, term: int, coordinator: int) -> RoundManifest:
    who = seed_identity(coordinator)
    return codec.sign(RoundManifest(
        round_id=round_id, base_model_id="fake-model", coordinator_node_id=who.node_id, community_id="test",
        min_participants=1, max_participants=3, round_timeout_seconds=60.0, created_at=clock(), term=term,
        round_number=1, local_steps=3), who)


async def test_round_opened_in_an_earlier_term_is_superseded(tmp_path: Path, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    x, y = seed_identity(0).node_id, seed_identity(1).node_id
    async with cluster(tmp_path) as c:
        # fixed mode: this node elects nobody itself; the test plays the election
        node = await c.start(2, 3, coordinator={"mode": "fixed", "fixed_peer_id": x})
        d = node.driver
        d.on_coordinator_changed(CoordinatorChanged(1, x, clock()))
        assert d.on_message(manifest("r1-t1", 1, 0)).accepted
        await wait_until(lambda: d.rounds["r1-t1"].own_submission is not None)
        early = d.rounds["r1-t1"]
        # y won term 2 and had opened round 1 too; x's round now has y as its coordinator...
        d.on_coordinator_changed(CoordinatorChanged(2, y, clock()))
        assert early.term == 2 and early.is_open
        # ...and y's own manifest for round 1 (term 2) still wins over it
        verdict = d.on_message(manifest("r1-t2", 2, 1))
        assert verdict.accepted, verdict
        assert early.phase is Phase.FAILED and early.failure_reason.startswith("superseded by r1-t2")
        row = node.db.get_round("r1-t1")
        assert row is not None and row.state == "failed"
        assert d.open_round() is d.rounds["r1-t2"]
        await wait_until(lambda: d.rounds["r1-t2"].own_submission is not None)
        own = d.rounds["r1-t2"].own_submission
        assert own is not None and early.own_submission is not None
        assert own.delta_sha256 == early.own_submission.delta_sha256  # the training is re-used, not redone
        # the older round's manifest, seen again, changes nothing
        d.on_message(d.rounds["r1-t1"].manifest)
        assert early.phase is Phase.FAILED
        await trio.sleep(1)
        assert d.open_round() is d.rounds["r1-t2"]
