"""A fetcher SIGKILLed in the middle of a transfer and started again under the same peer id
(a restarted daemon keeps its node key) must fetch from the same holder at once: the holder
still has the dead process's connection and streams when the new one dials in (issue 13: a
restarted node saw `manifest: TooSlowError()` from every holder for over a minute)."""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path

import pytest

from fednode.blobs.peer_process import pseudo_random_bytes

from .procs import PeerProc

SIZE = 8 << 20
MIB = 1 << 20
KEY_SEED = 42
RESTARTED_FETCH_SECONDS = 20.0  # the transfer itself takes ~1.5 s (8 chunks, 0.3 s each, 2 streams)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kill", ["sigkill", "sigterm"])
def test_a_fetcher_restarted_under_the_same_peer_id_fetches_at_once(tmp_path: Path, kill: str) -> None:
    expected = hashlib.sha256(pseudo_random_bytes(SIZE, 7)).hexdigest()
    procs: list[PeerProc] = []
    try:
        h = PeerProc("hold", "--size", str(SIZE), "--data-seed", "7", "--serve-delay", "0.3",
                     "--root", str(tmp_path / "h"))
        procs.append(h)
        ready = h.wait_for(lambda e: e["event"] == "ready", 60)
        fetch = ["fetch", "--want-holders", "1", "--progress-bytes", str(MIB), "--key-seed", str(KEY_SEED),
                 "--no-lane", "--bootstrap", ready["addrs"][0]]
        first = PeerProc(*fetch, "--root", str(tmp_path / "f1"))
        procs.append(first)
        first.wait_for(lambda e: e["event"] == "progress" and e["done"] >= 2 * MIB, 90)
        first.proc.send_signal(signal.SIGKILL if kill == "sigkill" else signal.SIGTERM)
        first.proc.wait(timeout=30)
        started = time.monotonic()
        again = PeerProc(*fetch, "--root", str(tmp_path / "f2"), "--timeout", "120")
        procs.append(again)
        done = again.wait_for(lambda e: e["event"] == "done", 150)
        seconds = time.monotonic() - started
        assert done["verified"] and done["result"]["sha256"] == expected
        assert done["result"]["dropped_peers"] == {}, done["result"]
        at = {e["event"]: e["t"] for e in again.seen}
        assert done["seconds"] < RESTARTED_FETCH_SECONDS, (
            f"the restarted fetcher took {done['seconds']:.1f} s to fetch ({seconds:.1f} s in all; "
            f"ready -> holders {at.get('holders', 0) - at.get('ready', 0):.1f} s)")
    finally:
        for p in procs:
            p.kill()
