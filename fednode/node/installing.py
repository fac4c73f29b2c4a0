"""A round's end: publish or fail, install the merged adapter, evaluate it, and build the round record
(the one place records are built)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from fednode.config import Config
from fednode.consensus import InstallAdapter, Role, RoundState
from fednode.consensus.merged_recovery import MergedRecovery, RebuildProblem, RecoveryStep
from fednode.errors import BlobIntegrityError, DiskFull, FednodeError, TransportError
from fednode.node.blobio import BlobIO
from fednode.node.records import round_record, write_record
from fednode.node.reports import RecordState, RoundRecord
from fednode.node.retention import collect_old_rounds, collected_published
from fednode.wire import codec
from fednode.wire.messages import AggregateAnnounce, Contribution, Message, RoundFailed

if TYPE_CHECKING:
    from fednode.aggregation import AggregationOptions

logger = logging.getLogger("fednode.rounds")  # one logger for the round driver's modules (fault_check reads it)

DEFAULT_INSTALL_RETRY_SECONDS = 1.0  # first wait before fetching a merged adapter again
DEFAULT_INSTALL_RETRY_MAX_SECONDS = 30.0  # the wait doubles up to this


def aggregation_options(config: Config) -> AggregationOptions:
    """The [aggregation] section as the aggregation layer's options. With DP noise on, every
    update is clipped to dp_clip_norm (the noise is calibrated to that bound)."""
    a = config.aggregation
    from fednode.aggregation import AggregationOptions

    dp = a.dp_noise_multiplier > 0
    return AggregationOptions(trim_beta=a.trim_beta, clip_norm=a.dp_clip_norm if dp else (a.clip_norm or None),
                              dp_noise_multiplier=a.dp_noise_multiplier, exact_max_batch_bytes=a.exact_max_batch_bytes)


class Installing(BlobIO):
    async def _merge(self, state: RoundState, method: str, datas: Sequence[bytes],
                     weights: Sequence[float]) -> tuple[bytes, float | None]:
        """The round's merge of `datas` (in contribution order: node id), off the event loop. The
        coordinator aggregates with it; a node rebuilding a lost merged adapter calls it again."""
        from fednode.node.fake_task import FakeTrainer, merge_updates  # fake task + fedavg: numpy, no torch

        config, fake = self.config, isinstance(self.trainer, FakeTrainer)
        manifest = state.manifest

        def work() -> tuple[bytes, float | None]:
            return merge_updates(datas, weights, method, rank=manifest.lora_rank, alpha=manifest.lora_alpha,
                                 options=lambda: aggregation_options(config), fake=fake)

        return await self.blocking(work)

    async def _publish_aggregate(self, state: RoundState) -> AggregateAnnounce:
        announce = codec.sign(AggregateAnnounce(
            community_id=state.manifest.community_id, round_id=state.round_id,
            round_number=state.manifest.round_number, coordinator_node_id=self.me, term=state.term,
            merged_sha256=state.merged_sha256, merged_size=state.merged_size, aggregation=state.manifest.aggregation,
            contributions=state.contributions(), announced_at=self.clock()), self.identity)
        self._save_outcome(state.round_id, codec.encode(announce))
        await self._publish_saved_outcome(announce)
        return announce

    async def _on_published(self, state: RoundState, announce: AggregateAnnounce) -> None:
        signed = codec.sign(announce, self.identity)
        self._save_outcome(state.round_id, codec.encode(signed))
        logger.info("round %s: publishing merged adapter %s, %.1f s after the manifest", state.round_id,
                    announce.merged_sha256[:16], self.clock() - state.manifest.created_at)
        await self._publish_saved_outcome(signed)
        await self._install(InstallAdapter(state.round_id, announce.merged_sha256, announce.merged_size))

    async def _on_failed(self, state: RoundState, failure: RoundFailed) -> None:
        signed = codec.sign(failure, self.identity)
        self._save_outcome(state.round_id, codec.encode(signed))
        await self._publish_saved_outcome(signed)
        self._finish_failed(state)

    async def _publish_saved_outcome(self, signed: Message) -> None:
        """Gossip an outcome already saved. A publish that fails does not stop the round: we still
        install or record it, so our heartbeats name it as finished and the members fetch the outcome
        by sync (sync-v1). Skipping that left the round unfinished everywhere, for good."""
        try:
            await self.publish(signed)
        except FednodeError as exc:
            logger.warning("round %s: publishing the outcome failed (%s); members will sync it from us",
                           getattr(signed, "round_id", "?"), exc)

    def _finish_failed(self, state: RoundState) -> None:
        record = self._record(state, RecordState.FAILED, "", 0)
        row = self.db.get_round(state.round_id)
        try:
            self.db.finish_round(state.round_id, state="failed", merged_sha256="", outcome=(row.outcome or b"")
                                 if row else b"", record=record.to_json(), now=self.clock())
            write_record(self.config.data_dir, record)
        except (DiskFull, OSError) as exc:
            if not self.disk.note(exc, f"recording failed round {state.round_id}"):
                raise
            return  # resume_after_disk_full records it
        self.progress.rounds_failed += 1

    async def _install(self, effect: InstallAdapter) -> None:
        state, job = self.rounds.get(effect.round_id), self.job(effect.round_id)
        if state is None or job.installing:
            return
        job.installing = True
        try:
            merged = await self._read_blob(effect.sha256, lambda: self._fetch_merged(state, effect))
            number = state.manifest.round_number
            target = self.adapter_dir(number)
            if self.trainer is not None:
                trainer = self.trainer

                def work() -> None:
                    trainer.install(merged, target, lora_rank=state.manifest.lora_rank,
                                    lora_alpha=state.manifest.lora_alpha)

                await self.blocking(work)
            _point_latest(self.config.data_dir / "adapters", number)
            metrics = dict(job.metrics)
            own = self.db.get_own_update(number, state.manifest.start_adapter_sha256)
            if own is not None:
                metrics["train"] = {k[len("train_"):]: v for k, v in own.metrics.items() if k.startswith("train_")}
            record = self._record(state, RecordState.PUBLISHED, effect.sha256, effect.size, metrics)
            row = self.db.get_round(state.round_id)
            self.db.finish_round(state.round_id, state="published", merged_sha256=effect.sha256,
                                 outcome=(row.outcome or b"") if row else b"", record=record.to_json(),
                                 now=self.clock())
            write_record(self.config.data_dir, record)
            collect_old_rounds(data_dir=self.config.data_dir, db=self.db, store=self.store,
                               keep_rounds=self.config.node.keep_rounds, driver=self)  # bounded disk/memory
            self.progress.rounds_completed = self._count_installed()
            if number >= self.progress.last_merged.get("round_number", 0):  # an older round installed late
                self.progress.last_merged = {"round_number": number, "sha256": effect.sha256, "path": str(target),
                                             "metrics": metrics.get("merged", {})}
            logger.info("round %s installed: merged %s, %.1f s after the manifest", state.round_id,
                        effect.sha256[:16], self.clock() - state.manifest.created_at)
        finally:
            job.installing = False
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
                result = await self.blocking(lambda: trainer.evaluate(data))
        finally:
            self.progress.pending_evaluations -= 1
        self.job(round_id).metrics[kind] = dict(result)
        row = self.db.get_round(round_id)
        if row is not None and row.record:  # already recorded: add the figures to it
            record = RoundRecord.from_json(row.record).with_metrics(kind, result)
            self.db.finish_round(round_id, state=row.state, merged_sha256=row.merged_sha256,
                                 outcome=row.outcome or b"", record=record.to_json(), now=self.clock())
            write_record(self.config.data_dir, record)
            if kind == "merged" and self.progress.last_merged.get("sha256") == sha:
                self.progress.last_merged["metrics"] = dict(result)

    async def _fetch_merged(self, state: RoundState, effect: InstallAdapter) -> None:
        """Get a round's merged adapter, retrying with backoff: its holders (the coordinator, the
        members that installed it) may be down now and back later, and without it this node can
        neither record the round nor train the next one. When no holder serves it (the only copy
        lost with its coordinator), rebuild it from the contributed updates, kept only if it hashes
        to the announced sha256 (round-v1, "A merged adapter no holder has";
        fednode/consensus/merged_recovery.py decides when). Ends when the blob is here, or when the node stops."""
        recovery = MergedRecovery(retry_seconds=DEFAULT_INSTALL_RETRY_SECONDS,
                                  retry_max_seconds=DEFAULT_INSTALL_RETRY_MAX_SECONDS)
        known_only = True  # first ask only those known to hold it; the round's participants on a retry
        try:
            while True:
                if recovery.next_step() is RecoveryStep.REBUILD:
                    if await self._rebuild_merged(state, effect, recovery):
                        return
                    delay = recovery.delay
                else:
                    # The participants are asked only once the coordinator and the members whose
                    # heartbeat names the adapter have failed us: right after the publish few of them
                    # hold it yet, and asking them made each fetch up to max_sources streams, mostly
                    # answered not_found (at 32 daemons ~7 wasted streams per member per round).
                    holders = [state.coordinator_node_id, *self.holders(effect.sha256)]
                    if not known_only:
                        holders += [a.participant_node_id for a in state.accepted.values()]
                    known_only = False
                    try:
                        await self._fetch(effect.sha256, effect.size, holders)
                        return
                    except (TransportError, trio.TooSlowError) as exc:
                        delay = recovery.fetch_failed(str(exc)[:200])
                        logger.warning("round %s: merged adapter %s not fetched (%s); retrying in %.0f s",
                                       state.round_id, effect.sha256[:16], str(exc)[:200], delay)
                self.progress.merged_recovery[state.round_id] = recovery.last_problem
                await trio.sleep(delay)
        finally:
            self.progress.merged_recovery.pop(state.round_id, None)

    async def _rebuild_merged(self, state: RoundState, effect: InstallAdapter, recovery: MergedRecovery) -> bool:
        """Merge the announced contributions again; store the result only if it is the announced
        blob. False (counted, logged, `recovery` told why) when it cannot be done now."""
        announce = self._announce_of(state, effect.sha256)
        contributions = announce.contributions if announce is not None else state.contributions()
        method = announce.aggregation if announce is not None else state.manifest.aggregation

        def failed(problem: RebuildProblem, detail: str) -> bool:
            recovery.rebuild_failed(problem, detail)
            self.progress.merged_rebuild_failed[problem.value] = \
                self.progress.merged_rebuild_failed.get(problem.value, 0) + 1
            logger.warning("round %s: merged adapter %s not rebuilt: %s", state.round_id, effect.sha256[:16],
                           recovery.last_problem)
            return False

        if not contributions:
            return failed(RebuildProblem.NO_CONTRIBUTIONS, "no signed AggregateAnnounce naming the updates")
        logger.info("round %s: no holder served merged adapter %s; rebuilding it from %d updates",
                    state.round_id, effect.sha256[:16], len(contributions))
        datas: list[bytes] = []
        for c in contributions:
            try:
                datas.append(await self._read_blob(c.delta_sha256, self._update_fetcher(state, c)))
            except (TransportError, BlobIntegrityError, trio.TooSlowError) as exc:
                return failed(RebuildProblem.MISSING_UPDATE, f"{c.node_id[-8:]}'s update {c.delta_sha256[:16]}: "
                                                             f"{exc}"[:200])
        try:
            merged, _ = await self._merge(state, method, datas, [float(c.num_samples) for c in contributions])
        except FednodeError as exc:
            return failed(RebuildProblem.MERGE_FAILED, str(exc)[:200])
        if not recovery.rebuilt(effect.sha256, hashlib.sha256(merged).hexdigest()):
            self.progress.merged_rebuild_failed[RebuildProblem.DIGEST_MISMATCH.value] = \
                self.progress.merged_rebuild_failed.get(RebuildProblem.DIGEST_MISMATCH.value, 0) + 1
            logger.error("round %s: %s", state.round_id, recovery.last_problem)
            return False
        self.store.put_bytes(merged)  # content-addressed: exactly the announced blob
        self.progress.merged_rebuilt += 1
        logger.info("round %s: merged adapter %s rebuilt from the updates", state.round_id, effect.sha256[:16])
        return True

    def _update_fetcher(self, state: RoundState, c: Contribution) -> Callable[[], Awaitable[None]]:
        """Fetch a contributed update from its submitter, the coordinator, or anyone said to hold it."""
        holders = [c.node_id, state.coordinator_node_id, *self.holders(c.delta_sha256)]
        return lambda: self._fetch(c.delta_sha256, None, holders)

    def _announce_of(self, state: RoundState, sha: str) -> AggregateAnnounce | None:
        """The signed AggregateAnnounce we hold for the round naming `sha`, if any: saved in
        state.sqlite, or kept in memory because the disk was full when it came (`unsaved_outcome`).
        Missing the second, a node whose disk filled at that moment recorded its own view of the
        contributions (fault seed 1356839167 s22, s28: accepted_differs on the disk-full node)."""
        row = self.db.get_round(state.round_id)
        job = self.jobs.get(state.round_id)
        for data in (row.outcome if row is not None else None, job.unsaved_outcome if job is not None else None):
            if data:
                announce = self.decode_stored(data)
                if isinstance(announce, AggregateAnnounce) and announce.merged_sha256 == sha:
                    return announce
        return None

    def _count_installed(self) -> int:
        return self.db.round_counts().installed + collected_published(self.db)  # retention's count too

    def _on_conflict(self, state: RoundState, new: int) -> None:
        """Two different signed outcomes for one round: count it, log it loudly, and put it in the
        round's record if that is written already (else it goes in when it is)."""
        self.progress.outcome_conflicts += new
        logger.error("round %s: conflicting outcomes %s", state.round_id, [c.as_dict() for c in state.conflicts])
        row = self.db.get_round(state.round_id)
        if row is not None and row.record and not self.job(state.round_id).installing:
            record = RoundRecord.from_json(row.record).with_conflicts(state.conflicts)
            self.db.finish_round(state.round_id, state=row.state, merged_sha256=row.merged_sha256,
                                 outcome=row.outcome or b"", record=record.to_json(), now=self.clock())
            write_record(self.config.data_dir, record)

    def _aggregated(self, state: RoundState, sha: str) -> tuple[Contribution, ...]:
        """The contributions the coordinator's signed AggregateAnnounce names, else our own view."""
        announce = self._announce_of(state, sha)
        return announce.contributions if announce is not None else state.contributions()

    def _record(self, state: RoundState, outcome: RecordState, sha: str, size: int,
                metrics: dict[str, dict[str, Any]] | None = None) -> RoundRecord:
        published = outcome is RecordState.PUBLISHED
        # who concluded the round: the signer of the outcome we hold (an earlier coordinator's,
        # adopted after a takeover), else the round's coordinator as we follow it
        signed = state.outcome
        final, term = (signed.coordinator_node_id, signed.term) if signed is not None else \
            (state.coordinator_node_id, state.term)
        return round_record(manifest=state.manifest, state=outcome,
                            accepted=self._aggregated(state, sha) if published else state.contributions(),
                            rejected=state.rejections, merged_sha256=sha, merged_size=size,
                            discarded_energy=self.job(state.round_id).discarded_energy, reason=state.failure_reason,
                            metrics=metrics, conflicts=state.conflicts,
                            final_coordinator_node_id=final, final_term=term,
                            recorded_by=self.me, finished_at=self.clock())


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
