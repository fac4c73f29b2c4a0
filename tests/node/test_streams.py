"""The daemon's stream services: `/fednode/sync/1.0.0` (answers, bad requests, the membership
gate), how the daemon wires the blob server from its config, and that no misbehaving client of
sync, blob or the fast lane can take a node down (each is counted by reason)."""

from __future__ import annotations

import contextlib
import struct
from contextlib import AsyncExitStack
from pathlib import Path

import msgpack
import pytest
import trio

from fednode.blobs.fetch import fetch_blob
from fednode.blobs.lane import connect_lane
from fednode.blobs.manifest import BlobManifest
from fednode.blobs.protocol import GET_CHUNKS, GET_MANIFEST, LANE, OPEN_LANE, PROTOCOL_ID, StreamChannel
from fednode.blobs.serve import ServeLimits
from fednode.blobs.store import BlobStore
from fednode.errors import PeerUnavailable, RemoteProtocolError, TransferError
from fednode.node.sync import (
    DEFAULT_SYNC_TIMEOUT_SECONDS,
    MAX_SYNC_MESSAGES,
    SYNC_PROTOCOL_ID,
    request_sync,
    serve_sync,
)
from fednode.transport.memory import MemoryNetwork, MemoryTransport, open_memory_transport
from tests.blobs.conftest import CHUNK, blob, memory_nodes
from tests.node.conftest import cluster, seed_identity

MESSAGES = {"round-1": [b"manifest bytes", b"aggregate bytes"]}


async def test_sync_serves_members_and_refuses_others_unread() -> None:
    network = MemoryNetwork(auto_link_degree=0)
    async with AsyncExitStack() as stack:
        server_t, member, outsider = [await stack.enter_async_context(open_memory_transport(network, name))
                                      for name in ("server", "member", "outsider")]
        lookups: list[str] = []

        def lookup(round_id: str) -> list[bytes]:
            lookups.append(round_id)
            return MESSAGES.get(round_id, [])

        server = serve_sync(server_t, lookup, allow_peer={"server", "member"}.__contains__)
        assert await request_sync(member, "server", "round-1") == MESSAGES["round-1"]
        assert await request_sync(member, "server", "round-9") == []
        with pytest.raises(RemoteProtocolError):
            await request_sync(outsider, "server", "round-1")
        assert lookups == ["round-1", "round-9"]  # the outsider's request was never read
        stats = server.statistics()
        assert stats.served == 2 and stats.refused_by_reason == {"not_member": 1}
        # a malformed request from a member is counted, not served
        stream = await member.open_stream("server", SYNC_PROTOCOL_ID)
        await stream.send_all(b"\x00\x00\x00\x03abc")
        await stream.send_eof()
        assert await stream.receive_some() == b""
        await stream.aclose()
        assert server.statistics().refused_by_reason == {"not_member": 1, "bad_request": 1}


async def test_sync_without_an_allowlist_serves_anyone() -> None:
    network = MemoryNetwork(auto_link_degree=0)
    async with AsyncExitStack() as stack:
        server_t, anyone = [await stack.enter_async_context(open_memory_transport(network, name))
                            for name in ("server", "anyone")]
        server = serve_sync(server_t, lambda r: MESSAGES.get(r, []))
        assert await request_sync(anyone, "server", "round-1") == MESSAGES["round-1"]
        assert server.statistics().refused_by_reason == {}


async def test_daemon_wires_blob_timeouts_and_the_allowlist_into_its_stream_servers(
        tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    member, outsider = seed_identity(0).node_id, seed_identity(5).node_id
    async with cluster(tmp_path) as c:
        closed = await c.start(0, 1, community={"members": [member]},
                               blobs={"send_timeout_seconds": 3.5, "idle_timeout_seconds": 7.0})
        assert (closed.blob_server.limits.send_timeout, closed.blob_server.limits.idle_timeout) == (3.5, 7.0)
        assert closed._stream_allowed(member) and not closed._stream_allowed(outsider)
        open_ = await c.start(1, 2)
        assert (open_.blob_server.limits.send_timeout, open_.blob_server.limits.idle_timeout) == (20.0, 60.0)
        assert open_._stream_allowed(outsider)  # an open community serves anyone


async def _send_and_close(transport: MemoryTransport, protocol: str, data: bytes, *, read: bool = False) -> None:
    stream = await transport.open_stream("server", protocol)
    with contextlib.suppress(PeerUnavailable, trio.ClosedResourceError):
        await stream.send_all(data)
        if read:
            while await stream.receive_some():
                pass
    await stream.aclose()


async def test_misbehaving_sync_askers_are_counted_and_contained(autojump_clock: trio.abc.Clock) -> None:
    """Early close, garbage, a stall, an oversize frame and a failing lookup each cost one stream,
    are counted by reason, and never reach the transport. Before: a stall and an early close were
    not counted, an oversize frame was a `bad_request`, and a lookup that raised escaped into the
    transport's safety net (a traceback at ERROR)."""
    network = MemoryNetwork(auto_link_degree=0)
    big = [bytes(60 * 1024)] * MAX_SYNC_MESSAGES  # more than a stream buffer: the answer must wait on us
    async with AsyncExitStack() as stack:
        server_t, asker = [await stack.enter_async_context(open_memory_transport(network, name))
                           for name in ("server", "asker")]

        def lookup(round_id: str) -> list[bytes]:
            if round_id == "boom":
                raise RuntimeError("a bug in lookup")
            return big

        server = serve_sync(server_t, lookup)
        request = _frame_of({"round_id": "round-1"})
        await _send_and_close(asker, SYNC_PROTOCOL_ID, request)  # asks, then leaves before the answer
        await _send_and_close(asker, SYNC_PROTOCOL_ID, b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")  # not msgpack
        await _send_and_close(asker, SYNC_PROTOCOL_ID, b"\xff\xff\xff\xff" + bytes(4096))  # 4 GiB announced
        await _send_and_close(asker, SYNC_PROTOCOL_ID, _frame_of({"round_id": "boom"}), read=True)
        stalled = await asker.open_stream("server", SYNC_PROTOCOL_ID)
        await stalled.send_all(b"\x00\x00")  # half a header, then nothing
        with trio.fail_after(DEFAULT_SYNC_TIMEOUT_SECONDS * 3):
            while server.statistics().failed_by_reason.get("timeout", 0) < 1 or \
                    server.statistics().failed_by_reason.get("peer_gone", 0) < 1:
                await trio.sleep(0.1)
        await stalled.aclose()
        assert await request_sync(asker, "server", "round-1") == big  # still serving
        stats = server.statistics()
        assert stats.refused_by_reason == {"bad_request": 1, "too_large": 1}
        assert stats.failed_by_reason == {"peer_gone": 1, "timeout": 1, "internal_error": 1}
        assert server_t.statistics().streams_failed == {}  # nothing reached the transport's safety net


async def test_misbehaving_blob_clients_are_counted_and_contained(tmp_path: Path) -> None:
    """Garbage, an oversize header, bad requests, a stall before the first request, a reader that
    leaves mid-transfer and a failing disk each cost one stream, counted by reason; fetching still
    works. Before: bad requests, stalls and a failing disk were not counted (the last escaped to
    the transport as an ExceptionGroup)."""
    data, sha = blob(40)
    limits = ServeLimits(idle_timeout=0.5, send_timeout=2.0)

    class FailingDisk(BlobStore):
        fail = False

        def read_chunk(self, manifest: BlobManifest, index: int) -> bytes:
            if self.fail:
                raise PermissionError(13, "Permission denied", str(self.path(manifest.sha256)))
            return super().read_chunk(manifest, index)

    disk = FailingDisk(tmp_path / "server", chunk_size=CHUNK)
    async with memory_nodes(tmp_path, ["server", "rude", "me"], limits=limits, stores={"server": disk}) as (_, n):
        disk.put_bytes(data)
        rude = n["rude"].transport
        header = msgpack.packb({"t": GET_CHUNKS, "sha256": sha, "idx": list(range(40))})
        await _send_and_close(rude, PROTOCOL_ID, struct.pack(">I", len(header)) + header)  # leaves at once
        await _send_and_close(rude, PROTOCOL_ID, b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1", read=True)  # garbage
        await _send_and_close(rude, PROTOCOL_ID, b"\x7f\xff\xff\xff" + bytes(1024), read=True)  # oversize header
        for bad in ({"t": GET_CHUNKS, "sha256": sha, "idx": list(range(100))}, {"t": "nonsense"},
                    {"t": GET_MANIFEST, "sha256": "zz"}):
            packed = msgpack.packb(bad)
            await _send_and_close(rude, PROTOCOL_ID, struct.pack(">I", len(packed)) + packed, read=True)
        idle = await rude.open_stream("server", PROTOCOL_ID)  # never sends a request
        with trio.fail_after(30):
            while n["server"].server.statistics().aborted_by_reason.get("idle_timeout", 0) < 1 or \
                    n["server"].server.statistics().aborted_by_reason.get("peer_gone", 0) < 1:
                await trio.sleep(0.05)
        await idle.aclose()
        disk.fail = True
        with pytest.raises(TransferError):
            await fetch_blob(n["me"].transport, sha, ["server"], n["me"].store)
        disk.fail = False
        await fetch_blob(n["me"].transport, sha, ["server"], n["me"].store)
        assert n["me"].store.read(sha) == data
        aborted = n["server"].server.statistics().aborted_by_reason
        assert aborted["protocol_error"] == 2 and aborted["bad_request"] == 3
        assert aborted["peer_gone"] == 1 and aborted["idle_timeout"] >= 1
        assert aborted["internal_error"] >= 1
        assert n["server"].transport.statistics().streams_failed == {}


async def test_strangers_and_rude_lane_dialers_cannot_break_the_fast_lane(tmp_path: Path) -> None:
    """The lane's TCP port is open to anyone: a stranger's garbage is ignored while the real fetcher
    still connects, and a dialer with the key that sends garbage is counted as a protocol error."""
    data, sha = blob(30)
    async with memory_nodes(tmp_path, ["server", "me"], lane_bind_host=lambda _: "127.0.0.1") as (_, n):
        n["server"].store.put_bytes(data)
        lane_key = bytes(range(32))
        channel = StreamChannel(await n["me"].transport.open_stream("server", PROTOCOL_ID))
        await channel.send_frame({"t": OPEN_LANE, "key": lane_key})
        answer = await channel.receive_frame(0)
        assert answer is not None and answer[0]["t"] == LANE
        port = answer[0]["port"]
        stranger = await trio.open_tcp_stream("127.0.0.1", port)
        await stranger.send_all(b"\x00\x00\x00\x10" + bytes(16))  # does not know the key
        lane = await connect_lane("127.0.0.1", port, lane_key, "server")
        await lane.send_raw(b"\x00\x00\x00\x20" + bytes(32))  # proved the key, then garbage
        with trio.fail_after(30):
            while n["server"].server.statistics().aborted_by_reason.get("protocol_error", 0) < 1:
                await trio.sleep(0.05)
        await lane.aclose()
        await stranger.aclose()
        await channel.aclose()
        r = await fetch_blob(n["me"].transport, sha, ["server"], n["me"].store, lane_host=lambda _: "127.0.0.1")
        assert n["me"].store.read(sha) == data and r.lanes_opened >= 1
        assert n["server"].server.statistics().lanes >= 2
        assert n["server"].transport.statistics().streams_failed == {}


def _frame_of(obj: object) -> bytes:
    packed = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed
