"""Issue 12: a gossip message is decoded once per process, not once by the topic validator and again
by the gossip reader of every node (a 40-node simulation spent 74 of 524 s decoding). Three daemons on
the memory transport share one process: every heartbeat they exchange is decoded exactly once, and
each node still validated and read it (its accepted counter and its member table show it)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import trio

from fednode.wire import Heartbeat, codec
from tests.node.conftest import cluster, wait_until

N_NODES = 3


async def test_each_heartbeat_is_decoded_once_for_all_nodes(tmp_path: Path, autojump_clock,  # type: ignore[no-untyped-def]
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: collections.Counter[bytes] = collections.Counter()
    real = codec.decode

    def counting(data: bytes, **kwargs: int) -> codec.Message:
        message = real(data, **kwargs)
        if isinstance(message, Heartbeat):
            decoded[bytes(data)] += 1
        return message

    monkeypatch.setattr(codec, "decode", counting)
    codec.SHARED_DECODE_CACHE.clear()  # earlier tests may have decoded these same (seeded) heartbeats
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, N_NODES, round={"max_rounds": 0}) for i in range(N_NODES)]
        await wait_until(lambda: all(len(n.election.heard()) == N_NODES - 1 for n in nodes), timeout=60.0)
        await trio.sleep(5.0)  # a few more heartbeats each
    assert len(decoded) >= 3 * N_NODES, decoded
    assert set(decoded.values()) == {1}, sorted(decoded.values())
    for node in nodes:  # every node validated and read the others' heartbeats all the same
        assert node.counters["accepted"]["heartbeat"] >= 3 * (N_NODES - 1), node.counters
