"""round-v1 r10: `/fednode/submit/1.0.0`, a participant's submission straight to the coordinator.

The protocol (receipts, limits, hostile senders), then the daemon: members hand their submissions to
the coordinator and gossip none of them; a coordinator that does not serve the protocol still gets
them by gossip; a coordinator that took a round over after its deadline takes the submissions its
members hand it again (the pure rule in tests/consensus/test_round_state.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from fednode.config import Config
from fednode.errors import PeerUnavailable, RemoteProtocolError
from fednode.node.daemon import Node
from fednode.node.submit import (
    DEFAULT_MAX_SUBMIT_STREAMS,
    SUBMIT_PROTOCOL_ID,
    SubmitReceipt,
    SubmitServer,
    submit_direct,
)
from fednode.transport.memory import MemoryNetwork, open_memory_transport
from fednode.wire import codec
from fednode.wire.messages import Message
from fednode.wire.verdict import Verdict
from tests.node.checks import check_round_agreement
from tests.node.conftest import cluster, wait_until

OK = SubmitReceipt(Verdict.ACCEPT, "ok", True)
N = 3


def test_the_config_default_is_the_named_limit() -> None:
    assert Config().round.max_submit_streams == DEFAULT_MAX_SUBMIT_STREAMS


@pytest.mark.parametrize("payload", [
    b"\xc1", msgpack.packb([1]), msgpack.packb({"verdict": "accept", "reason": "ok"}),
    msgpack.packb({"verdict": "maybe", "reason": "ok", "coordinator": True}),
    msgpack.packb({"verdict": "accept", "reason": "x" * 65, "coordinator": True}),
    msgpack.packb({"verdict": "accept", "reason": "ok", "coordinator": 1}),
])
def test_a_malformed_receipt_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        SubmitReceipt.decode(payload)


def test_receipt_round_trip_and_what_counts_as_delivered() -> None:
    for receipt in (OK, SubmitReceipt(Verdict.IGNORE, "duplicate", True), SubmitReceipt(Verdict.IGNORE, "late", True),
                    SubmitReceipt(Verdict.ACCEPT, "ok", False), SubmitReceipt(Verdict.REJECT, "equivocation", True)):
        assert SubmitReceipt.decode(receipt.encode()) == receipt
    assert OK.delivered and SubmitReceipt(Verdict.IGNORE, "duplicate", True).delivered
    assert not SubmitReceipt(Verdict.ACCEPT, "ok", False).delivered  # not its coordinator: gossip it
    assert not SubmitReceipt(Verdict.IGNORE, "late", True).delivered


async def test_a_submission_gets_the_judges_receipt_and_strangers_are_refused_unread() -> None:
    network = MemoryNetwork(auto_link_degree=0)
    async with AsyncExitStack() as stack:
        server_t, member, outsider = [await stack.enter_async_context(open_memory_transport(network, name))
                                      for name in ("server", "member", "outsider")]
        judged: list[tuple[bytes, str]] = []

        def judge(data: bytes, peer: str) -> SubmitReceipt:
            judged.append((data, peer))
            return SubmitReceipt(Verdict.IGNORE, "late", True)

        server = SubmitServer(judge, max_request_bytes=1024, allow_peer={"server", "member"}.__contains__)
        server_t.serve(SUBMIT_PROTOCOL_ID, server.handle)
        assert await submit_direct(member, "server", b"signed envelope") == SubmitReceipt(Verdict.IGNORE, "late", True)
        with pytest.raises(RemoteProtocolError):
            await submit_direct(outsider, "server", b"signed envelope")
        assert judged == [(b"signed envelope", "member")]  # the outsider's frame was never read
        stats = server.statistics()
        assert stats.answered_by_verdict == {"ignore": 1} and stats.refused_by_reason == {"not_member": 1}


async def test_hostile_senders_cost_one_stream_each_and_are_counted(autojump_clock: trio.abc.Clock) -> None:
    """Oversize, cut short, stalled, too many at once, and a judge that raises: each is counted by
    reason, none reaches the transport, and the server still answers afterwards."""
    network = MemoryNetwork(auto_link_degree=0)
    async with AsyncExitStack() as stack:
        server_t, rude = [await stack.enter_async_context(open_memory_transport(network, name))
                          for name in ("server", "rude")]

        def judge(data: bytes, peer: str) -> SubmitReceipt:
            if data == b"boom":
                raise RuntimeError("a bug in the judge")
            return OK

        server = SubmitServer(judge, max_request_bytes=100, timeout=5.0, max_streams_per_peer=2)
        server_t.serve(SUBMIT_PROTOCOL_ID, server.handle)

        async def send(data: bytes) -> bytes:
            stream = await rude.open_stream("server", SUBMIT_PROTOCOL_ID)
            got = b""
            with contextlib.suppress(PeerUnavailable, trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(data)
                await stream.send_eof()
                while chunk := await stream.receive_some():
                    got += chunk
            await stream.aclose()
            return got

        assert await send(struct.pack(">I", 10**9)) == b""  # oversize: refused before reading it
        assert await send(struct.pack(">I", 50) + b"short") == b""  # ends mid-frame
        assert await send(struct.pack(">I", 4) + b"boom") == b""  # the judge's bug stays in the server
        stalled = [await rude.open_stream("server", SUBMIT_PROTOCOL_ID) for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        assert await send(struct.pack(">I", 2) + b"hi") == b""  # a third at once from one peer: busy
        await trio.sleep(6.0)  # the two stalled exchanges time out
        for s in stalled:
            await s.aclose()
        assert SubmitReceipt.decode((await send(struct.pack(">I", 2) + b"hi"))[4:]) == OK
        stats = server.statistics()
        assert stats.refused_by_reason == {"too_large": 1, "bad_request": 1, "busy": 1}
        assert stats.failed_by_reason == {"internal_error": 1, "timeout": 2}
        assert stats.answered_by_verdict == {"accept": 1}


async def test_a_peer_that_never_answers_is_unavailable_within_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    network = MemoryNetwork(auto_link_degree=0)
    async with AsyncExitStack() as stack:
        server_t, member = [await stack.enter_async_context(open_memory_transport(network, name))
                            for name in ("server", "member")]

        async def mute(stream: Any) -> None:
            await trio.sleep_forever()

        server_t.serve(SUBMIT_PROTOCOL_ID, mute)
        start = trio.current_time()
        with pytest.raises(PeerUnavailable, match="no receipt within 3 s"):
            await submit_direct(member, "server", b"x", timeout=3.0)
        assert trio.current_time() - start == pytest.approx(3.0)


def _record_gossip(nodes: list[Node]) -> list[tuple[str, str]]:
    """(publisher, message type) of everything the nodes publish on gossip from now on."""
    sent: list[tuple[str, str]] = []
    for node in nodes:
        original = node.publish

        async def recording(message: Message, original: Any = original, who: str = node.node_id) -> None:
            sent.append((who, type(message).__name__))
            await original(message)

        node.publish = recording  # type: ignore[method-assign]
        node.driver.publish = recording
    return sent


async def _one_round(tmp_path: Path, direct: bool, *, refuse_direct: bool = False
                     ) -> tuple[str, list[str], dict[str, int], dict[str, set[str]]]:
    """One round of N nodes: (coordinator, who gossiped a submission, the coordinator's direct
    receipts by verdict, each node's recorded submitters)."""
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, N, round={"max_rounds": 1, "direct_submit": direct}) for i in range(N)]
        sent = _record_gossip(nodes)
        if refuse_direct:  # a coordinator without the protocol (an older node): every stream is closed unread
            async def refuse(stream: Any) -> None:
                return

            for node in nodes:
                assert node.transport is not None
                node.transport.serve(SUBMIT_PROTOCOL_ID, refuse)
        await wait_until(lambda: all(n.driver.progress.rounds_completed >= 1 for n in nodes))
        record = check_round_agreement(nodes, 1)
        coordinator = record["final_coordinator_node_id"]
        assert sorted(a["node_id"] for a in record["accepted"]) == sorted(n.node_id for n in nodes)
        gossiped = sorted(who for who, kind in sent if kind == "SubmissionAnnounce")
        coord = next(n for n in nodes if n.node_id == coordinator)
        held = {n.node_id: {r.node_id for r in n.db.submissions(record["round_id"])} for n in nodes}
        member = next(n for n in nodes if n is not coord)
        garbage = coord._judge_submission(b"not an envelope", member.node_id)
        assert garbage.verdict is Verdict.REJECT and not garbage.coordinator
        manifest = codec.decode(coord._sync_lookup(record["round_id"])[0])  # a signed message, not a submission
        fresh = codec.sign(dataclasses.replace(manifest, created_at=manifest.created_at + 0.001), coord.identity)
        other = coord._judge_submission(codec.encode(fresh), member.node_id)
        assert (other.verdict, other.reason) == (Verdict.REJECT, "not_a_submission")
        return coordinator, gossiped, coord.submit_server.statistics().answered_by_verdict, held


async def test_members_hand_their_submissions_to_the_coordinator_and_gossip_none(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.autojump_threshold = 0.01
    coordinator, gossiped, answered, held = await _one_round(tmp_path / "direct", True)
    assert gossiped == []
    assert answered == {"accept": N - 1}
    assert len(held[coordinator]) == N
    assert all(held[n] == {n} for n in held if n != coordinator)  # a member holds its own submission only
    # the control: gossip only (round-v1 before r10), every member's submission is on gossip
    _, gossiped, answered, held = await _one_round(tmp_path / "gossip", False)
    assert len(gossiped) >= N and answered == {}
    assert all(len(h) == N for h in held.values())


async def test_a_coordinator_without_the_protocol_still_gets_every_submission_by_gossip(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.autojump_threshold = 0.01
    coordinator, gossiped, answered, _ = await _one_round(tmp_path, True, refuse_direct=True)
    assert answered == {}
    assert len([who for who in gossiped if who != coordinator]) >= N - 1  # each member fell back
