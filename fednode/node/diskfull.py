"""A full disk is a state the node waits out, not a crash.

When a write fails because the disk (or the user's quota) is full (ENOSPC / EDQUOT, or sqlite's
SQLITE_FULL), the node *pauses participation*: it keeps heartbeating, following the election and
tracking rounds in memory, but trains, submits, aggregates, installs and opens nothing new. Its
heartbeats say `paused` (round-v1 r4), so a coordinator does not wait for its update; for the
election it stays a live member and a candidate like any other (a pause must never change who is
elected: election-v1 r3).
`fednode status` shows `paused` (why and since when) and `disk_full_events`; Prometheus counts
the pauses (`fednode_disk_full_pauses_total`). Every DISK_FULL_RETRY_SECONDS the node tries a
probe: a committed state.sqlite write and a DISK_PROBE_BYTES file written, fsynced and removed
next to the blobs. When both succeed it resumes: it saves what it could not save, and re-issues
the work the full disk stopped (training for open rounds, aggregation, installing merged adapters).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from fednode.errors import DiskFull, is_disk_full
from fednode.node.reports import PauseStatus

logger = logging.getLogger("fednode.disk")

DISK_FULL_RETRY_SECONDS = 10.0  # while paused, try the probe writes this often
DISK_PROBE_BYTES = 256 * 1024  # the probe needs at least this much free space to succeed


@dataclass
class DiskPause:
    """Whether the node is paused for a full disk, and how often it was (one per node)."""

    clock: Callable[[], float]
    paused_since: float | None = None
    detail: str = ""
    events: int = 0  # times the node paused for a full disk (a Prometheus counter)
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def note(self, exc: BaseException, where: str) -> bool:
        """Record a failed write. True if `exc` was a full disk (the node is now paused); False if
        it was some other error, which the caller handles as before."""
        if not is_disk_full(exc):
            return False
        if self.paused_since is None:
            self.paused_since = self.clock()
            self.events += 1
            logger.error("disk full (%s: %s): pausing participation; retrying every %.0f s",
                         where, str(exc)[:200], DISK_FULL_RETRY_SECONDS)
            self._changed.set()
        self.detail = f"{where}: {exc}"[:300]
        return True

    def resume(self) -> None:
        if self.paused_since is not None:
            logger.warning("disk has space again after %.0f s: resuming", self.clock() - self.paused_since)
        self.paused_since, self.detail = None, ""

    async def wait_paused(self) -> None:
        while self.paused_since is None:
            self._changed = trio.Event()
            await self._changed.wait()

    def status(self) -> PauseStatus | None:
        """The `paused` field of `fednode status`: None while the node participates."""
        if self.paused_since is None:
            return None
        return PauseStatus(reason="disk_full", detail=self.detail, since=self.paused_since,
                           seconds=round(self.clock() - self.paused_since, 3),
                           retry_every_seconds=DISK_FULL_RETRY_SECONDS)


def probe_free_space(folder: Path, size: int = DISK_PROBE_BYTES) -> None:
    """Write, fsync and remove `size` bytes in `folder`; DiskFull while there is not room for them."""
    path = folder / f".disk-probe-{secrets.token_hex(6)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            block = memoryview(b"\0" * size)
            while block:  # a nearly full disk takes part of a write before it raises ENOSPC
                block = block[os.write(fd, block):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(f"{folder}: {exc}") from exc
        raise
    finally:
        path.unlink(missing_ok=True)


async def watch_disk(pause: DiskPause, probe: Callable[[], None], on_resume: Callable[[], None],
                     interval: float = DISK_FULL_RETRY_SECONDS) -> None:
    """While paused: every `interval`, run `probe` (small blocking writes; on trio's thread, which
    owns the state.sqlite connection); when it succeeds, resume."""
    while True:
        await pause.wait_paused()
        await trio.sleep(interval)
        try:
            probe()
        except Exception as exc:
            if not pause.note(exc, "probe"):
                logger.warning("disk probe failed: %s", exc)
            continue
        pause.resume()
        on_resume()
