"""Test helpers for code built on a transport (the `trio.testing` of this package).

`open_transports(kind, n, topology)` opens n connected transports of one kind ("memory" or
"libp2p") and closes them on exit; tests of blobs, daemon and consensus reuse it. The libp2p
module is imported only when kind == "libp2p".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Literal

import trio

from fednode.identity import Identity
from fednode.transport.base import Transport
from fednode.transport.memory import MemoryNetwork, open_memory_transport

TransportKind = Literal["memory", "libp2p"]
Topology = Literal["mesh", "line", "star", "none"]
DEFAULT_WAIT_TIMEOUT = 15.0


def topology_edges(topology: Topology, n: int) -> list[tuple[int, int]]:
    """(dialer, listener) index pairs; the dialer has the higher index."""
    if topology == "mesh":
        return [(j, i) for j in range(n) for i in range(j)]
    if topology == "line":
        return [(i, i - 1) for i in range(1, n)]
    if topology == "star":
        return [(i, 0) for i in range(1, n)]
    if topology == "none":
        return []
    raise ValueError(f"unknown topology {topology!r}")


def all_tasks() -> set[trio.lowlevel.Task]:
    """Every task of the current trio run, walking the nursery tree from the root task."""
    found: set[trio.lowlevel.Task] = set()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        found.add(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return found


async def wait_until(
    predicate: Callable[[], bool], *, timeout: float = DEFAULT_WAIT_TIMEOUT, interval: float = 0.02
) -> None:
    """Poll `predicate` until it holds; trio.TooSlowError after `timeout` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


async def wait_topic_peers(
    transports: Sequence[Transport],
    topic: str,
    subscribers: Sequence[Transport] | None = None,
    *,
    timeout: float = DEFAULT_WAIT_TIMEOUT,
) -> None:
    """Wait until every transport sees each connected peer among `subscribers` (default: all
    of `transports`) as subscribed to `topic`: from then on a publish reaches them all."""
    subscriber_ids = {t.local_peer_id for t in (subscribers if subscribers is not None else transports)}

    def ready() -> bool:
        return all((t.peers() & subscriber_ids) <= t.topic_peers(topic) for t in transports)

    await wait_until(ready, timeout=timeout)


@asynccontextmanager
async def open_transports(
    kind: TransportKind,
    n: int,
    topology: Topology = "mesh",
    *,
    network: MemoryNetwork | None = None,
    identities: Sequence[Identity] | None = None,
    **options: Any,
) -> AsyncIterator[list[Transport]]:
    """Open n transports linked as `topology`; extra options go to the transport opener."""
    ids = list(identities) if identities is not None else [Identity.generate() for _ in range(n)]
    edges = topology_edges(topology, n)
    async with AsyncExitStack() as stack:
        transports: list[Transport] = []
        if kind == "memory":
            net = network or MemoryNetwork(auto_link_degree=0)
            for identity in ids:
                transports.append(await stack.enter_async_context(
                    open_memory_transport(net, identity, **options)))
            for a, b in edges:
                net.link(transports[a].local_peer_id, transports[b].local_peer_id)
        elif kind == "libp2p":
            from fednode.transport.libp2p import Libp2pLimits, open_libp2p_transport

            # Keep the topology as asked: peer exchange would let C meet A in a line A-B-C.
            options.setdefault("limits", Libp2pLimits(peer_exchange=False))

            addrs: list[str] = []
            for i, identity in enumerate(ids):
                bootstrap = [addrs[b] for a, b in edges if a == i]
                t = await stack.enter_async_context(open_libp2p_transport(
                    identity, listen_addrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=bootstrap, **options))
                transports.append(t)
                addrs.append(t.listen_addrs()[0])
            expected = {i: {transports[b].local_peer_id for a, b in edges if a == i}
                        | {transports[a].local_peer_id for a, b in edges if b == i} for i in range(n)}
            await wait_until(lambda: all(expected[i] <= transports[i].peers() for i in range(n)))
        else:
            raise ValueError(f"unknown transport kind {kind!r}")
        yield transports
