"""Issue 13 item 5: one refused member must not drag a round to its deadline.

The coordinator closes a round early once every live federated member has been accepted *or
refused* (REJECTed) and at least min_participants are accepted. Before round-v1 r1 only accepted
members counted, so a live member whose submission was refused kept every round open until
round_timeout_seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing

from tests.node.checks import check_round_agreement, read_record
from tests.node.conftest import clock, cluster, wait_until
from tests.security.adversary import Adversary, bad_delta

HONEST = 3
TIMEOUT = 600.0  # round_timeout_seconds: a round that waits for it is obvious on the virtual clock
CLOSED_WELL_BEFORE = 60.0  # virtual seconds from manifest to record: generous, and far below TIMEOUT


def sections() -> dict[str, dict[str, Any]]:
    return {"round": {"min_participants": 2, "max_participants": 8, "wait_for_members": HONEST + 1,
                      "max_rounds": 1, "round_timeout_seconds": TIMEOUT}}


async def run_with(tmp_path: Path, misbehave: Any) -> dict[str, Any]:
    """3 honest nodes and a live federated member (the adversary's key) that `misbehave`s once
    round 1 is open; returns the coordinator's round-1 record after every node installed it."""
    async with cluster(tmp_path) as c:
        adv = Adversary(c.network, _member(), community_id="test", clock=clock, data_dir=tmp_path / "adversary")
        async with adv.attached():
            adv.nursery.start_soon(lambda: adv.heartbeat_forever(federated=True))
            nodes = [await c.start(i, HONEST, **sections()) for i in range(HONEST)]
            manifest = await adv.wait_manifest(1)
            await misbehave(adv, manifest)
            await wait_until(lambda: all(n.driver.progress.rounds_completed >= 1 for n in nodes), timeout=2 * TIMEOUT)
            record = check_round_agreement(nodes, 1)
            coordinator = next(n for n in nodes if n.node_id == record["final_coordinator_node_id"])
            return read_record(coordinator, 1)


def _member() -> Any:
    from fednode.identity import Identity

    return Identity.from_seed(b"\xad" * 32)


async def test_round_with_a_refused_member_closes_early(tmp_path: Path,
                                                        autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.autojump_threshold = 0.01

    async def copy_anothers_update(adv: Adversary, manifest: Any) -> None:
        # re-announce the first honest update under our own name: REJECT duplicate_delta
        while not (theirs := [a for a in adv.submissions if a.round_id == manifest.round_id]):
            await trio.sleep(0.01)
        await adv.publish_raw(adv.signed(adv.submission(manifest, delta_sha256=theirs[0].delta_sha256,
                                                        delta_size=theirs[0].delta_size)))

    record = await run_with(tmp_path, copy_anothers_update)
    assert [r["reason"] for r in record["rejected"] if r["node_id"] == _member().node_id] == ["duplicate_delta"]
    assert len(record["accepted"]) == HONEST
    took = record["finished_at"] - record["manifest"]["created_at"]
    assert took < CLOSED_WELL_BEFORE, f"round took {took:.1f} s: it waited for the {TIMEOUT:.0f} s deadline"


async def test_round_with_an_invalid_update_closes_early(tmp_path: Path,
                                                         autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.autojump_threshold = 0.01

    async def submit_garbage(adv: Adversary, manifest: Any) -> None:
        await adv.submit_blob(manifest, bad_delta("nan"))

    record = await run_with(tmp_path, submit_garbage)
    assert [r["reason"] for r in record["rejected"] if r["node_id"] == _member().node_id] == ["invalid_update"]
    assert len(record["accepted"]) == HONEST
    took = record["finished_at"] - record["manifest"]["created_at"]
    assert took < CLOSED_WELL_BEFORE, f"round took {took:.1f} s: it waited for the {TIMEOUT:.0f} s deadline"
