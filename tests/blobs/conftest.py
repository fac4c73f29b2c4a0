from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from fednode.blobs.manifest import BlobManifest
from fednode.blobs.serve import BlobServer, ServeLimits, serve_blobs
from fednode.blobs.store import BlobStore
from fednode.transport.base import Stream
from fednode.transport.memory import MemoryNetwork, MemoryTransport, open_memory_transport

CHUNK = 64 * 1024


def make_store(root: Path, **kw: object) -> BlobStore:
    return BlobStore(root, chunk_size=CHUNK, **kw)  # type: ignore[arg-type]


def blob(n_chunks: int, extra: int = 777) -> tuple[bytes, str]:
    data = os.urandom(n_chunks * CHUNK + extra)
    return data, hashlib.sha256(data).hexdigest()


class CorruptingStore(BlobStore):
    """A holder that serves bad bytes for some chunks (and does not verify its own reads)."""

    bad_chunks: frozenset[int] = frozenset()

    def read_chunk(self, manifest: BlobManifest, index: int) -> bytes:
        offset, length = manifest.chunk_range(index)
        with open(self.path(manifest.sha256), "rb") as f:
            data = bytearray(os.pread(f.fileno(), length, offset))
        if index in self.bad_chunks:
            data[0] ^= 0xFF
        return bytes(data)


class Node:
    def __init__(self, transport: MemoryTransport, store: BlobStore, server: BlobServer) -> None:
        self.transport = transport
        self.store = store
        self.server = server

    @property
    def id(self) -> str:
        return self.transport.local_peer_id


@asynccontextmanager
async def memory_nodes(
    tmp_path: Path,
    names: list[str],
    *,
    stores: dict[str, BlobStore] | None = None,
    limits: ServeLimits | None = None,
    lane_bind_host: Callable[[Stream], str | None] | None = None,
    allow_peer: Callable[[str], bool] | None = None,
) -> AsyncIterator[tuple[MemoryNetwork, dict[str, Node]]]:
    network = MemoryNetwork(auto_link_degree=0)
    nodes: dict[str, Node] = {}
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        for name in names:
            transport = await stack.enter_async_context(open_memory_transport(network, name))
            store = (stores or {}).get(name) or make_store(tmp_path / name)
            server = await nursery.start(
                functools.partial(
                    serve_blobs, transport, store, limits=limits or ServeLimits(), lane_bind_host=lane_bind_host,
                    allow_peer=allow_peer,
                )
            )
            nodes[name] = Node(transport, store, server)
        yield network, nodes
        nursery.cancel_scope.cancel()
