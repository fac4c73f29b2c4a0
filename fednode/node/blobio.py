"""Blobs a round needs: read verified, fetched once from the holders when missing or corrupt."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from fednode.blobs.fetch import fetch_blob
from fednode.errors import BlobIntegrityError, BlobMissing, DiskFull, TransferError, TransportError, is_disk_full
from fednode.node.driver_base import DriverBase

if TYPE_CHECKING:
    pass

logger = logging.getLogger("fednode.rounds")  # one logger for the round driver's modules (fault_check reads it)

MAX_BLOB_REFETCHES = 2  # a blob found corrupt on our disk is quarantined and fetched again this often

class BlobIO(DriverBase):
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
            except BlobMissing:  # removed between has() and the read: fetch it
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
                result = await fetch_blob(self.transport, sha, peers, self.store, expected_size=size,
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
        fetched = result.size  # not store.size(): the file may be gone already (_read_blob fetches it again)
        self.progress.bytes_fetched += fetched
        self.progress.transfer.update(done=fetched, state="verified")


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
