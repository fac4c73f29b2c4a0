"""Keeps py-libp2p 0.8.1's Yamux read loop from blocking on writes, and each frame written whole
(part of the libp2p adapter).

The bug: Yamux's read loop (`handle_incoming`) answers some frames itself, inline: the ACK of an
inbound SYN, the RST for a frame on an unknown stream, the ACK of a PING. Each answer takes the
connection's write lock, and the lock is held by whichever task is writing, for as long as the
socket takes the bytes. When both ends of a connection send bulk data (every node serves blobs
and fetches blobs), both TCP send buffers can fill; then each end's writer waits for the other
end to read, while each end's reader waits behind its own writer for the lock to send an ACK.
Neither reader reads again: the connection is deadlocked for good (no error, no timeout), and
every stream on it, gossip included, stalls.

A second defect, same place: py-libp2p writes a frame with plain awaits, so a caller cancelled
mid-write (any timeout around opening a stream or sending: ours are everywhere) leaves half a frame
on the wire, or a Noise message encrypted (its nonce used) but never sent. The peer then fails to
decrypt and drops the connection, while ours stays listed: every later stream on it fails or hangs,
for good (issue 13: measured, one cancelled stream open in seven broke 90% of the opens after it on
one connection). Every frame is therefore written whole, shielded from cancellation, within
`frame_write_timeout`, past which the connection is closed.

The fix for the first: frames written by the read loop are queued and sent by a per-connection task, so the
read loop never waits for the socket and the connection keeps draining. The queue holds at most
`max_pending` 12-byte frames; a peer that makes us owe more (opening streams while never reading)
makes the read loop wait for room, as before, without memory growing. Ordering: the queued
answers may go out after data frames of the streams they acknowledge, which Yamux allows (a
stream's data is accepted whether or not its ACK came first; go-yamux and py-libp2p both do).
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

# py-libp2p 0.8.1 reads PY_YAMUX_* tuning from the environment at call time. RELEASE_ON_READ=1 (its
# default) sends a WINDOW_UPDATE after every read that frees credit; "0" keeps go-yamux's policy (an
# update once half the window is consumed). Gossip is many small messages, so "1" wrote one extra
# encrypted frame per message received: 8 idle daemons (2 s heartbeats), idle CPU max 5.6% -> 3.8%
# of a core, round overhead 0.8-1.1 s -> 0.6-0.9 s (scripts/bench_scale.py --sizes 8, A/B in one
# session). An operator's own PY_YAMUX_RELEASE_ON_READ wins.
YAMUX_RELEASE_ON_READ_ENV = "PY_YAMUX_RELEASE_ON_READ"
YAMUX_RELEASE_ON_READ_DEFAULT = "0"


def use_go_yamux_window_updates() -> None:
    """go-yamux's window policy: a WINDOW_UPDATE once half the receive window is consumed."""
    os.environ.setdefault(YAMUX_RELEASE_ON_READ_ENV, YAMUX_RELEASE_ON_READ_DEFAULT)
    if os.environ[YAMUX_RELEASE_ON_READ_ENV] == "0":
        YamuxStream._auto_tune_and_send_window_update = _window_update_at_half  # type: ignore[method-assign]


async def _window_update_at_half(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """py-libp2p 0.8.1's `_auto_tune_and_send_window_update` without its "partial slack" branch,
    which even with RELEASE_ON_READ=0 sent a WINDOW_UPDATE on most reads that left any credit unsent
    (0 < consumed < half the window): one extra encrypted frame per gossip message received. py-spy
    of two members during 32-daemon rounds: 402 of 716 samples in YamuxStream.read were that update.
    Kept: the update once the consumed credit (or the reads not yet released) reaches the threshold,
    with py-libp2p's auto-tuning of the window at each update."""
    total_delta = 0
    async with self.window_lock:
        if bytes_read > 0:
            self._pending_recv_release += bytes_read
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        delta = self.target_recv_window - (self.recv_window + buffered)
        threshold = self._grow_threshold()
        if delta >= threshold and delta > 0:
            total_delta = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        elif self._pending_recv_release >= threshold and self._pending_recv_release > 0:
            total_delta = self._pending_recv_release
            self.recv_window += total_delta
            self._pending_recv_release = 0
            total_delta += self._apply_autotune_epoch(buffered)
    if total_delta > 0:
        await self.send_window_update(total_delta, skip_lock=True)


DEFAULT_MAX_PENDING_CONTROL_FRAMES = 4096  # per connection; 12 bytes each
# A frame, once its first byte is handed to the secure channel, is written whole or the connection
# is closed: this long at most (a peer that reads nothing for this long has a dead link anyway).
DEFAULT_FRAME_WRITE_TIMEOUT = 30.0

logger = logging.getLogger("fednode.transport.libp2p")

_installed = False


class _Replies:
    """Frames the read loop of one connection owes its peer, and the task that sends them."""

    def __init__(self, reader: trio.lowlevel.Task, max_pending: int) -> None:
        self.reader = reader
        self.max_pending = max_pending
        self.frames: collections.deque[bytes] = collections.deque()
        self.sending = False
        self.room = trio.Event()


async def _write_whole_frame(conn: Any, data: bytes, timeout: float) -> None:
    """One frame onto the secure channel, never cut by a cancellation (see the module docstring:
    a frame cut part-way, or a Noise message encrypted but not sent, desynchronises the byte
    stream; the peer then drops the connection while ours stays listed, and every new stream on
    it fails or hangs). Waiting for the write lock stays cancellable: nothing is written yet."""
    async with conn._write_lock:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + timeout
            await conn.secured_conn.write(data)
        if scope.cancelled_caught:
            logger.info("yamux: a frame to %s took over %.0f s to write; closing the connection", conn.peer_id,
                        timeout)
            with trio.CancelScope(shield=True) as closing:
                closing.deadline = trio.current_time() + 2.0
                try:
                    await conn.secured_conn.close()
                except Exception as exc:
                    logger.debug("yamux: closing the connection to %s: %r", conn.peer_id, exc)
            raise ConnectionClosedError(f"frame write to {conn.peer_id} timed out after {timeout:g} s")
    await trio.lowlevel.checkpoint()


def install_yamux_nonblocking_reader(max_pending: int = DEFAULT_MAX_PENDING_CONTROL_FRAMES,
                                     frame_write_timeout: float = DEFAULT_FRAME_WRITE_TIMEOUT) -> None:
    """Patches `Yamux` (process-wide, idempotent); call before connections are made."""
    global _installed
    if _installed:
        return
    _installed = True
    original_handle_incoming = Yamux.handle_incoming

    async def original_write_frame(self: Any, data: bytes) -> None:
        await _write_whole_frame(self, data, frame_write_timeout)

    async def handle_incoming(self: Any) -> None:
        self._fednode_replies = _Replies(trio.lowlevel.current_task(), max_pending)
        await original_handle_incoming(self)

    async def send_replies(self: Any, replies: _Replies) -> None:
        try:
            while replies.frames:
                frame = replies.frames.popleft()
                replies.room.set()
                await original_write_frame(self, frame)
        except Exception as exc:  # the connection is going away; the read loop will see it
            logger.debug("yamux: cannot send a control frame to %s: %r", self.peer_id, exc)
            replies.frames.clear()
            replies.room.set()
        finally:
            replies.sending = False

    async def write_frame(self: Any, data: bytes) -> None:
        replies: _Replies | None = getattr(self, "_fednode_replies", None)
        nursery = getattr(self, "_nursery", None)
        if replies is None or nursery is None or trio.lowlevel.current_task() is not replies.reader:
            await original_write_frame(self, data)
            return
        while len(replies.frames) >= replies.max_pending:
            replies.room = trio.Event()
            await replies.room.wait()
        replies.frames.append(data)
        if not replies.sending:
            try:
                nursery.start_soon(send_replies, self, replies)
            except RuntimeError:  # the connection's nursery is closing: write it here, as before
                replies.frames.pop()
                await original_write_frame(self, data)
                return
            replies.sending = True
        await trio.lowlevel.checkpoint()

    Yamux.handle_incoming = handle_incoming  # type: ignore[method-assign]
    Yamux._write_frame = write_frame  # type: ignore[method-assign]
