"""A participant's part of a round: train in a worker thread, submit, and keep the submitted update servable."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import trio

from fednode.consensus import Phase
from fednode.errors import BlobIntegrityError, TransportError, is_disk_full
from fednode.node.installing import DEFAULT_INSTALL_RETRY_MAX_SECONDS, DEFAULT_INSTALL_RETRY_SECONDS, Installing
from fednode.state import OwnUpdate
from fednode.wire import codec
from fednode.wire.messages import RoundManifest, SubmissionAnnounce

if TYPE_CHECKING:
    pass

logger = logging.getLogger("fednode.rounds")  # one logger for the round driver's modules (fault_check reads it)



class Training(Installing):
    def _on_quarantined(self, sha: str) -> None:
        for state in list(self.rounds.values()):
            own = state.own_submission
            if own is not None and own.delta_sha256 == sha and state.phase not in (Phase.PUBLISHED, Phase.FAILED):
                logger.warning("round %s: our update %s was corrupt on disk (quarantined); restoring it",
                               state.round_id, sha[:16])
                self._spawn(self._recover_own_update, state.manifest, own)

    async def _train_and_submit(self, manifest: RoundManifest) -> None:
        if self.trainer is None:
            return
        if self.disk.paused:  # resume_after_disk_full trains for it if the round is still open
            self.job(manifest.round_id).deferred_training = True
            return
        try:
            await self._train_and_submit_now(manifest)
        except Exception as exc:
            if is_disk_full(exc):
                self.job(manifest.round_id).deferred_training = True
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
            logger.info("round %s: submitted update %s (%d samples), %.1f s after the manifest", manifest.round_id,
                        update.delta_sha256[:16], update.num_samples, self.clock() - manifest.created_at)
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
        out = await self.blocking(work, abandon=True)
        sha = self.store.put_bytes(out.delta_bytes)
        metrics = {f"train_{k}": v for k, v in out.metrics.items()}
        update = OwnUpdate(manifest.round_number, manifest.start_adapter_sha256, sha, out.num_samples,
                           float(out.metrics.get("loss", 0.0)), metrics)
        self.db.put_own_update(update)
        self.progress.training.update(state="submitted", metrics=metrics)
        return update

    async def _start_adapter(self, manifest: RoundManifest) -> bytes | None:
        """The round's start adapter (the last merged one), fetched if we lack it, and fetched again
        with backoff while the round is open: a fetch that fails once must not leave the round without
        our update. At 32 daemons on 2 cores every holder of a just-published merged adapter was
        unreachable for 8 s once (its coordinator too busy to open a stream); the member gave up
        training for that round, and the round, which waited for every member, never closed (issue 12).
        Meanwhile the install of the same adapter, retried, may already have brought it."""
        sha = manifest.start_adapter_sha256
        if not sha:
            return None
        delay = DEFAULT_INSTALL_RETRY_SECONDS
        while True:
            try:
                return await self._read_blob(sha, lambda: self._fetch(
                    sha, manifest.start_adapter_size, [manifest.coordinator_node_id, *self.holders(sha)]))
            except (TransportError, trio.TooSlowError) as exc:
                state = self.rounds.get(manifest.round_id)
                if state is None or not state.is_open:
                    raise
                logger.warning("round %s: start adapter %s not fetched (%s); retrying in %.0f s",
                               manifest.round_id, sha[:16], str(exc)[:200], delay)
            await trio.sleep(delay)
            delay = min(2 * delay, DEFAULT_INSTALL_RETRY_MAX_SECONDS)


def _finite(x: float) -> float:
    return x if math.isfinite(x) and x >= 0 else 0.0
