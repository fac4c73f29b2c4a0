"""Picking up after a restart or a full disk, and settling the outcome of a round taken over
(fednode/consensus/outcome.py)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from fednode.consensus import InstallAdapter, RoundState, SyncAnswered, Tick
from fednode.consensus.round_book import PausedWork, resume_after_pause_effects
from fednode.errors import DiskFull, FednodeError
from fednode.node.aggregating import Aggregating
from fednode.wire.messages import AggregateAnnounce, RoundFailed, RoundManifest

if TYPE_CHECKING:
    pass

logger = logging.getLogger("fednode.rounds")  # one logger for the round driver's modules (fault_check reads it)

DEFAULT_SETTLE_RETRY_SECONDS = 1.0  # a taken-over round's outcome: first wait before asking everyone again
DEFAULT_SETTLE_RETRY_MAX_SECONDS = 10.0  # the wait doubles up to this; it never gives up

class Recovery(Aggregating):
    def restore(self) -> None:
        """Reload unfinished rounds from state.sqlite after a restart."""
        for row in self.db.unfinished_rounds():
            snap = self.db.load_snapshot(row.round_id)
            if snap is None:
                manifest = self.decode_stored(row.manifest)
                assert isinstance(manifest, RoundManifest)
                state = RoundState(manifest, node_id=self.me, reannounce_seconds=self._reannounce_seconds)
            else:
                state = RoundState.restore(snap, reannounce_seconds=self._reannounce_seconds)
            self.book.add(state)
            self.progress.outcome_conflicts += len(state.conflicts)
            logger.info("restored round %s (%s, %s, %d accepted)", row.round_id, state.phase.value,
                        state.role.value, len(state.accepted))
        self.progress.rounds_completed = self._count_installed()
        latest = self.db.latest_published()
        if latest is not None and latest.record is not None:  # whom to hear before deciding (round-v1 r5)
            members = {a.get("node_id", "") for a in latest.record.get("accepted", [])}
            members.add(str(latest.record.get("final_coordinator_node_id", "")))
            self._rejoin_known = frozenset(m for m in members if isinstance(m, str) and m) - {self.me}
        if latest is not None:
            self.progress.last_merged = {"round_number": latest.round_number, "sha256": latest.merged_sha256,
                                         "path": str(self.adapter_dir(latest.round_number)), "metrics": {}}

    def resume_effects(self) -> None:
        """After restore: re-issue the work that died with the old process (the round book
        decides what, fednode/consensus/round_book.py `resume_effects`; this only performs it)."""
        self._run(self.book.resume(self.clock()))

    def resume_after_disk_full(self) -> None:
        """The disk has room again: save what could not be saved, then perform the work the round
        book says a full disk stopped (`resume_after_pause_effects`: training for rounds still
        open, aggregating, installing, recording)."""
        now = self.clock()
        try:
            for job in list(self.jobs.values()):
                if job.unsaved_outcome is not None:
                    self._save_outcome(job.round_id, job.unsaved_outcome)
            for state in list(self.rounds.values()):
                job = self.job(state.round_id)
                if job.unsaved:
                    self._persist(state)
                row = self.db.get_round(state.round_id)
                work = PausedWork(deferred_training=job.deferred_training, aggregating=job.aggregating,
                                  recorded=row is not None and row.record is not None)
                effects = resume_after_pause_effects(state, work)
                job.deferred_training = False  # trained now if still open; moot if not
                for effect in effects:
                    self._perform(state, effect)
                self._feed(state, Tick(now))
        except DiskFull as exc:
            self.disk.note(exc, "resuming")

    async def _republish_and_install(self, state: RoundState) -> None:
        """A coordinator restarted after aggregating: announce again (same merged blob) and install."""
        row = self.db.get_round(state.round_id)
        if row is not None and row.outcome:
            await self._publish_saved_outcome(self.decode_stored(row.outcome))
        else:
            await self._publish_aggregate(state)
        await self._install(InstallAdapter(state.round_id, state.merged_sha256, state.merged_size))

    async def _settle(self, state: RoundState) -> None:
        """A round this node took over: ask every live member for the round's signed outcome until
        the state machine calls it settled (an outcome adopted, or every live member answered
        without one). A failed request proves nothing: ask again, with backoff, forever."""
        delay = DEFAULT_SETTLE_RETRY_SECONDS
        try:
            while self.sync is not None and self._unsettled(state):
                connected = self.transport.peers() if self.transport is not None else frozenset()
                # connected members first: one of them may hold the outcome, and we can reach them now
                for peer in sorted((n for n in self.live_members() if n != self.me), key=lambda n: n not in connected):
                    if not self._unsettled(state):
                        return
                    try:
                        messages = await self.sync(peer, state.round_id)
                    except (FednodeError, trio.TooSlowError, OSError) as exc:
                        logger.info("round %s: outcome query to %s failed: %s", state.round_id, peer[-8:], exc)
                        continue
                    for message in messages:
                        self.on_message(message)
                    if not any(isinstance(m, AggregateAnnounce | RoundFailed) and m.round_id == state.round_id
                               for m in messages):
                        # after a restart, members not heard yet must answer too (round-v1 r5)
                        must_answer = frozenset(self.live_members()) | self.rejoin_unheard()
                        recent = self.recent_members(self.book.policy.rejoin_wait_seconds)
                        self._feed(state, SyncAnswered(peer, must_answer, self.clock(), self.unendorsed(), recent))
                if self._unsettled(state):
                    if self.unendorsed():  # election-v1 rule 13: ask again soon after the next heartbeats
                        await trio.sleep(min(delay, self.config.coordinator.heartbeat_interval_seconds))
                        continue
                    await trio.sleep(delay)
                    delay = min(2 * delay, DEFAULT_SETTLE_RETRY_MAX_SECONDS)
        finally:
            self.job(state.round_id).settling = False

    def _unsettled(self, state: RoundState) -> bool:
        return self.book.unsettled(state.round_id) and self.rounds.get(state.round_id) is state
