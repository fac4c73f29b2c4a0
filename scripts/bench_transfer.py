#!/usr/bin/env python3
"""Blob transfer throughput: our blob protocol over libp2p vs a plain trio TCP socket.

Two OS processes on loopback: a holder child (`python -m fednode.blobs.peer_process hold`) and
this process as the fetcher. Measured, each on a fresh store:
  lane    - /fednode/blob/1.0.0 with the fast lane (the default path)
  stream  - /fednode/blob/1.0.0 forced onto the Noise+Yamux stream (the fallback path)
  tcp     - the same number of bytes from a `tcp-source` child over a plain trio socket, discarded
Fetch timings include manifest exchange, per-chunk verification, spooling to disk and the final
whole-blob hash. The last line printed is a JSON object of the figures.

    .venv/bin/python scripts/bench_transfer.py [--size-mib 128] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from fednode.blobs.fetch import FetchLimits, fetch_blob
from fednode.blobs.store import BlobStore
from fednode.identity import Identity
from fednode.transport.libp2p import open_libp2p_transport

GOAL_MB_S = 80.0
GOAL_RATIO = 0.25


def spawn(*args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fednode.blobs.peer_process", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "ready":
            return proc, event
    raise RuntimeError(f"child {args} exited before it was ready")


async def fetch_once(addr: str, peer: str, sha: str, size: int, root: Path, use_lane: bool) -> float:
    store = BlobStore(root)
    async with open_libp2p_transport(Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"],
                                     bootstrap=[addr]) as t:
        started = time.perf_counter()
        result = await fetch_blob(t, sha, [peer], store, expected_size=size,
                                  limits=FetchLimits(use_lane=use_lane))
        elapsed = time.perf_counter() - started
    assert result.chunks_fetched == result.chunks_total and store.has(sha)
    assert (result.lanes_opened > 0) == use_lane, result
    return size / elapsed / 1e6


async def tcp_once(port: int, size: int) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    started = time.perf_counter()
    got = 0
    while data := await stream.receive_some(1 << 20):
        got += len(data)
    elapsed = time.perf_counter() - started
    await stream.aclose()
    assert got == size, got
    return size / elapsed / 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size-mib", type=int, default=128)
    p.add_argument("--profile", type=Path, help="cProfile the lane fetch into this file")
    p.add_argument("--skip-stream", action="store_true", help="skip the (slow) no-lane measurement")
    args = p.parse_args()
    size = args.size_mib << 20
    figures: dict[str, Any] = {"size_bytes": size}
    with tempfile.TemporaryDirectory(prefix="fednode-bench-") as tmp:
        root = Path(tmp)
        holder, ready = spawn("hold", "--root", str(root / "holder"), "--size", str(size))
        try:
            addr, peer, sha = ready["addrs"][0], ready["peer_id"], ready["sha256"]
            profiler = cProfile.Profile() if args.profile else None
            if profiler:
                profiler.enable()
            figures["lane_mb_s"] = trio.run(fetch_once, addr, peer, sha, size, root / "f-lane", True)
            if profiler:
                profiler.disable()
                profiler.dump_stats(args.profile)
            print(f"blob protocol, fast lane : {figures['lane_mb_s']:8.1f} MB/s", flush=True)
            if not args.skip_stream:
                figures["stream_mb_s"] = trio.run(fetch_once, addr, peer, sha, size, root / "f-stream", False)
                print(f"blob protocol, libp2p    : {figures['stream_mb_s']:8.1f} MB/s", flush=True)
        finally:
            holder.kill()
            holder.wait()
        source, ready = spawn("tcp-source", "--size", str(size))
        try:
            figures["tcp_mb_s"] = trio.run(tcp_once, ready["port"], size)
        finally:
            source.kill()
            source.wait()
    print(f"plain trio TCP socket    : {figures['tcp_mb_s']:8.1f} MB/s")
    figures["ratio"] = figures["lane_mb_s"] / figures["tcp_mb_s"]
    figures["goal_met"] = figures["lane_mb_s"] >= GOAL_MB_S and figures["ratio"] >= GOAL_RATIO
    print(f"ratio lane/tcp           : {figures['ratio']:8.3f}  (goal >= {GOAL_MB_S} MB/s and >= {GOAL_RATIO})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
