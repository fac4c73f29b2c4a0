"""round-v1, "A merged adapter no holder has": when a node rebuilds a published round's merged
adapter, and what it keeps."""

from __future__ import annotations

import hashlib

from fednode.consensus.merged_recovery import MergedRecovery, RebuildProblem, RecoveryStep

ANNOUNCED = hashlib.sha256(b"merged").hexdigest()
OTHER = hashlib.sha256(b"a different merge").hexdigest()


def test_fetches_first_and_rebuilds_after_the_failed_fetches() -> None:
    r = MergedRecovery(rebuild_after=2, retry_seconds=1.0, retry_max_seconds=8.0)
    assert r.next_step() is RecoveryStep.FETCH
    assert r.fetch_failed("no holder served it") == 1.0
    assert r.next_step() is RecoveryStep.FETCH
    assert r.fetch_failed("no holder served it") == 2.0
    assert r.next_step() is RecoveryStep.REBUILD
    assert "no holder" in r.last_problem


def test_only_the_announced_digest_is_kept() -> None:
    r = MergedRecovery(rebuild_after=1)
    r.fetch_failed("x")
    assert r.rebuilt(ANNOUNCED, ANNOUNCED)
    assert r.rebuilds_failed == {}


def test_a_different_digest_is_a_counted_failure_never_a_second_outcome() -> None:
    r = MergedRecovery(rebuild_after=1, retry_seconds=1.0, retry_max_seconds=4.0)
    r.fetch_failed("x")
    assert not r.rebuilt(ANNOUNCED, OTHER)
    assert r.rebuilds_failed == {RebuildProblem.DIGEST_MISMATCH.value: 1}
    assert "digest_mismatch" in r.last_problem and OTHER[:16] in r.last_problem
    assert r.delay == 2.0  # backed off
    assert r.next_step() is RecoveryStep.FETCH  # back to the holders first


def test_a_failed_rebuild_is_retried_after_more_failed_fetches_with_capped_backoff() -> None:
    r = MergedRecovery(rebuild_after=2, retry_seconds=1.0, retry_max_seconds=4.0)
    waits = []
    for _ in range(3):  # never gives up: fetch, fetch, rebuild (missing update), ...
        waits.append(r.fetch_failed("down"))
        waits.append(r.fetch_failed("down"))
        assert r.next_step() is RecoveryStep.REBUILD
        waits.append(r.rebuild_failed(RebuildProblem.MISSING_UPDATE, "n1's update"))
        assert r.next_step() is RecoveryStep.FETCH
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert r.rebuilds_failed == {"missing_update": 3}
    assert r.last_problem.startswith("rebuild missing_update")


def test_rebuild_after_zero_never_rebuilds() -> None:
    r = MergedRecovery(rebuild_after=0)
    for _ in range(5):
        r.fetch_failed("down")
    assert r.next_step() is RecoveryStep.FETCH
