"""Child process of test_memory_peak: fetches a blob over the memory transport (server and
fetcher in this process) and prints the peak RSS growth while receiving, from the kernel's
own accounting (/proc/self/status VmHWM, reset through /proc/self/clear_refs)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import trio

from fednode.blobs.fetch import fetch_blob
from fednode.blobs.serve import serve_blobs
from fednode.blobs.store import BlobStore
from fednode.transport.memory import MemoryNetwork, open_memory_transport


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def main(size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="fednode-mem-") as tmp:
        holder_store = BlobStore(Path(tmp) / "holder")
        with holder_store.writer() as w:
            block = os.urandom(1 << 20)
            for i in range(size >> 20):
                w.write(block[:-8] + i.to_bytes(8, "big"))
            sha = w.commit()
        me_store = BlobStore(Path(tmp) / "me")
        network = MemoryNetwork(auto_link_degree=0)
        async with (
            open_memory_transport(network, "holder") as holder,
            open_memory_transport(network, "me") as me,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(serve_blobs, holder, holder_store)
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            baseline = status_kib("VmRSS")
            result = await fetch_blob(me, sha, ["holder"], me_store, max_size=size)
            peak = status_kib("VmHWM")
            nursery.cancel_scope.cancel()
        ok = me_store.has(sha) and result.chunks_fetched == result.chunks_total == size >> 20
        print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "growth_mib": (peak - baseline) / 1024,
                          "fetched_ok": ok, "bytes": result.bytes_fetched}))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
