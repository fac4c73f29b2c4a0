"""fetch_blob / serve_blobs over the in-process memory transport."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fednode.blobs.fetch import FetchLimits, fetch_blob
from fednode.blobs.protocol import ERR_BUSY, ERR_NOT_MEMBER, GET_MANIFEST, PROTOCOL_ID, StreamChannel
from fednode.blobs.serve import ServeLimits
from fednode.errors import TransferError
from fednode.transport.base import Stream
from fednode.transport.memory import MemoryNetwork, open_memory_transport

from .conftest import CHUNK, CorruptingStore, blob, make_store, memory_nodes


async def test_fetch_verifies_and_stores(tmp_path: Path) -> None:
    data, sha = blob(20)
    async with memory_nodes(tmp_path, ["a", "b"]) as (_, n):
        n["a"].store.put_bytes(data)
        seen: list[tuple[int, int]] = []
        r = await fetch_blob(n["b"].transport, sha, ["a"], n["b"].store,
                             progress=lambda done, total: seen.append((done, total)))
        assert n["b"].store.read(sha) == data
        assert (r.chunks_total, r.chunks_fetched, r.chunks_resumed) == (21, 21, 0)
        assert r.bytes_fetched == len(data) and r.dropped_peers == {} and r.lanes_opened == 0
        assert seen[-1] == (len(data), len(data)) and len(seen) == 21
        st = n["a"].server.statistics()
        assert st.chunks_served == 21 and st.bytes_served == len(data)
        again = await fetch_blob(n["b"].transport, sha, ["a"], n["b"].store)
        assert again.chunks_fetched == 0  # already held: nothing moves


async def test_multi_holder_fetch_spreads_chunks(tmp_path: Path) -> None:
    data, sha = blob(40)
    async with memory_nodes(tmp_path, ["a", "b", "c"]) as (_, n):
        n["a"].store.put_bytes(data)
        n["b"].store.put_bytes(data)
        r = await fetch_blob(n["c"].transport, sha, ["a", "b"], n["c"].store,
                             limits=FetchLimits(chunks_per_request=2))
        assert n["c"].store.read(sha) == data
        assert r.chunks_fetched == 41 and sum(r.chunks_by_peer.values()) == 41
        assert r.chunks_by_peer["a"] > 0 and r.chunks_by_peer["b"] > 0


async def test_a_fetch_asks_at_most_max_sources_holders(tmp_path: Path) -> None:
    """blob-transfer-v1 r1: of 7 known holders, a fetch with max_sources 4 asks the first 2 in the
    caller's order and a draw of 2 others; every draw of 2 from the other 5 occurs over 150 fetches."""
    data, sha = blob(3)
    names = [f"h{i}" for i in range(7)]
    async with memory_nodes(tmp_path, [*names, "me"]) as (_, n):
        for name in names:
            n[name].store.put_bytes(data)
        drawn: set[frozenset[str]] = set()
        for _ in range(150):  # a given pair is missed with p = 0.9^150 < 1e-6
            before = {name: n[name].server.statistics().manifests_served for name in names}
            await fetch_blob(n["me"].transport, sha, names, n["me"].store, limits=FetchLimits(max_sources=4))
            asked = {name for name in names if n[name].server.statistics().manifests_served > before[name]}
            assert len(asked) == 4 and {"h0", "h1"} <= asked, asked
            drawn.add(frozenset(asked - {"h0", "h1"}))
            n["me"].store.delete(sha)
        assert len(drawn) == 10  # C(5, 2): the rest is drawn anew each time


async def test_bad_bytes_holder_is_dropped_and_fetch_completes(tmp_path: Path) -> None:
    data, sha = blob(30)
    evil = CorruptingStore(tmp_path / "evil", chunk_size=CHUNK)
    evil.bad_chunks = frozenset(range(31))
    async with memory_nodes(tmp_path, ["evil", "good", "me"], stores={"evil": evil}) as (_, n):
        n["evil"].store.put_bytes(data)
        n["good"].store.put_bytes(data)
        r = await fetch_blob(n["me"].transport, sha, ["evil", "good"], n["me"].store)
        assert n["me"].store.read(sha) == data
        assert r.bad_chunks_by_peer["evil"] >= 1
        assert "bad bytes" in r.dropped_peers["evil"]
        assert r.chunks_by_peer.get("evil", 0) == 0 and r.chunks_by_peer["good"] == 31


async def test_vanished_holder_mid_transfer_no_refetch(tmp_path: Path) -> None:
    data, sha = blob(60)
    async with memory_nodes(tmp_path, ["a", "b", "me"]) as (network, n):
        n["a"].store.put_bytes(data)
        n["b"].store.put_bytes(data)
        state = {"vanished": False}

        def progress(done: int, total: int) -> None:
            if done >= 20 * CHUNK and not state["vanished"]:
                state["vanished"] = True
                network.vanish("a")

        r = await fetch_blob(n["me"].transport, sha, ["a", "b"], n["me"].store, progress=progress,
                             limits=FetchLimits(chunks_per_request=4))
        assert state["vanished"] and n["me"].store.read(sha) == data
        assert "a" in r.dropped_peers
        # every chunk was verified exactly once, and b never served a chunk a had delivered
        assert r.chunks_fetched == 61 and sum(r.chunks_by_peer.values()) == 61
        assert n["b"].server.statistics().chunks_served == r.chunks_by_peer["b"]


async def test_resume_after_only_holder_vanished(tmp_path: Path) -> None:
    data, sha = blob(40)
    async with memory_nodes(tmp_path, ["a", "b", "me"]) as (network, n):
        n["a"].store.put_bytes(data)
        n["b"].store.put_bytes(data)

        def progress(done: int, total: int) -> None:
            if done >= 15 * CHUNK:
                network.vanish("a")

        with pytest.raises(TransferError, match="chunks missing"):
            await fetch_blob(n["me"].transport, sha, ["a"], n["me"].store, progress=progress)
        r = await fetch_blob(n["me"].transport, sha, ["b"], n["me"].store)
        assert n["me"].store.read(sha) == data
        assert r.chunks_resumed >= 15 and r.chunks_resumed + r.chunks_fetched == 41
        assert n["b"].server.statistics().chunks_served == r.chunks_fetched


async def test_oversize_is_refused_before_allocation(tmp_path: Path) -> None:
    data, sha = blob(20)
    async with memory_nodes(tmp_path, ["a", "me"]) as (_, n):
        n["a"].store.put_bytes(data)
        me = n["me"]
        with pytest.raises(TransferError, match="over max_size"):
            await fetch_blob(me.transport, sha, ["a"], me.store, expected_size=len(data), max_size=CHUNK)
        assert me.transport.statistics().bytes_sent == 0  # not even a request
        with pytest.raises(TransferError, match="max_blob_bytes"):
            await fetch_blob(me.transport, sha, ["a"], me.store, max_size=CHUNK)
        assert list((me.store.root / "partial").iterdir()) == []
        assert n["a"].server.statistics().chunks_served == 0


async def test_forged_manifest_holder_is_dropped(tmp_path: Path) -> None:
    data, sha = blob(10)
    other, _ = blob(10)
    liar = make_store(tmp_path / "liar")
    async with memory_nodes(tmp_path, ["liar", "l2", "good", "me"], stores={"liar": liar}) as (_, n):
        for name in ("liar", "l2"):
            # the liars hold other bytes under this blob's address, with a matching manifest
            s = n[name].store
            s.put_bytes(other)
            real = s.list_blobs()[0]
            m = s.manifest(real)
            s.path(real).rename(s.path(sha))
            forged = type(m)(sha, m.size, m.chunk_size, m.chunk_hashes)
            (s.root / "manifests" / sha).write_bytes(forged.encode())
        n["good"].store.put_bytes(data)
        r = await fetch_blob(n["me"].transport, sha, ["liar", "l2", "good"], n["me"].store)
        assert n["me"].store.read(sha) == data
        assert "forged" in r.dropped_peers["liar"] and "forged" in r.dropped_peers["l2"]


async def test_per_peer_stream_limit(tmp_path: Path) -> None:
    data, sha = blob(8)
    async with memory_nodes(tmp_path, ["a", "me"], limits=ServeLimits(max_streams_per_peer=2)) as (_, n):
        n["a"].store.put_bytes(data)
        me = n["me"].transport
        channels = [StreamChannel(await me.open_stream("a", PROTOCOL_ID)) for _ in range(3)]
        replies = []
        for ch in channels:
            await ch.send_frame({"t": GET_MANIFEST, "sha256": sha})
            frame = await ch.receive_frame(1 << 20)
            assert frame is not None
            replies.append(frame[0])
        assert [h["t"] for h in replies] == ["manifest", "manifest", "error"]
        assert replies[2]["code"] == ERR_BUSY
        assert n["a"].server.statistics().rejected_busy_by_peer == {"me": 1}
        # a fetch that wants more streams than allowed still completes with the allowed ones
        for ch in channels:
            await ch.aclose()
        await trio.sleep(0.05)
        r = await fetch_blob(me, sha, ["a"], n["me"].store, limits=FetchLimits(streams_per_holder=4))
        assert r.chunks_fetched == 9 and n["me"].store.read(sha) == data
        assert n["a"].server.statistics().rejected_busy_by_peer["me"] >= 2


async def test_non_member_stream_is_refused(tmp_path: Path) -> None:
    """With an allowlist, a peer not on it gets `not_member` for its first request, the stream
    ends, no slot is taken and nothing is served; members fetch as usual."""
    data, sha = blob(4)
    members = {"a", "member"}
    async with memory_nodes(tmp_path, ["a", "member", "outsider"], allow_peer=members.__contains__) as (_, n):
        n["a"].store.put_bytes(data)
        ch = StreamChannel(await n["outsider"].transport.open_stream("a", PROTOCOL_ID))
        await ch.send_frame({"t": GET_MANIFEST, "sha256": sha})
        frame = await ch.receive_frame(1 << 20)
        assert frame is not None and (frame[0]["t"], frame[0]["code"]) == ("error", ERR_NOT_MEMBER)
        assert await ch.receive_frame(1 << 20) is None  # closed after the refusal
        with pytest.raises(TransferError):
            await fetch_blob(n["outsider"].transport, sha, ["a"], n["outsider"].store)
        assert not n["outsider"].store.has(sha)
        r = await fetch_blob(n["member"].transport, sha, ["a"], n["member"].store)
        assert r.chunks_fetched == 5 and n["member"].store.read(sha) == data
        st = n["a"].server.statistics()
        assert st.refused_by_reason == {"not_member": 2} and st.manifests_served == 1  # the outsider's two
        assert st.rejected_busy_by_peer == {} and st.active_streams <= 2


async def test_stalled_reader_does_not_stall_server(tmp_path: Path) -> None:
    data, sha = blob(64)
    limits = ServeLimits(send_timeout=0.5)
    async with memory_nodes(tmp_path, ["a", "stall", "me"], limits=limits) as (_, n):
        n["a"].store.put_bytes(data)
        ch = StreamChannel(await n["stall"].transport.open_stream("a", PROTOCOL_ID))
        await ch.send_frame({"t": "get_chunks", "sha256": sha, "idx": list(range(64))})
        # never read: the server's send blocks on the full stream buffer
        with trio.fail_after(20):
            r = await fetch_blob(n["me"].transport, sha, ["a"], n["me"].store)
        assert r.chunks_fetched == 65
        with trio.fail_after(5):
            while n["a"].server.statistics().aborted_by_reason.get("send_timeout", 0) < 1:
                await trio.sleep(0.05)
        await ch.aclose()


def _loopback(_: object) -> str:
    return "127.0.0.1"


async def test_fast_lane_carries_the_chunks(tmp_path: Path) -> None:
    data, sha = blob(30)
    async with memory_nodes(tmp_path, ["a", "me"], lane_bind_host=_loopback) as (_, n):
        n["a"].store.put_bytes(data)
        r = await fetch_blob(n["me"].transport, sha, ["a"], n["me"].store, lane_host=_loopback)
        assert n["me"].store.read(sha) == data
        assert r.lanes_opened == 2 and n["a"].server.statistics().lanes == 2
        assert r.chunks_fetched == 31
        # the memory stream carried the manifest and lane set-up only, not the chunks
        assert n["me"].transport.statistics().bytes_received < len(data) // 10


async def test_a_small_blob_takes_no_lane(tmp_path: Path) -> None:
    """Issue 12: a lane (a TCP connection, and a listener on the holder) was opened for every fetch,
    a 1.3 kB merged adapter too; blobs under lane_min_bytes stay on the stream, larger ones still
    take the lane (control)."""
    small, small_sha = os.urandom(1320), ""
    large, large_sha = blob(4)
    async with memory_nodes(tmp_path, ["a", "me"], lane_bind_host=_loopback) as (_, n):
        small_sha = n["a"].store.put_bytes(small)
        n["a"].store.put_bytes(large)
        r = await fetch_blob(n["me"].transport, small_sha, ["a"], n["me"].store, lane_host=_loopback)
        assert n["me"].store.read(small_sha) == small and r.lanes_opened == 0
        assert n["a"].server.statistics().lanes == 0
        limits = FetchLimits(lane_min_bytes=len(large))
        r = await fetch_blob(n["me"].transport, large_sha, ["a"], n["me"].store, lane_host=_loopback, limits=limits)
        assert n["me"].store.read(large_sha) == large and r.lanes_opened >= 1


async def test_lane_falls_back_to_the_stream(tmp_path: Path) -> None:
    data, sha = blob(12)
    async with memory_nodes(tmp_path, ["a", "b", "me"], lane_bind_host=_loopback) as (_, n):
        n["a"].store.put_bytes(data)
        # the holder listens on 127.0.0.1 but we dial 127.0.0.2: the lane cannot open
        r = await fetch_blob(n["me"].transport, sha, ["a"], n["me"].store, lane_host=lambda _: "127.0.0.2")
        assert r.lanes_opened == 0 and r.chunks_fetched == 13 and n["me"].store.read(sha) == data
        # a holder that offers no lane (no bind host): plain stream
        async with memory_nodes(tmp_path / "x", ["c", "me2"]) as (_, m):
            m["c"].store.put_bytes(data)
            r2 = await fetch_blob(m["me2"].transport, sha, ["c"], m["me2"].store, lane_host=_loopback)
            assert r2.lanes_opened == 0 and r2.chunks_fetched == 13


async def _silent_holder(network: MemoryNetwork, name: str, task_status: trio.TaskStatus[None]) -> None:
    """A peer that takes blob streams and never answers (a member still being dialled, or too busy)."""
    async with open_memory_transport(network, name) as transport:
        async def never_answer(stream: Stream) -> None:
            await trio.sleep_forever()

        transport.serve(PROTOCOL_ID, never_answer)
        task_status.started()
        await trio.sleep_forever()


@pytest.mark.parametrize("silent_first", [False, True])
async def test_other_holders_get_only_the_manifest_grace(tmp_path: Path, silent_first: bool) -> None:
    """Issue 12: a fetch waited for every asked holder's manifest, so it was as slow as the slowest
    (up to manifest_timeout). Once a manifest is in, the holders other than the caller's first
    choice get `manifest_grace`; the first choice is awaited as before (control: silent_first)."""
    data, sha = blob(3)
    limits = FetchLimits(manifest_timeout=3.0, manifest_grace=0.2, busy_retries=0)
    async with memory_nodes(tmp_path, ["a", "me"]) as (network, n), trio.open_nursery() as nursery:
        await nursery.start(_silent_holder, network, "silent")
        n["a"].store.put_bytes(data)
        holders = ["silent", "a"] if silent_first else ["a", "silent"]
        started = trio.current_time()
        r = await fetch_blob(n["me"].transport, sha, holders, n["me"].store, limits=limits)
        took = trio.current_time() - started
        assert n["me"].store.read(sha) == data and r.chunks_by_peer == {"a": 4}
        if silent_first:
            assert took >= limits.manifest_timeout
            assert r.dropped_peers["silent"].startswith("manifest: TooSlowError")
        else:
            assert took < limits.manifest_timeout / 2
            assert r.dropped_peers == {"silent": "manifest: no answer within the grace after the first"}
        nursery.cancel_scope.cancel()
