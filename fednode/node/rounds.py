"""The round driver: performs what the round book and the round state machines ask for.

The round book (fednode/consensus/round_book.py) holds every round's pure `RoundState` and
decides between rounds (adopt, supersede, close early, open the next); this module feeds it
validated messages, clock ticks and coordinator changes, and carries out the effects with I/O,
through the parts it is built from: saving snapshots (driver_base), fetching blobs (blobio),
publishing outcomes, installing and recording (installing), training (training), checking and
aggregating updates (aggregating), resuming after a restart or a full disk (recovery). Each round's
work in flight is one `RoundJob` (jobs.py), dropped when the book forgets the round. Nothing here
decides protocol questions.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from fednode.consensus import (
    AggregateSeen,
    CoordinatorChanged,
    Effect,
    FailureSeen,
    InstallAdapter,
    PublishAggregate,
    PublishFailure,
    QueryOutcome,
    Reannounce,
    Role,
    RoundState,
    StartAggregation,
    SubmissionReceived,
    TrainAndSubmit,
)
from fednode.consensus.round_book import (
    MAX_PENDING_MANIFESTS,
    MAX_ROUNDS_IN_MEMORY,
    BookOutcome,
    ConflictsFound,
    History,
    RecordFailure,
    RepublishAndInstall,
    ResubmitOwn,
    SaveRound,
    quiet_until,
)
from fednode.errors import BlobMissing, DiskFull
from fednode.node.driver_base import Progress, Publish, SyncRound
from fednode.node.installing import aggregation_options
from fednode.node.recovery import Recovery
from fednode.node.reports import (
    CurrentRound,
    LastMerged,
    RoundProgress,
    RoundRecord,
    TrainingProgress,
    TransferProgress,
)
from fednode.node.retention import collected_published
from fednode.transport.base import Transport
from fednode.wire import codec
from fednode.wire.messages import AggregateAnnounce, Message, RoundFailed, RoundManifest, SubmissionAnnounce
from fednode.wire.verdict import Validation, Verdict

if TYPE_CHECKING:
    from fednode.consensus.round_events import RoundEvent

logger = logging.getLogger("fednode.rounds")

__all__ = ["MAX_PENDING_MANIFESTS", "MAX_ROUNDS_IN_MEMORY", "Progress", "Publish", "RoundDriver", "SyncRound",
           "aggregation_options"]


class RoundDriver(Recovery):
    def attach(self, transport: Transport, nursery: trio.Nursery) -> None:
        self.transport, self.nursery = transport, nursery
        token = trio.lowlevel.current_trio_token()
        # a blob found corrupt (by any reader, in any thread) may be our own announced update
        def quarantined(sha: str) -> None:
            with contextlib.suppress(trio.RunFinishedError):  # the node has stopped: nothing to restore
                token.run_sync_soon(self._on_quarantined, sha)

        self.store.on_quarantine = quarantined

    def _feed(self, state: RoundState, event: RoundEvent) -> Validation:
        return self._run(self.book.feed(state.round_id, event))

    def _run(self, outcome: BookOutcome) -> Validation:
        """Carry out what the round book asked for, in its order; then forget old finished rounds."""
        for round_id, effect in outcome.steps:
            state = self.rounds.get(round_id)
            if state is not None:
                self._perform(state, effect)
        self._forget()
        return outcome.validation

    def _perform(self, state: RoundState, effect: Effect) -> None:
        if isinstance(effect, SaveRound):
            self._persist(state, new=effect.new)
        elif isinstance(effect, ConflictsFound):
            self._on_conflict(state, effect.count)
        elif isinstance(effect, RecordFailure):
            if not effect.resumed:
                logger.info("round %s superseded (%s)", state.round_id, state.failure_reason)
            self._finish_failed(state)
        elif isinstance(effect, ResubmitOwn):
            self._spawn(self._publish_message, effect.announce)
        elif isinstance(effect, RepublishAndInstall):
            self._spawn(self._republish_and_install, state)
        elif isinstance(effect, TrainAndSubmit):
            logger.info("round %s: opened by %s; training", state.round_id, effect.manifest.coordinator_node_id[-8:])
            self._spawn(self._train_and_submit, effect.manifest)
        elif isinstance(effect, StartAggregation):
            job = self.job(state.round_id)
            if not job.aggregating:
                logger.info("round %s: aggregating %d contributions (%s), %.1f s after the manifest",
                            state.round_id, len(effect.contributions), effect.method,
                            self.clock() - state.manifest.created_at)
                job.aggregating = True
                self._spawn(self._aggregate, state, effect)
            else:  # the running aggregation is dropping a contribution: run the new plan after it
                job.replan = effect
        elif isinstance(effect, PublishAggregate):
            self._spawn(self._on_published, state, effect.announce)
        elif isinstance(effect, PublishFailure):
            self._spawn(self._on_failed, state, effect.failure)
        elif isinstance(effect, InstallAdapter):
            self._spawn(self._install, effect)
        elif isinstance(effect, Reannounce):
            self._spawn(self._reannounce, effect.announce)
        elif isinstance(effect, QueryOutcome) and not self.job(state.round_id).settling:
            self.job(state.round_id).settling = True
            self._spawn(self._settle, state)

    def open_round(self) -> RoundState | None:
        return self.book.open_round()

    def next_timer(self) -> float | None:
        return self.book.next_timer(self.clock())

    def tick(self, now: float) -> None:
        self._run(self.book.tick(now, self.live_members(), paused=self.disk.paused,
                                 paused_members=self.paused_members()))

    def on_message(self, message: Message) -> Validation:
        if not self.enabled:
            return Validation(Verdict.IGNORE, "federated_learning_off")
        now = self.clock()
        if isinstance(message, RoundManifest):
            return self._on_manifest(message, now)
        round_id = getattr(message, "round_id", "")
        state = self.rounds.get(round_id)
        if state is None:
            return Validation(Verdict.IGNORE, "unknown_round", round_id)
        if isinstance(message, SubmissionAnnounce):
            verdict = self._feed(state, SubmissionReceived(message, now))
            # Every role keeps its verdicts: a participant that inherits the round after a failover
            # must find in state.sqlite what it had accepted, like the coordinator it replaces.
            self._record_submission(state, message, "accepted" if verdict.accepted else "rejected",
                                    "" if verdict.accepted else verdict.reason)
            if verdict.accepted and state.role is Role.COORDINATOR:
                self._start_prefetch(state, message)
            return verdict
        if isinstance(message, AggregateAnnounce):
            verdict = self._feed(state, AggregateSeen(message, now))
            if verdict.accepted and state.merged_sha256 == message.merged_sha256:
                # Keep the coordinator's signed word: the round record lists what it aggregated
                # (our own view of the submissions may differ), and we can serve it to a late node.
                self._save_outcome(state.round_id, codec.encode(message))
            return verdict
        if isinstance(message, RoundFailed):
            return self._feed(state, FailureSeen(message, now))
        return Validation(Verdict.IGNORE, "not_a_round_message")

    def _record_submission(self, state: RoundState, a: SubmissionAnnounce, status: str, reason: str) -> None:
        # The coordinator's verdicts and our own submission are kept through a power loss; a member's
        # copy of others' submissions only through a crash (it learns them again by sync): fsync-free.
        durable = self.coordinator == self.me or a.participant_node_id == self.me
        try:
            self.db.add_submission(round_id=state.round_id, node_id=a.participant_node_id, announce=codec.encode(a),
                                   delta_sha256=a.delta_sha256, num_samples=a.num_samples, status=status,
                                   reason=reason, now=self.clock(), durable=durable)
        except DiskFull as exc:  # the verdict stands in memory (and in the coordinator's snapshot)
            self.disk.note(exc, f"recording a submission to round {state.round_id}")

    def _on_manifest(self, manifest: RoundManifest, now: float) -> Validation:
        finished = manifest.round_id not in self.rounds and self.db.get_round(manifest.round_id) is not None
        latest = self.db.latest_published()
        verdict = self._run(self.book.manifest(manifest, now, finished=finished,
                                               highest_published=latest.round_number if latest else 0))
        if verdict.reason == "base_model_mismatch":
            logger.warning(verdict.detail)
            self.progress.refused["base_model_mismatch"] = self.progress.refused.get("base_model_mismatch", 0) + 1
        return verdict

    def on_coordinator_changed(self, change: CoordinatorChanged) -> None:
        self._run(self.book.coordinator_changed(change))

    def maybe_start_round(self, now: float, live_federated: int, *, force: bool = False,
                          heard_round_number: int = 0) -> RoundManifest | None:
        """Open the next round if the round book says so (None = not now). `force` skips the round
        budget, the pause and the member quorum (an operator's `fednode start-round`).
        `heard_round_number`: the highest round a live member's heartbeat says it finished; the
        next round is numbered above it too (a round published while we were down is not run again)."""
        if not self.enabled or not self.book.may_open_next():  # the book's rule; spares the sqlite reads below
            self.quiet_until = -math.inf
            return None
        busy = (self.trainer is None or self.disk.paused
                or any(job.installing or job.aggregating for job in self.jobs.values()))
        counts = self.db.round_counts()
        history = History(
            live_federated=live_federated, highest_round_number=max(counts.highest_round_number, heard_round_number),
            published=counts.published + collected_published(self.db),  # retention's collected rounds count
            last_finished_at=self._finished_at(counts.last_finished) if counts.last_finished else None,
            unrecorded_published=any(r.state == "published" for r in self.db.unfinished_rounds()), busy=busy,
            unheard=len(self.rejoin_unheard()), unendorsed=len(self.unendorsed()))
        self.quiet_until = quiet_until(now=now, policy=self.book.policy, history=history)  # election-v1 rule 18
        plan = self.book.next_round(now, history, force=force)
        if plan is None or self.trainer is None:
            return None
        cfg = self.config.round
        latest = self.db.latest_published()
        manifest = RoundManifest(
            round_id=plan.round_id, base_model_id=self.trainer.base_model_id,
            coordinator_node_id=self.me, community_id=self.config.community.id, lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha, learning_rate=cfg.learning_rate, min_participants=cfg.min_participants,
            max_participants=cfg.max_participants, round_timeout_seconds=cfg.round_timeout_seconds, created_at=now,
            term=plan.term, round_number=plan.round_number, base_model_hash=self.trainer.base_model_hash,
            start_adapter_sha256=latest.merged_sha256 if latest else "",
            start_adapter_size=self._merged_size(latest) if latest else 0,
            local_steps=cfg.local_steps, aggregation=cfg.aggregation,
        )
        manifest = codec.sign(manifest, self.identity)
        self._run(self.book.open(manifest, now))
        return manifest

    def _merged_size(self, row: Any) -> int:
        """A published round's merged adapter size, from the round record: our copy of the blob may
        be gone (deleted, quarantined); the manifest names it and participants fetch it from any holder."""
        with contextlib.suppress(BlobMissing):
            return self.store.size(row.merged_sha256)
        return RoundRecord.from_json(row.record).merged_size if row.record else 0

    @staticmethod
    def _finished_at(row: Any) -> float:
        return RoundRecord.from_json(row.record).finished_at if row.record else 0.0

    def status(self) -> RoundProgress:
        shown = self.open_round() or self.book.latest()
        p = self.progress
        # the progress dicts are updated in place (a trainer thread reports steps): read copies
        return RoundProgress(
            rounds_completed=p.rounds_completed, rounds_failed=p.rounds_failed,
            last_merged=LastMerged.from_json(dict(p.last_merged)) if p.last_merged else None,
            training=TrainingProgress.from_json(dict(p.training)) if p.training else None,
            transfer=TransferProgress.from_json(dict(p.transfer)) if p.transfer else None,
            refused=dict(p.refused), pending_evaluations=p.pending_evaluations,
            outcome_conflicts=p.outcome_conflicts,
            unsettled_rounds=sorted(r.round_id for r in self.rounds.values() if self._unsettled(r)),
            merged_recovery=dict(p.merged_recovery), merged_rebuilt=p.merged_rebuilt,
            current_round=None if shown is None else CurrentRound(
                round_id=shown.round_id, round_number=shown.manifest.round_number, state=shown.phase,
                role=shown.role, term=shown.term, coordinator_node_id=shown.coordinator_node_id,
                submissions=len(shown.accepted), min_participants=shown.manifest.min_participants,
                deadline_in_seconds=max(0.0, shown.deadline - self.clock()) if shown.is_open else 0.0))
