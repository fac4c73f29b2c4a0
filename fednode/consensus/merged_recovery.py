"""Getting a published round's merged adapter when no live holder has it (round-v1, "A merged adapter no holder has").

A published round's merged adapter is content-addressed: its AggregateAnnounce names the
`merged_sha256`, the aggregation method and every contribution (node, delta sha256, weight), and
the merge is a deterministic function of those (contributions in node-id order, weights =
num_samples). So a node that cannot fetch the merged blob from any holder (the coordinator's only
copy corrupted or deleted, and the coordinator killed before anyone fetched it) may rebuild it from
the contributed updates, and accepts the result only if it hashes to the announced sha256: a
rebuild can only recover the one published outcome, never make a second one.

This module is the decision, sans-IO: after how many failed fetches to rebuild, how long to wait
before the next try, what a rebuild's result means. The driver (fednode/node/installing.py) does
the fetching and merging and feeds the results in.

    recovery = MergedRecovery()
    step = recovery.next_step()               # FETCH first
    recovery.fetch_failed("no holder")        # ... REBUILD after `rebuild_after` failed fetches
    recovery.rebuilt(announced, computed)     # True: install it; False: counted, wait recovery.delay
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DEFAULT_REBUILD_AFTER_FAILED_FETCHES = 2  # fetch tries from the holders before rebuilding from the updates
DEFAULT_RECOVERY_RETRY_SECONDS = 1.0  # first wait between tries
DEFAULT_RECOVERY_RETRY_MAX_SECONDS = 30.0  # the wait doubles up to this; a node never gives up


class RecoveryStep(enum.Enum):
    FETCH = "fetch"  # ask the holders for the merged blob
    REBUILD = "rebuild"  # fetch the contributed updates and merge them again


class RebuildProblem(enum.Enum):
    """Why a rebuild did not give the announced blob (counted; status says the latest)."""

    NO_CONTRIBUTIONS = "no_contributions"  # we hold no signed AggregateAnnounce naming them
    MISSING_UPDATE = "missing_update"  # a contributed update could not be fetched from anyone
    MERGE_FAILED = "merge_failed"  # the updates did not merge (bad blob, aggregation error)
    DIGEST_MISMATCH = "digest_mismatch"  # merged, but not to the announced sha256 (e.g. DP noise)


@dataclass
class MergedRecovery:
    """The retry/rebuild schedule for one published round's merged adapter."""

    rebuild_after: int = DEFAULT_REBUILD_AFTER_FAILED_FETCHES
    retry_seconds: float = DEFAULT_RECOVERY_RETRY_SECONDS
    retry_max_seconds: float = DEFAULT_RECOVERY_RETRY_MAX_SECONDS
    failed_fetches: int = 0  # since the last rebuild attempt
    rebuilds_failed: dict[str, int] = field(default_factory=dict)  # RebuildProblem value -> count
    last_problem: str = ""  # what went wrong last (for status and the log)
    _delay: float = 0.0

    def next_step(self) -> RecoveryStep:
        """Rebuild once `rebuild_after` fetches in a row failed; else fetch."""
        if self.rebuild_after > 0 and self.failed_fetches >= self.rebuild_after:
            return RecoveryStep.REBUILD
        return RecoveryStep.FETCH

    def fetch_failed(self, why: str) -> float:
        """A fetch from the holders failed; returns the seconds to wait before the next step."""
        self.failed_fetches += 1
        self.last_problem = f"fetch: {why}"[:300]
        return self._backoff()

    def rebuild_failed(self, problem: RebuildProblem, detail: str) -> float:
        """A rebuild did not give the announced blob: counted, then fetch again (a holder, or an
        update's submitter, may be back later) and rebuild again after `rebuild_after` more."""
        self.failed_fetches = 0
        self.rebuilds_failed[problem.value] = self.rebuilds_failed.get(problem.value, 0) + 1
        self.last_problem = f"rebuild {problem.value}: {detail}"[:300]
        return self._backoff()

    def rebuilt(self, announced_sha256: str, computed_sha256: str) -> bool:
        """May the rebuilt blob be installed? Only if it IS the announced one (content address);
        a different digest is a failed rebuild (DIGEST_MISMATCH), never a second outcome."""
        if computed_sha256 == announced_sha256:
            return True
        self.rebuild_failed(RebuildProblem.DIGEST_MISMATCH,
                            f"merged to {computed_sha256[:16]}, announced {announced_sha256[:16]}")
        return False

    @property
    def delay(self) -> float:
        """The wait before the next step, as last returned (0 before any failure)."""
        return self._delay

    def _backoff(self) -> float:
        self._delay = self.retry_seconds if self._delay == 0.0 else min(2 * self._delay, self.retry_max_seconds)
        return self._delay
