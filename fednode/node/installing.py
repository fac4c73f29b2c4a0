"""A round's end: publish or fail, install the merged adapter, evaluate it, and build the round record
(the one place records are built)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import trio

from fednode.consensus import InstallAdapter, Role, RoundState
from fednode.errors import DiskFull, TransportError
from fednode.node.blobio import BlobIO
from fednode.node.records import round_record, write_record
from fednode.node.reports import RecordState, RoundRecord
from fednode.node.retention import collect_old_rounds, collected_published
from fednode.wire import codec
from fednode.wire.messages import AggregateAnnounce, Contribution, RoundFailed

logger = logging.getLogger("fednode.rounds")  # one logger for the round driver's modules (fault_check reads it)

DEFAULT_INSTALL_RETRY_SECONDS = 1.0  # first wait before fetching a merged adapter again
DEFAULT_INSTALL_RETRY_MAX_SECONDS = 30.0  # the wait doubles up to this

class Installing(BlobIO):
    async def _publish_aggregate(self, state: RoundState) -> AggregateAnnounce:
        announce = codec.sign(AggregateAnnounce(
            community_id=state.manifest.community_id, round_id=state.round_id,
            round_number=state.manifest.round_number, coordinator_node_id=self.me, term=state.term,
            merged_sha256=state.merged_sha256, merged_size=state.merged_size, aggregation=state.manifest.aggregation,
            contributions=state.contributions(), announced_at=self.clock()), self.identity)
        self._save_outcome(state.round_id, codec.encode(announce))
        await self.publish(announce)
        return announce

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
            logger.info("round %s installed: merged %s", state.round_id, effect.sha256[:16])
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
        row = self.db.get_round(state.round_id)
        if row is not None and row.outcome:
            announce = codec.decode(row.outcome)
            if isinstance(announce, AggregateAnnounce) and announce.merged_sha256 == sha:
                return announce.contributions
        return state.contributions()

    def _record(self, state: RoundState, outcome: RecordState, sha: str, size: int,
                metrics: dict[str, dict[str, Any]] | None = None) -> RoundRecord:
        published = outcome is RecordState.PUBLISHED
        return round_record(manifest=state.manifest, state=outcome,
                            accepted=self._aggregated(state, sha) if published else state.contributions(),
                            rejected=state.rejections, merged_sha256=sha, merged_size=size,
                            discarded_energy=self.job(state.round_id).discarded_energy, reason=state.failure_reason,
                            metrics=metrics, conflicts=state.conflicts,
                            final_coordinator_node_id=state.coordinator_node_id, final_term=state.term,
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
