"""The round driver: performs what the pure round state machines ask for.

One `RoundState` (fednode.consensus) per round; this module feeds it validated messages and
clock ticks, persists its snapshot after every change, and carries out its effects with I/O:
training in a worker thread, fetching and validating delta blobs, aggregating, publishing,
installing the merged adapter and writing the round record. Nothing here decides protocol
questions; those live in the state machine and the election.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from fednode.blobs.fetch import fetch_blob
from fednode.blobs.store import BlobStore
from fednode.config import Config
from fednode.consensus import (
    AggregateSeen,
    AggregationDone,
    AggregationFailed,
    ContributionRejected,
    CoordinatorChanged,
    Effect,
    FailureSeen,
    InstallAdapter,
    Phase,
    PublishAggregate,
    PublishFailure,
    QueryOutcome,
    Reannounce,
    Resumed,
    Role,
    RoundState,
    StartAggregation,
    SubmissionReceived,
    SyncAnswered,
    Tick,
    TrainAndSubmit,
)
from fednode.consensus.round_book import (
    MAX_ROUNDS_IN_MEMORY,
    BookOutcome,
    ConflictsFound,
    History,
    RecordFailure,
    RoundBook,
    RoundPolicy,
    SaveRound,
)
from fednode.errors import (
    BlobIntegrityError,
    DiskFull,
    FednodeError,
    InvalidUpdate,
    TransferError,
    TransportError,
    is_disk_full,
)
from fednode.identity import Identity
from fednode.node.diskfull import DiskPause
from fednode.node.records import round_record, write_record
from fednode.node.trainers import Trainer
from fednode.state import OwnUpdate, StateDB
from fednode.transport.base import Transport
from fednode.wire import codec
from fednode.wire.messages import (
    AggregateAnnounce,
    Contribution,
    Message,
    RoundFailed,
    RoundManifest,
    SubmissionAnnounce,
)
from fednode.wire.verdict import Validation, Verdict

if TYPE_CHECKING:
    from fednode.aggregation import AggregationOptions
    from fednode.consensus.round_events import RoundEvent

logger = logging.getLogger("fednode.rounds")

DEFAULT_PREFETCH_CONCURRENCY = 4
DEFAULT_PREFETCH_RETRY_SECONDS = 0.5  # first wait before fetching a live participant's update again
DEFAULT_PREFETCH_RETRY_MAX_SECONDS = 4.0  # the wait doubles up to this
DEFAULT_PREFETCH_PATIENCE_SECONDS = 30.0  # then its update is rejected as unavailable, live or not
DEFAULT_INSTALL_RETRY_SECONDS = 1.0  # first wait before fetching a merged adapter again
DEFAULT_INSTALL_RETRY_MAX_SECONDS = 30.0  # the wait doubles up to this
DEFAULT_SETTLE_RETRY_SECONDS = 1.0  # a taken-over round's outcome: first wait before asking everyone again
DEFAULT_SETTLE_RETRY_MAX_SECONDS = 10.0  # the wait doubles up to this; it never gives up
MAX_BLOB_REFETCHES = 2  # a blob found corrupt on our disk is quarantined and fetched again this often

Publish = Callable[[Message], Awaitable[None]]
SyncRound = Callable[[str, str], Awaitable[list[Message]]]  # (peer, round id) -> its signed messages for it


@dataclass
class Progress:
    """What the node is doing now, for `fednode status` and the harness's live view."""

    training: dict[str, Any] = field(default_factory=dict)
    transfer: dict[str, Any] = field(default_factory=dict)
    rounds_completed: int = 0
    rounds_failed: int = 0
    last_merged: dict[str, Any] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    bytes_fetched: int = 0
    pending_evaluations: int = 0
    outcome_conflicts: int = 0  # two different signed outcomes met for one round (round-v1.md)


def aggregation_options(config: Config) -> AggregationOptions:
    """The [aggregation] section as the aggregation layer's options. With DP noise on, every
    update is clipped to dp_clip_norm (the noise is calibrated to that bound)."""
    a = config.aggregation
    from fednode.aggregation import AggregationOptions

    dp = a.dp_noise_multiplier > 0
    return AggregationOptions(trim_beta=a.trim_beta, clip_norm=a.dp_clip_norm if dp else (a.clip_norm or None),
                              dp_noise_multiplier=a.dp_noise_multiplier, exact_max_batch_bytes=a.exact_max_batch_bytes)


class RoundDriver:
    def __init__(self, *, config: Config, identity: Identity, store: BlobStore, db: StateDB, trainer: Trainer | None,
                 publish: Publish, clock: Callable[[], float], holders: Callable[[str], list[str]],
                 live_members: Callable[[], list[str]], inline_training: bool = False,
                 sync: SyncRound | None = None, disk: DiskPause | None = None) -> None:
        self.config = config
        self.identity = identity
        self.me = identity.node_id
        self.store = store
        self.db = db
        self.trainer = trainer
        self.publish = publish
        self.clock = clock
        self.holders = holders
        self.live_members = live_members
        self.inline_training = inline_training
        self.sync = sync
        self._settling: set[str] = set()  # rounds whose outcome a _settle task is asking for
        self.transport: Transport | None = None
        self.nursery: trio.Nursery | None = None
        c, r = config.coordinator, config.round
        # A node that just won a term waits a heartbeat interval before opening a round: a rival's
        # claim for a later term, published at the same moment, arrives within it (else both open
        # round n, and the earlier term's round is superseded: wasted work, not harm).
        policy = RoundPolicy(max_rounds=r.max_rounds, pause_seconds=r.pause_seconds,
                             quorum=r.wait_for_members or r.min_participants,
                             settle_seconds=c.heartbeat_interval_seconds)
        self.book = RoundBook(self.me, policy=policy, coordinator=c.fixed_peer_id if c.mode == "fixed" else "",
                              base_model_hash=trainer.base_model_hash if trainer is not None else "",
                              reannounce_seconds=config.round.reannounce_seconds)
        self.rounds = self.book.rounds
        self.pending_manifests = self.book.pending
        self.progress = Progress()
        self._train_lock = trio.Lock()
        self._prefetch_limiter = trio.CapacityLimiter(DEFAULT_PREFETCH_CONCURRENCY)
        self._prefetched: dict[tuple[str, str], trio.Event] = {}  # (round_id, node_id) -> blob checked
        self._update_errors: dict[tuple[str, str], str] = {}
        self._aggregating: set[str] = set()
        self._replans: dict[str, StartAggregation] = {}  # re-plans issued while an aggregation ran
        self._installing: set[str] = set()
        self._discarded: dict[str, float | None] = {}
        self._fetch_locks: dict[str, trio.Lock] = {}
        self._started_at = clock()
        self._reannounce_seconds = config.round.reannounce_seconds
        self._metrics: dict[str, dict[str, Any]] = {}  # round id -> {"local"/"merged": figures}
        self._eval_limiter = trio.CapacityLimiter(1)
        # A full disk pauses participation (fednode.node.diskfull); what it stopped is redone on resume.
        self.disk = disk or DiskPause(clock)
        self._unsaved: set[str] = set()  # rounds whose snapshot a full disk kept out of state.sqlite
        self._unsaved_outcomes: dict[str, bytes] = {}  # round id -> signed outcome not yet saved
        self._deferred_training: set[str] = set()  # open rounds we did not train for while paused

    @property
    def coordinator(self) -> str:
        return self.book.coordinator

    @property
    def term(self) -> int:
        return self.book.term

    @property
    def enabled(self) -> bool:
        return self.config.research.federated_learning

    # -- lifecycle ---------------------------------------------------------------------------
    def attach(self, transport: Transport, nursery: trio.Nursery) -> None:
        self.transport, self.nursery = transport, nursery
        token = trio.lowlevel.current_trio_token()
        # a blob found corrupt (by any reader, in any thread) may be our own announced update
        def quarantined(sha: str) -> None:
            with contextlib.suppress(trio.RunFinishedError):  # the node has stopped: nothing to restore
                token.run_sync_soon(self._on_quarantined, sha)

        self.store.on_quarantine = quarantined

    def _on_quarantined(self, sha: str) -> None:
        for state in list(self.rounds.values()):
            own = state.own_submission
            if own is not None and own.delta_sha256 == sha and state.phase not in (Phase.PUBLISHED, Phase.FAILED):
                logger.warning("round %s: our update %s was corrupt on disk (quarantined); restoring it",
                               state.round_id, sha[:16])
                self._spawn(self._recover_own_update, state.manifest, own)

    def restore(self) -> None:
        """Reload unfinished rounds from state.sqlite after a restart."""
        for row in self.db.unfinished_rounds():
            snap = self.db.load_snapshot(row.round_id)
            if snap is None:
                manifest = codec.decode(row.manifest)
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
        if latest is not None:
            self.progress.last_merged = {"round_number": latest.round_number, "sha256": latest.merged_sha256,
                                         "path": str(self.adapter_dir(latest.round_number))}

    def resume_effects(self) -> None:
        """After restore: re-issue the work that died with the old process."""
        now = self.clock()
        for state in list(self.rounds.values()):
            self._feed(state, Resumed(now))  # a coordinator first settles what happened while it was down
            if state.phase is Phase.COLLECTING and state.own_submission is None:
                self._spawn(self._train_and_submit, state.manifest)
            elif state.own_submission is not None and state.is_open:
                self._spawn(self._publish_message, state.own_submission)
                state.schedule_reannounce(now)
            elif state.phase is Phase.PUBLISHED and state.merged_sha256:
                if state.role is Role.COORDINATOR:
                    self._spawn(self._republish_and_install, state)
                else:
                    self._spawn(self._install, InstallAdapter(state.round_id, state.merged_sha256, state.merged_size))
            elif state.phase is Phase.FAILED:
                self._finish_failed(state)
            self._feed(state, Tick(now))

    def resume_after_disk_full(self) -> None:
        """The disk has room again: save what could not be saved, and redo the work a full disk
        stopped (training for rounds still open, aggregating, installing, recording)."""
        now = self.clock()
        try:
            for round_id, outcome in list(self._unsaved_outcomes.items()):
                self._save_outcome(round_id, outcome)
            for state in list(self.rounds.values()):
                if state.round_id in self._unsaved:
                    self._persist(state)
                row = self.db.get_round(state.round_id)
                recorded = row is not None and row.record is not None
                if state.is_open and state.round_id in self._deferred_training:
                    self._deferred_training.discard(state.round_id)
                    self._spawn(self._train_and_submit, state.manifest)
                elif (state.phase is Phase.AGGREGATING and state.role is Role.COORDINATOR
                      and state.round_id not in self._aggregating):
                    state.aggregation_started = False  # the aggregation that hit the full disk is re-planned
                elif state.phase is Phase.PUBLISHED and state.merged_sha256 and not recorded:
                    self._spawn(self._install, InstallAdapter(state.round_id, state.merged_sha256, state.merged_size))
                elif state.phase is Phase.FAILED and not recorded:
                    self._finish_failed(state)
                self._feed(state, Tick(now))
        except DiskFull as exc:
            self.disk.note(exc, "resuming")
        self._deferred_training.intersection_update(r.round_id for r in self.rounds.values() if r.is_open)

    async def _republish_and_install(self, state: RoundState) -> None:
        """A coordinator restarted after aggregating: announce again (same merged blob) and install."""
        row = self.db.get_round(state.round_id)
        if row is not None and row.outcome:
            await self.publish(codec.decode(row.outcome))
        else:
            await self._publish_aggregate(state)
        await self._install(InstallAdapter(state.round_id, state.merged_sha256, state.merged_size))

    async def _publish_aggregate(self, state: RoundState) -> AggregateAnnounce:
        announce = codec.sign(AggregateAnnounce(
            community_id=state.manifest.community_id, round_id=state.round_id,
            round_number=state.manifest.round_number, coordinator_node_id=self.me, term=state.term,
            merged_sha256=state.merged_sha256, merged_size=state.merged_size, aggregation=state.manifest.aggregation,
            contributions=state.contributions(), announced_at=self.clock()), self.identity)
        self._save_outcome(state.round_id, codec.encode(announce))
        await self.publish(announce)
        return announce

    def _count_installed(self) -> int:
        return sum(1 for r in self.db.rounds(states=("published",)) if r.record)

    # -- helpers -----------------------------------------------------------------------------
    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self.nursery is not None
        self.nursery.start_soon(self._guard, fn, *args)

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        except (FednodeError, OSError, trio.TooSlowError) as exc:
            name = getattr(fn, "__name__", str(fn))
            if not self.disk.note(exc, name):
                logger.warning("%s failed: %s", name, exc)

    async def _publish_message(self, message: Message) -> None:
        await self.publish(message)

    def adapter_dir(self, round_number: int) -> Any:
        return self.config.data_dir / "adapters" / f"round-{round_number}"

    def _persist(self, state: RoundState, *, new: bool = False) -> None:
        """Save the round's snapshot; a full disk leaves it in memory (saved on resume) and pauses."""
        try:
            self._persist_now(state, new=new or state.round_id in self._unsaved)
            self._unsaved.discard(state.round_id)
        except DiskFull as exc:
            self.disk.note(exc, f"saving round {state.round_id}")
            self._unsaved.add(state.round_id)

    def _save_outcome(self, round_id: str, outcome: bytes) -> None:
        """Remember a signed outcome in state.sqlite; a full disk keeps it in memory until resume."""
        try:
            self.db.set_outcome(round_id, outcome)
            self._unsaved_outcomes.pop(round_id, None)
        except DiskFull as exc:
            self.disk.note(exc, f"saving the outcome of round {round_id}")
            self._unsaved_outcomes[round_id] = outcome

    def _persist_now(self, state: RoundState, *, new: bool = False) -> None:
        now = self.clock()
        if new:
            self.db.put_round(round_id=state.round_id, round_number=state.manifest.round_number, term=state.term,
                              coordinator=state.coordinator_node_id, manifest=codec.encode(state.manifest),
                              state=state.phase.value, now=now)
        self.db.save_snapshot(state.round_id, state=state.phase.value, term=state.term,
                              coordinator=state.coordinator_node_id, snapshot=state.snapshot(), now=now)

    def _feed(self, state: RoundState, event: RoundEvent) -> Validation:
        return self._run(self.book.feed(state.round_id, event))

    def _run(self, outcome: BookOutcome) -> Validation:
        """Carry out what the round book asked for, in its order; then forget old finished rounds."""
        for round_id, effect in outcome.steps:
            state = self.rounds.get(round_id)
            if state is not None:
                self._perform(state, effect)
        self.book.forget_old(pinned=self._installing)
        return outcome.validation

    def _perform(self, state: RoundState, effect: Effect) -> None:
        if isinstance(effect, SaveRound):
            self._persist(state, new=effect.new)
        elif isinstance(effect, ConflictsFound):
            self._on_conflict(state, effect.count)
        elif isinstance(effect, RecordFailure):
            logger.info("round %s superseded (%s)", state.round_id, state.failure_reason)
            self._finish_failed(state)
        elif isinstance(effect, TrainAndSubmit):
            self._spawn(self._train_and_submit, effect.manifest)
        elif isinstance(effect, StartAggregation):
            if state.round_id not in self._aggregating:
                self._aggregating.add(state.round_id)
                self._spawn(self._aggregate, state, effect)
            else:  # the running aggregation is dropping a contribution: run the new plan after it
                self._replans[state.round_id] = effect
        elif isinstance(effect, PublishAggregate):
            self._spawn(self._on_published, state, effect.announce)
        elif isinstance(effect, PublishFailure):
            self._spawn(self._on_failed, state, effect.failure)
        elif isinstance(effect, InstallAdapter):
            self._spawn(self._install, effect)
        elif isinstance(effect, Reannounce):
            self._spawn(self._reannounce, effect.announce)
        elif isinstance(effect, QueryOutcome) and state.round_id not in self._settling:
            self._settling.add(state.round_id)
            self._spawn(self._settle, state)

    # -- one outcome per round (fednode/consensus/outcome.py) ---------------------------------
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
                        self._feed(state, SyncAnswered(peer, frozenset(self.live_members()), self.clock()))
                if self._unsettled(state):
                    await trio.sleep(delay)
                    delay = min(2 * delay, DEFAULT_SETTLE_RETRY_MAX_SECONDS)
        finally:
            self._settling.discard(state.round_id)

    def _unsettled(self, state: RoundState) -> bool:
        return self.book.unsettled(state.round_id) and self.rounds.get(state.round_id) is state

    def _on_conflict(self, state: RoundState, new: int) -> None:
        """Two different signed outcomes for one round: count it, log it loudly, and put it in the
        round's record if that is written already (else it goes in when it is)."""
        self.progress.outcome_conflicts += new
        logger.error("round %s: conflicting outcomes %s", state.round_id, [c.as_dict() for c in state.conflicts])
        row = self.db.get_round(state.round_id)
        if row is not None and row.record and state.round_id not in self._installing:
            record = {**row.record, "outcome_conflicts": [c.as_dict() for c in state.conflicts]}
            self.db.finish_round(state.round_id, state=row.state, merged_sha256=row.merged_sha256,
                                 outcome=row.outcome or b"", record=record, now=self.clock())
            write_record(self.config.data_dir, record)

    # -- the round book's entry points ---------------------------------------------------------
    def open_round(self) -> RoundState | None:
        return self.book.open_round()

    def next_timer(self) -> float | None:
        return self.book.next_timer(self.clock())

    def tick(self, now: float) -> None:
        self._run(self.book.tick(now, self.live_members()))

    # -- messages from the network (already validated: signature, community, window) ----------
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
        try:
            self.db.add_submission(round_id=state.round_id, node_id=a.participant_node_id, announce=codec.encode(a),
                                   delta_sha256=a.delta_sha256, num_samples=a.num_samples, status=status,
                                   reason=reason, now=self.clock())
        except DiskFull as exc:  # the verdict stands in memory (and in the coordinator's snapshot)
            self.disk.note(exc, f"recording a submission to round {state.round_id}")

    def _on_manifest(self, manifest: RoundManifest, now: float) -> Validation:
        finished = manifest.round_id not in self.rounds and self.db.get_round(manifest.round_id) is not None
        verdict = self._run(self.book.manifest(manifest, now, finished=finished))
        if verdict.reason == "base_model_mismatch":
            logger.warning(verdict.detail)
            self.progress.refused["base_model_mismatch"] = self.progress.refused.get("base_model_mismatch", 0) + 1
        return verdict

    def on_coordinator_changed(self, change: CoordinatorChanged) -> None:
        self._run(self.book.coordinator_changed(change))

    # -- coordinator: start a round ---------------------------------------------------------
    def maybe_start_round(self, now: float, live_federated: int, *, force: bool = False) -> RoundManifest | None:
        """Open the next round if the round book says so (None = not now). `force` skips the round
        budget, the pause and the member quorum (an operator's `fednode start-round`)."""
        if not self.enabled or self.book.coordinator != self.me or self.book.open_round() is not None:
            return None
        busy = self.trainer is None or bool(self._installing or self._aggregating) or self.disk.paused
        rows = self.db.rounds()
        finished = [r for r in rows if r.state in ("published", "failed")]
        history = History(
            live_federated=live_federated, highest_round_number=max((r.round_number for r in rows), default=0),
            published=sum(1 for r in finished if r.state == "published"),
            last_finished_at=self._finished_at(finished[-1]) if finished else None,
            unrecorded_published=any(r.state == "published" for r in self.db.unfinished_rounds()), busy=busy)
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
        if self.store.has(row.merged_sha256):
            return self.store.size(row.merged_sha256)
        return int((row.record or {}).get("merged_size", 0))

    @staticmethod
    def _finished_at(row: Any) -> float:
        return float((row.record or {}).get("finished_at", 0.0))

    # -- participant: train and submit --------------------------------------------------------
    async def _train_and_submit(self, manifest: RoundManifest) -> None:
        if self.trainer is None:
            return
        if self.disk.paused:  # resume_after_disk_full trains for it if the round is still open
            self._deferred_training.add(manifest.round_id)
            return
        try:
            await self._train_and_submit_now(manifest)
        except Exception as exc:
            if is_disk_full(exc):
                self._deferred_training.add(manifest.round_id)
            raise

    async def _train_and_submit_now(self, manifest: RoundManifest) -> None:
        assert self.trainer is not None
        async with self._train_lock:
            start = await self._start_adapter(manifest)
            cached = self.db.get_own_update(manifest.round_number, manifest.start_adapter_sha256)
            if cached is not None and await self._own_update_present(manifest, cached):
                update = cached
            else:
                update = await self._train(manifest, start)
            state = self.rounds.get(manifest.round_id)
            if state is None or not state.is_open:
                logger.info("round %s closed while training; not submitting", manifest.round_id)
                return
            announce = codec.sign(SubmissionAnnounce(
                round_id=manifest.round_id, participant_node_id=self.me, num_samples=update.num_samples,
                submitted_at=self.clock(), community_id=manifest.community_id, delta_sha256=update.delta_sha256,
                delta_size=self.store.size(update.delta_sha256), train_loss=_finite(update.train_loss),
            ), self.identity)
            await self.publish(announce)
        if self.config.learning.evaluate:  # after submitting: scoring never holds a round up
            self._spawn(self._evaluate, manifest.round_id, "local", update.delta_sha256)

    async def _own_update_present(self, manifest: RoundManifest, update: OwnUpdate) -> bool:
        """Our update from before a restart, verified. Missing or corrupt, it is fetched from the
        coordinator (which may have pulled it already); False: train again."""
        sha = update.delta_sha256
        try:
            await self._read_blob(sha, lambda: self._fetch(sha, None,
                                                           [manifest.coordinator_node_id, *self.holders(sha)]))
        except (TransportError, trio.TooSlowError, BlobIntegrityError) as exc:
            logger.info("round %s: our earlier update %s is gone (%s); training again", manifest.round_id,
                        sha[:16], str(exc)[:200])
            return False
        return True

    async def _reannounce(self, announce: SubmissionAnnounce) -> None:
        """Publish our submission again, first making sure we can still serve its blob: a copy that
        went bad on our disk was quarantined when the coordinator asked for it."""
        state = self.rounds.get(announce.round_id)
        if state is not None and state.is_open and not self.store.has(announce.delta_sha256):
            await self._recover_own_update(state.manifest, announce)
        await self.publish(announce)

    async def _recover_own_update(self, manifest: RoundManifest, announce: SubmissionAnnounce) -> None:
        """Our announced update is gone from our disk: fetch it from another holder, else train again
        (same start adapter, steps and seed: the same bytes, hence the same announced sha256)."""
        sha = announce.delta_sha256
        try:
            await self._fetch(sha, announce.delta_size, [manifest.coordinator_node_id, *self.holders(sha)])
            return
        except (TransportError, trio.TooSlowError) as exc:
            logger.warning("round %s: our update %s is gone and no holder has it (%s); training it again",
                           manifest.round_id, sha[:16], str(exc)[:200])
        async with self._train_lock:
            if self.store.has(sha):
                return
            update = await self._train(manifest, await self._start_adapter(manifest))
        if update.delta_sha256 != sha:
            logger.error("round %s: training again gave update %s, not the announced %s; it cannot be served",
                         manifest.round_id, update.delta_sha256[:16], sha[:16])

    async def _train(self, manifest: RoundManifest, start: bytes | None) -> OwnUpdate:
        assert self.trainer is not None
        trainer = self.trainer
        total = manifest.local_steps
        self.progress.training = {"round_id": manifest.round_id, "round_number": manifest.round_number,
                                  "step": 0, "steps": total, "loss": None, "state": "training"}

        def progress(step: int, loss: float) -> None:
            self.progress.training.update(step=step, loss=loss)

        # The trainer runs in a worker thread on the wall clock: hand it the round's deadline there.
        deadline = time.time() + (manifest.deadline - self.clock())

        def work() -> Any:
            return trainer.train(start, round_number=manifest.round_number, steps=total,
                                 learning_rate=manifest.learning_rate, seed=self.config.learning.seed,
                                 progress=progress, deadline=deadline)

        # abandon_on_cancel: a stop (SIGTERM) must not wait for the local steps to finish; the thread's
        # result is dropped and the daemon exits (a restart trains the round again: nothing was stored).
        out = work() if self.inline_training else await trio.to_thread.run_sync(  # type: ignore[call-arg]
            work, abandon_on_cancel=True)
        sha = self.store.put_bytes(out.delta_bytes)
        metrics = {f"train_{k}": v for k, v in out.metrics.items()}
        update = OwnUpdate(manifest.round_number, manifest.start_adapter_sha256, sha, out.num_samples,
                           float(out.metrics.get("loss", 0.0)), metrics)
        self.db.put_own_update(update)
        self.progress.training.update(state="submitted", metrics=metrics)
        return update

    async def _start_adapter(self, manifest: RoundManifest) -> bytes | None:
        sha = manifest.start_adapter_sha256
        if not sha:
            return None
        return await self._read_blob(sha, lambda: self._fetch(
            sha, manifest.start_adapter_size, [manifest.coordinator_node_id, *self.holders(sha)]))

    async def _read_blob(self, sha: str, fetch: Callable[[], Awaitable[None]]) -> bytes:
        """The verified bytes of a blob this node needs. Missing, or corrupt on our disk (the read
        quarantines it), it is fetched again with `fetch` (from the other holders; never from us)."""
        for attempt in range(MAX_BLOB_REFETCHES + 1):
            if not self.store.has(sha):
                await fetch()
            try:
                return self.store.read(sha)
            except BlobIntegrityError as exc:
                if attempt == MAX_BLOB_REFETCHES:
                    raise
                logger.warning("blob %s is corrupt on disk (%s): quarantined; fetching it again", sha[:16], exc)
            except KeyError:  # removed between has() and the read: fetch it
                continue
        raise BlobIntegrityError(f"blob {sha} still missing after {MAX_BLOB_REFETCHES} fetches")

    async def _fetch(self, sha: str, size: int | None, holders: list[str]) -> None:
        """Fetch a blob once: concurrent callers for the same sha256 wait for the first one."""
        lock = self._fetch_locks.setdefault(sha, trio.Lock())
        try:
            async with lock:
                if not self.store.has(sha):
                    await self._fetch_now(sha, size, holders)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._fetch_locks.pop(sha, None)

    async def _fetch_now(self, sha: str, size: int | None, holders: list[str]) -> None:
        """Fetch `sha` from `holders` (`size`: the announced size, None when unknown)."""
        assert self.transport is not None
        peers = [h for h in dict.fromkeys(holders) if h and h != self.me]
        self.progress.transfer = {"sha256": sha, "size": size or 0, "done": 0}

        def progress(done: int, total: int) -> None:
            self.progress.transfer.update(done=done, size=total)

        try:
            with trio.fail_after(self.config.blobs.fetch_timeout_seconds):
                await fetch_blob(self.transport, sha, peers, self.store, expected_size=size,
                                 max_size=self.config.blobs.max_blob_bytes, progress=progress)
        except* TransportError as group:  # fetch_blob's worker nursery wraps e.g. our own transport closing
            first = _first_leaf(group)
            if isinstance(first, TransferError):
                raise first from None
            raise TransferError(f"blob {sha}: {first}"[:300]) from None
        except* OSError as group:  # writing the download: a full disk is a pause, not a crash
            first = _first_leaf(group)
            if is_disk_full(first):
                raise DiskFull(f"fetching blob {sha}: {first}"[:300]) from None
            raise
        fetched = self.store.size(sha)
        self.progress.bytes_fetched += fetched
        self.progress.transfer.update(done=fetched, state="verified")

    # -- coordinator: collect and aggregate ---------------------------------------------------
    def _start_prefetch(self, state: RoundState, a: SubmissionAnnounce) -> None:
        key = (state.round_id, a.participant_node_id)
        if key not in self._prefetched:
            self._prefetched[key] = trio.Event()
            self._spawn(self._prefetch, state, a)

    async def _prefetch(self, state: RoundState, a: SubmissionAnnounce) -> None:
        key = (state.round_id, a.participant_node_id)
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
                self._prefetched.pop(key).set()  # our disk's fault, not theirs: fetch again on resume
                return
            self._update_errors[key] = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            if key in self._prefetched:
                self._prefetched[key].set()

    def _may_serve_soon(self, node_id: str) -> bool:
        """Live, or we are too freshly started to have heard its heartbeats yet (a restart)."""
        c = self.config.coordinator
        settling = self.clock() - self._started_at < c.heartbeat_interval_seconds * c.liveness_timeout_heartbeats
        return settling or node_id in self.live_members()

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
            if self.inline_training:
                trainer.check_update(data, max_norm=max_norm)
            else:
                await trio.to_thread.run_sync(lambda: trainer.check_update(data, max_norm=max_norm))

    async def _aggregate(self, state: RoundState, effect: StartAggregation) -> None:
        try:
            await self._aggregate_inner(state, effect)
        finally:
            self._aggregating.discard(state.round_id)
            replan = self._replans.pop(state.round_id, None)
            if replan is not None and state.phase is Phase.AGGREGATING:
                self._perform(state, replan)

    async def _aggregate_inner(self, state: RoundState, effect: StartAggregation) -> None:
        for a in effect.announces:
            self._start_prefetch(state, a)
        # the events themselves: a prefetch stopped by a full disk drops its entry (to fetch again later)
        checked = [self._prefetched[(state.round_id, a.participant_node_id)] for a in effect.announces]
        for event in checked:
            await event.wait()
        if self.disk.paused:  # a download hit the full disk: resume_after_disk_full re-plans
            return
        bad = [(a, self._update_errors[(state.round_id, a.participant_node_id)]) for a in effect.announces
               if (state.round_id, a.participant_node_id) in self._update_errors]
        if not self._aggregation_wanted(state):
            return
        if bad:
            for a, reason in bad:
                kind = "invalid_update" if "InvalidUpdate" in reason or "DecodeError" in reason else "unavailable"
                self._record_submission_rejected(state, a, kind, reason)
                self._feed(state, ContributionRejected(a.participant_node_id, kind, self.clock(), reason))
            return  # the state machine re-plans: a fresh StartAggregation, or failure
        learning = self.config.learning
        if learning.task == "fake" and learning.fake_aggregate_delay_seconds:  # fault tests act in this gap
            await trio.sleep(learning.fake_aggregate_delay_seconds)
        datas = [await self._read_blob(a.delta_sha256, self._fetch_delta(a)) for a in effect.announces]
        weights = [float(a.num_samples) for a in effect.announces]
        from fednode.aggregation import aggregate, dump_delta

        options = aggregation_options(self.config)

        def work() -> tuple[bytes, float | None]:
            result = aggregate(datas, weights, effect.method, rank=state.manifest.lora_rank,
                               alpha=state.manifest.lora_alpha, options=options)
            return dump_delta(result.tensors), result.discarded_energy

        try:
            if self.inline_training:
                merged, discarded = work()
            else:
                merged, discarded = await trio.to_thread.run_sync(work)
        except FednodeError as exc:
            if self._aggregation_wanted(state):
                self._feed(state, AggregationFailed(f"aggregation failed: {exc}"[:200], self.clock()))
            return
        sha = self.store.put_bytes(merged)
        if not self._aggregation_wanted(state):
            return
        self._discarded[state.round_id] = discarded
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

    async def _on_published(self, state: RoundState, announce: AggregateAnnounce) -> None:
        signed = codec.sign(announce, self.identity)
        self._save_outcome(state.round_id, codec.encode(signed))
        await self.publish(signed)
        await self._install(InstallAdapter(state.round_id, announce.merged_sha256, announce.merged_size))

    async def _on_failed(self, state: RoundState, failure: RoundFailed) -> None:
        signed = codec.sign(failure, self.identity)
        self._save_outcome(state.round_id, codec.encode(signed))
        await self.publish(signed)
        self._finish_failed(state)

    def _finish_failed(self, state: RoundState) -> None:
        record = self._record(state, "failed", "", 0)
        row = self.db.get_round(state.round_id)
        try:
            self.db.finish_round(state.round_id, state="failed", merged_sha256="", outcome=(row.outcome or b"")
                                 if row else b"", record=record, now=self.clock())
            write_record(self.config.data_dir, record)
        except (DiskFull, OSError) as exc:
            if not self.disk.note(exc, f"recording failed round {state.round_id}"):
                raise
            return  # resume_after_disk_full records it
        self.progress.rounds_failed += 1

    async def _install(self, effect: InstallAdapter) -> None:
        state = self.rounds.get(effect.round_id)
        if state is None or effect.round_id in self._installing:
            return
        self._installing.add(effect.round_id)
        try:
            merged = await self._read_blob(effect.sha256, lambda: self._fetch_merged(state, effect))
            number = state.manifest.round_number
            target = self.adapter_dir(number)
            if self.trainer is not None:
                trainer = self.trainer

                def work() -> None:
                    trainer.install(merged, target, lora_rank=state.manifest.lora_rank,
                                    lora_alpha=state.manifest.lora_alpha)

                if self.inline_training:
                    work()
                else:
                    await trio.to_thread.run_sync(work)
            _point_latest(self.config.data_dir / "adapters", number)
            metrics = dict(self._metrics.get(state.round_id, {}))
            own = self.db.get_own_update(number, state.manifest.start_adapter_sha256)
            if own is not None:
                metrics["train"] = {k[len("train_"):]: v for k, v in own.metrics.items() if k.startswith("train_")}
            record = self._record(state, "published", effect.sha256, effect.size, metrics)
            row = self.db.get_round(state.round_id)
            self.db.finish_round(state.round_id, state="published", merged_sha256=effect.sha256,
                                 outcome=(row.outcome or b"") if row else b"", record=record, now=self.clock())
            write_record(self.config.data_dir, record)
            self.progress.rounds_completed = self._count_installed()
            if number >= self.progress.last_merged.get("round_number", 0):  # an older round installed late
                self.progress.last_merged = {"round_number": number, "sha256": effect.sha256, "path": str(target),
                                             "metrics": metrics.get("merged", {})}
            logger.info("round %s installed: merged %s", state.round_id, effect.sha256[:16])
        finally:
            self._installing.discard(effect.round_id)
        # Every node scores the same merged adapter on the same held-out split: the coordinator
        # does it once for the record (after installing, so the next round is not held up).
        if self.config.learning.evaluate and self.trainer is not None and state.role is Role.COORDINATOR:
            self._spawn(self._evaluate, state.round_id, "merged", effect.sha256)

    async def _evaluate(self, round_id: str, kind: str, sha: str) -> None:
        """Score an adapter on the held-out split in the background and put the figures in the
        round's record ("local": this node's update, "merged": the round's merged adapter)."""
        assert self.trainer is not None
        trainer = self.trainer
        data = self.store.read(sha)
        self.progress.pending_evaluations += 1
        try:
            async with self._eval_limiter:
                result = (trainer.evaluate(data) if self.inline_training
                          else await trio.to_thread.run_sync(trainer.evaluate, data))
        finally:
            self.progress.pending_evaluations -= 1
        self._metrics.setdefault(round_id, {})[kind] = dict(result)
        if len(self._metrics) > MAX_ROUNDS_IN_MEMORY:
            self._metrics.pop(next(iter(self._metrics)))
        row = self.db.get_round(round_id)
        if row is not None and row.record:  # already recorded: add the figures to it
            record = {**row.record, "metrics": {**row.record.get("metrics", {}), kind: dict(result)}}
            self.db.finish_round(round_id, state=row.state, merged_sha256=row.merged_sha256,
                                 outcome=row.outcome or b"", record=record, now=self.clock())
            write_record(self.config.data_dir, record)
            if kind == "merged" and self.progress.last_merged.get("sha256") == sha:
                self.progress.last_merged["metrics"] = dict(result)

    async def _fetch_merged(self, state: RoundState, effect: InstallAdapter) -> None:
        """Fetch a round's merged adapter, retrying with backoff: its holders (the coordinator, the
        members that installed it) may be down now and back later, and without it this node can
        neither record the round nor train the next one. Ends when the node stops."""
        delay = DEFAULT_INSTALL_RETRY_SECONDS
        while True:
            holders = [state.coordinator_node_id, *self.holders(effect.sha256),
                       *(a.participant_node_id for a in state.accepted.values())]
            try:
                await self._fetch(effect.sha256, effect.size, holders)
                return
            except (TransportError, trio.TooSlowError) as exc:
                logger.warning("round %s: merged adapter %s not fetched (%s); retrying in %.0f s",
                               state.round_id, effect.sha256[:16], str(exc)[:200], delay)
            await trio.sleep(delay)
            delay = min(2 * delay, DEFAULT_INSTALL_RETRY_MAX_SECONDS)

    def _aggregated(self, state: RoundState, sha: str) -> tuple[Contribution, ...]:
        """The contributions the coordinator's signed AggregateAnnounce names, else our own view."""
        row = self.db.get_round(state.round_id)
        if row is not None and row.outcome:
            announce = codec.decode(row.outcome)
            if isinstance(announce, AggregateAnnounce) and announce.merged_sha256 == sha:
                return announce.contributions
        return state.contributions()

    def _record(self, state: RoundState, outcome: str, sha: str, size: int,
                metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        contributions = self._aggregated(state, sha) if outcome == "published" else state.contributions()
        accepted = [{"node_id": c.node_id, "blob_sha256": c.delta_sha256, "num_samples": c.num_samples}
                    for c in contributions]
        rejected = [{"node_id": r.node_id, "reason": r.reason, "detail": r.detail, "blob_sha256": r.delta_sha256}
                    for r in state.rejections]
        record = round_record(manifest=state.manifest, state=outcome, accepted=accepted, rejected=rejected,
                              merged_sha256=sha, merged_size=size,
                              discarded_energy=self._discarded.get(state.round_id), reason=state.failure_reason,
                              metrics=metrics)
        if state.conflicts:
            record["outcome_conflicts"] = [c.as_dict() for c in state.conflicts]
        record["final_coordinator_node_id"] = state.coordinator_node_id
        record["final_term"] = state.term
        record["recorded_by"] = self.me
        record["finished_at"] = self.clock()
        return record

    def status(self) -> dict[str, Any]:
        current = self.open_round()
        last = self.book.latest()
        shown = current or last
        out: dict[str, Any] = {
            "rounds_completed": self.progress.rounds_completed,
            "rounds_failed": self.progress.rounds_failed,
            "last_merged": self.progress.last_merged,
            "training": self.progress.training,
            "transfer": self.progress.transfer,
            "refused": self.progress.refused,
            "pending_evaluations": self.progress.pending_evaluations,
            "outcome_conflicts": self.progress.outcome_conflicts,
            "unsettled_rounds": sorted(r.round_id for r in self.rounds.values() if self._unsettled(r)),
        }
        if shown is not None:
            now = self.clock()
            out["current_round"] = {
                "round_id": shown.round_id, "round_number": shown.manifest.round_number,
                "state": shown.phase.value, "role": shown.role.value, "term": shown.term,
                "coordinator_node_id": shown.coordinator_node_id, "submissions": len(shown.accepted),
                "min_participants": shown.manifest.min_participants,
                "deadline_in_seconds": max(0.0, shown.deadline - now) if shown.is_open else 0.0,
            }
        else:
            out["current_round"] = None
        return out


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def _finite(x: float) -> float:
    return x if math.isfinite(x) and x >= 0 else 0.0


def _latest_round(adapters: Path) -> int | None:
    """The round number adapters/latest names, if it names an installed round."""
    try:
        name = os.readlink(adapters / "latest")
    except OSError:
        return None
    prefix = "round-"
    if not name.startswith(prefix) or not name[len(prefix):].isdigit() or not (adapters / name).is_dir():
        return None
    return int(name[len(prefix):])


def _point_latest(adapters: Path, round_number: int) -> None:
    """adapters/latest -> round-<n>, replaced atomically; never moved back to an older round (rounds
    can be installed out of order: a merged adapter fetched late, a round resumed after a restart)."""
    current = _latest_round(adapters)
    if current is not None and current > round_number:
        return
    name = f"round-{round_number}"
    tmp = adapters / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, adapters / "latest")
