"""A small runnable blob peer over libp2p, for multi-process tests and the transfer bench.

    python -m fednode.blobs.peer_process hold  --root DIR --size N [--data-seed S] [--serve-delay SEC]
    python -m fednode.blobs.peer_process fetch --root DIR --bootstrap ADDR... --want-holders K [--key-seed S]
    python -m fednode.blobs.peer_process tcp-source --size N

Each prints one JSON object per line on stdout (`{"event": ...}`). A holder stores a blob of N
pseudo-random bytes (the same bytes for the same --data-seed), serves it, and announces it on the
control topic every half second; a fetcher waits for K announcements, says so on the topic, then
fetches the blob from all announcers and reports progress and the FetchResult. `tcp-source`
sends N bytes over a plain trio TCP socket to its first client (the bench's raw baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import trio

from fednode.blobs.fetch import FetchLimits, fetch_blob
from fednode.blobs.manifest import BlobManifest
from fednode.blobs.serve import serve_blobs
from fednode.blobs.store import BlobStore
from fednode.identity import Identity
from fednode.transport.libp2p import open_libp2p_transport

CONTROL_TOPIC = "fednode/blob-test/1"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def pseudo_random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class SlowStore(BlobStore):
    """Serves each chunk after a delay, so a test can act in the middle of a transfer."""

    serve_delay = 0.0

    def read_chunk(self, manifest: BlobManifest, index: int) -> bytes:
        time.sleep(self.serve_delay)  # runs in a worker thread
        return super().read_chunk(manifest, index)


async def hold(args: argparse.Namespace) -> None:
    store = SlowStore(args.root)
    store.serve_delay = args.serve_delay
    sha = store.put_bytes(pseudo_random_bytes(args.size, args.data_seed))
    async with (
        open_libp2p_transport(Identity.generate(), listen_addrs=[LOOPBACK]) as t,
        trio.open_nursery() as nursery,
    ):
        server = await nursery.start(functools.partial(serve_blobs, t, store))
        sub = await t.subscribe(CONTROL_TOPIC)
        emit("ready", peer_id=t.local_peer_id, addrs=t.listen_addrs(), sha256=sha, size=args.size)
        announcement = json.dumps({"have": sha, "peer": t.local_peer_id, "size": args.size}).encode()
        nursery.start_soon(_print_control, sub, t.local_peer_id)
        deadline = trio.current_time() + args.lifetime
        while trio.current_time() < deadline:
            await t.publish(CONTROL_TOPIC, announcement)
            stats = server.statistics()
            if stats.chunks_served:
                emit("served", chunks=stats.chunks_served, bytes=stats.bytes_served, lanes=stats.lanes)
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()


async def _print_control(sub: Any, me: str) -> None:
    async for msg in sub:
        body = json.loads(msg.data)
        if body.get("peer") != me and "have" not in body:
            emit("control", **body)


async def fetch(args: argparse.Namespace) -> None:
    store = BlobStore(args.root)
    identity = Identity.generate() if args.key_seed is None else Identity.from_seed(bytes([args.key_seed]) * 32)
    async with open_libp2p_transport(identity, listen_addrs=[LOOPBACK], bootstrap=args.bootstrap) as t:
        sub = await t.subscribe(CONTROL_TOPIC)
        emit("ready", peer_id=t.local_peer_id, addrs=t.listen_addrs())
        holders: dict[str, tuple[str, int]] = {}
        with trio.fail_after(args.timeout):
            async for msg in sub:
                body = json.loads(msg.data)
                if "have" in body and body["peer"] != t.local_peer_id:
                    holders[body["peer"]] = (body["have"], body["size"])
                    if len(holders) >= args.want_holders:
                        break
        shas = {sha for sha, _ in holders.values()}
        assert len(shas) == 1, f"holders announce different blobs: {shas}"
        sha, size = next(iter(holders.values()))
        emit("holders", peers=sorted(holders), sha256=sha, size=size)
        await t.publish(CONTROL_TOPIC, json.dumps({"fetching": sha, "peer": t.local_peer_id}).encode())
        step = max(1, args.progress_bytes)
        last = [0]

        def progress(done: int, total: int) -> None:
            if done - last[0] >= step or done == total:
                last[0] = done
                emit("progress", done=done, total=total)

        limits = FetchLimits(use_lane=not args.no_lane)
        started = time.monotonic()
        with trio.fail_after(args.timeout):
            result = await fetch_blob(t, sha, sorted(holders), store, expected_size=size,
                                      progress=progress, limits=limits)
        elapsed = time.monotonic() - started
        verified = store.manifest(sha).sha256 == sha and store.read(sha) is not None
        emit("done", result=dataclasses.asdict(result), verified=verified, seconds=elapsed,
             mb_per_s=size / elapsed / 1e6)
        await sub.aclose()


async def tcp_source(args: argparse.Namespace) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    emit("ready", port=listeners[0].socket.getsockname()[1])
    block = pseudo_random_bytes(1 << 20, 1)
    stream = await listeners[0].accept()
    sent = 0
    while sent < args.size:
        n = min(len(block), args.size - sent)
        await stream.send_all(block[:n])
        sent += n
    await stream.aclose()
    emit("done", sent=sent)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fednode.blobs.peer_process")
    p.add_argument("role", choices=["hold", "fetch", "tcp-source"])
    p.add_argument("--root", type=Path, default=Path("."))
    p.add_argument("--size", type=int, default=32 << 20)
    p.add_argument("--data-seed", type=int, default=7)
    p.add_argument("--serve-delay", type=float, default=0.0)
    p.add_argument("--bootstrap", nargs="*", default=[])
    p.add_argument("--want-holders", type=int, default=1)
    p.add_argument("--progress-bytes", type=int, default=4 << 20)
    p.add_argument("--no-lane", action="store_true")
    p.add_argument("--key-seed", type=int, default=None, choices=range(256), metavar="0..255",
                   help="fetch: a fixed identity (the same peer id on every run), else a new one")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--lifetime", type=float, default=float("inf"), help="hold: exit after this many seconds")
    args = p.parse_args(argv)
    role = {"hold": hold, "fetch": fetch, "tcp-source": tcp_source}[args.role]
    try:
        trio.run(role, args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
