"""The daemon's stream services: `/fednode/sync/1.0.0` (answers, bad requests, the membership
gate) and how the daemon wires the blob server from its config."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from fednode.errors import RemoteProtocolError
from fednode.node.sync import SYNC_PROTOCOL_ID, request_sync, serve_sync
from fednode.transport.memory import MemoryNetwork, open_memory_transport
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
