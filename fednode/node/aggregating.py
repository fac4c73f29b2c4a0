"""The coordinator's part of a round: prefetch and check every accepted update, then aggregate."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from fednode.consensus import (
    AggregationDone,
    AggregationFailed,
    ContributionRejected,
    Phase,
    RoundState,
    StartAggregation,
)
from fednode.consensus.round_book import may_serve_soon
from fednode.errors import FednodeError, InvalidUpdate, TransportError
from fednode.node.jobs import error_text
from fednode.node.reports import RejectionKind
from fednode.node.training import Training
from fednode.wire import codec
from fednode.wire.messages import SubmissionAnnounce

logger = logging.getLogger("fednode.rounds")  # one logger for the round driver's modules (fault_check reads it)

DEFAULT_PREFETCH_RETRY_SECONDS = 0.5  # first wait before fetching a live participant's update again
DEFAULT_PREFETCH_RETRY_MAX_SECONDS = 4.0  # the wait doubles up to this
DEFAULT_PREFETCH_PATIENCE_SECONDS = 30.0  # then its update is rejected as unavailable, live or not

class Aggregating(Training):
    def _start_prefetch(self, state: RoundState, a: SubmissionAnnounce) -> None:
        job = self.job(state.round_id)
        if a.participant_node_id not in job.prefetched:
            job.prefetched[a.participant_node_id] = trio.Event()
            self._spawn(self._prefetch, state, a)

    async def _prefetch(self, state: RoundState, a: SubmissionAnnounce) -> None:
        job, key = self.job(state.round_id), a.participant_node_id
        delay = DEFAULT_PREFETCH_RETRY_SECONDS
        give_up_at = trio.current_time() + DEFAULT_PREFETCH_PATIENCE_SECONDS
        try:
            while True:
                try:
                    async with self._prefetch_limiter:
                        await self._check_delta(a)
                    break
                except TransportError:
                    # Unreachable now (not yet dialled, just restarted, libp2p's negative dial cache):
                    # a participant that is still live serves it in a moment; a dead one never will.
                    if not self._may_serve_soon(a.participant_node_id) or trio.current_time() + delay > give_up_at:
                        raise
                await trio.sleep(delay)
                delay = min(2 * delay, DEFAULT_PREFETCH_RETRY_MAX_SECONDS)
        except (FednodeError, trio.TooSlowError, OSError) as exc:
            if self.disk.note(exc, f"fetching {a.participant_node_id[-8:]}'s update"):
                job.prefetched.pop(key).set()  # our disk's fault, not theirs: fetch again on resume
                return
            job.update_errors[key] = exc
        finally:
            if key in job.prefetched:
                job.prefetched[key].set()

    def _may_serve_soon(self, node_id: str) -> bool:
        """The round book's rule (round_book.may_serve_soon) on our clock and live view."""
        c = self.config.coordinator
        return may_serve_soon(node_id, frozenset(self.live_members()), now=self.clock(), started_at=self._started_at,
                              liveness_timeout=c.heartbeat_interval_seconds * c.liveness_timeout_heartbeats)

    def _fetch_delta(self, a: SubmissionAnnounce) -> Callable[[], Awaitable[None]]:
        return lambda: self._fetch(a.delta_sha256, a.delta_size,
                                   [a.participant_node_id, *self.holders(a.delta_sha256)])

    async def _check_delta(self, a: SubmissionAnnounce) -> None:
        data = await self._read_blob(a.delta_sha256, self._fetch_delta(a))
        if len(data) != a.delta_size:
            raise InvalidUpdate(f"blob is {len(data)} bytes, announced {a.delta_size}")
        if self.trainer is not None:
            trainer = self.trainer
            max_norm = self.config.aggregation.max_update_norm
            await self.blocking(lambda: trainer.check_update(data, max_norm=max_norm))

    async def _aggregate(self, state: RoundState, effect: StartAggregation) -> None:
        try:
            await self._aggregate_inner(state, effect)
        finally:
            job = self.job(state.round_id)
            replan, job.aggregating, job.replan = job.replan, False, None
            if replan is not None and state.phase is Phase.AGGREGATING:
                self._perform(state, replan)

    async def _aggregate_inner(self, state: RoundState, effect: StartAggregation) -> None:
        for a in effect.announces:
            self._start_prefetch(state, a)
        # the events themselves: a prefetch stopped by a full disk drops its entry (to fetch again later)
        job = self.job(state.round_id)
        checked = [job.prefetched[a.participant_node_id] for a in effect.announces]
        for event in checked:
            await event.wait()
        if self.disk.paused:  # a download hit the full disk: resume_after_disk_full re-plans
            return
        bad = [(a, job.update_errors[a.participant_node_id]) for a in effect.announces
               if a.participant_node_id in job.update_errors]
        if not self._aggregation_wanted(state):
            return
        if bad:
            for a, exc in bad:
                if not self._aggregation_wanted(state):  # a rejection before this one failed the round
                    return
                kind, reason = RejectionKind.of(exc).value, error_text(exc)
                self._record_submission_rejected(state, a, kind, reason)
                self._feed(state, ContributionRejected(a.participant_node_id, kind, self.clock(), reason))
            return  # the state machine re-plans: a fresh StartAggregation, or failure
        learning = self.config.learning
        if learning.task == "fake" and learning.fake_aggregate_delay_seconds:  # fault tests act in this gap
            await trio.sleep(learning.fake_aggregate_delay_seconds)
        datas = [await self._read_blob(a.delta_sha256, self._fetch_delta(a)) for a in effect.announces]
        weights = [float(a.num_samples) for a in effect.announces]
        try:
            merged, discarded = await self._merge(state, effect.method, datas, weights)
        except FednodeError as exc:
            if self._aggregation_wanted(state):
                self._feed(state, AggregationFailed(f"aggregation failed: {exc}"[:200], self.clock()))
            return
        sha = self.store.put_bytes(merged)
        if not self._aggregation_wanted(state):
            return
        job.discarded_energy = discarded
        self._feed(state, AggregationDone(sha, len(merged), self.clock()))

    def _aggregation_wanted(self, state: RoundState) -> bool:
        if self.book.concluding(state.round_id) and self.rounds.get(state.round_id) is state:
            return True
        logger.info("round %s: dropping our aggregation (round is %s, we are %s)", state.round_id,
                    state.phase.value, state.role.value)
        return False

    def _record_submission_rejected(self, state: RoundState, a: SubmissionAnnounce, kind: str, reason: str) -> None:
        detail = f"{kind}: {reason}"[:200]
        if not self.db.add_submission(round_id=state.round_id, node_id=a.participant_node_id,
                                      announce=codec.encode(a), delta_sha256=a.delta_sha256,
                                      num_samples=a.num_samples, status="rejected", reason=detail, now=self.clock()):
            self.db.reject_submission(state.round_id, a.participant_node_id, detail)  # it was accepted first
