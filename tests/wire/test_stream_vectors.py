"""The reference server and client of /fednode/sync/1.0.0 and /fednode/peers/1.0.0 against the
vectors in protocols/vectors/ (built from the specs by scripts/gen_stream_vectors.py, not by the code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fednode.errors import LimitExceeded, RemoteProtocolError
from fednode.node import sync
from fednode.transport.libp2p_discovery import (
    MAX_ADDRS_PER_PEER,
    MAX_RESPONSE_BYTES,
    make_peer_exchange_handler,
    parse_peer_exchange,
)

ROOT = Path(__file__).resolve().parents[2]
SYNC = json.loads((ROOT / "protocols/vectors/sync-v1.json").read_text(encoding="utf-8"))
PEERS = json.loads((ROOT / "protocols/vectors/peer-exchange-v1.json").read_text(encoding="utf-8"))


class ScriptedStream:
    """A stream that yields `incoming` (in small pieces), then EOF, and records what is sent."""

    def __init__(self, incoming: bytes, peer: str = "asker") -> None:
        self._incoming = incoming
        self.sent = b""
        self.eof_sent = False
        self.closed = False
        self.remote_peer_id = peer

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        piece, self._incoming = self._incoming[:min(max_bytes, 7)], self._incoming[min(max_bytes, 7):]
        return piece

    async def send_all(self, data: bytes) -> None:
        self.sent += data

    async def send_eof(self) -> None:
        self.eof_sent = True

    async def aclose(self) -> None:
        self.closed = True


def test_limits_in_the_vectors_are_the_code_s() -> None:
    assert SYNC["protocol_id"] == sync.SYNC_PROTOCOL_ID
    assert SYNC["limits"] == {"max_request_bytes": sync.MAX_SYNC_REQUEST_BYTES, "max_messages": sync.MAX_SYNC_MESSAGES,
                              "max_response_bytes": sync.MAX_SYNC_RESPONSE_BYTES}
    assert PEERS["limits"]["max_response_bytes"] == MAX_RESPONSE_BYTES
    assert PEERS["limits"]["max_addrs_per_peer"] == MAX_ADDRS_PER_PEER


@pytest.mark.parametrize("vec", SYNC["requests"], ids=lambda v: v["name"])
async def test_sync_server_answers_or_refuses_each_request(vec: dict[str, Any]) -> None:
    held = {k: [bytes.fromhex(h) for h in v] for k, v in SYNC["server_holds"].items()}
    server = sync.SyncServer(lambda round_id: held.get(round_id, []))
    stream = ScriptedStream(bytes.fromhex(vec["hex"]))
    await server.handle(stream)  # type: ignore[arg-type]
    stats = server.statistics()
    if vec["expect"]["answer"]:
        assert stream.sent.hex() == vec["expect"]["response_hex"]
        assert stream.eof_sent and stats.served == 1 and not stats.refused_by_reason
    else:
        assert stream.sent == b"" and stats.served == 0
        assert stats.refused_by_reason == {vec["expect"]["refused"]: 1}


@pytest.mark.parametrize("vec", SYNC["responses"], ids=lambda v: v["name"])
async def test_sync_client_reads_or_refuses_each_response(vec: dict[str, Any]) -> None:
    stream = ScriptedStream(bytes.fromhex(vec["hex"]))

    async def open_stream(peer: str, protocol: str) -> ScriptedStream:
        assert protocol == SYNC["protocol_id"]
        return stream

    transport: Any = SimpleNamespace(open_stream=open_stream)
    if vec["expect"]["ok"]:
        got = await sync.request_sync(transport, "server", "r-0001")
        assert [m.hex() for m in got] == vec["expect"]["envelopes_hex"]
    else:
        with pytest.raises((RemoteProtocolError, LimitExceeded)):
            await sync.request_sync(transport, "server", "r-0001")
    request = next(r for r in SYNC["requests"] if r["name"] == "request-held-round")
    assert stream.sent.hex() == request["hex"]  # what the client asks is the vector's request, byte for byte
    assert stream.closed


async def test_peer_exchange_server_writes_the_vector_answer() -> None:
    from libp2p.peer.id import ID
    from multiaddr import Multiaddr

    conns = {ID.from_base58(p): [Multiaddr(a) for a in addrs] for p, addrs in PEERS["server_connections"].items()}
    host: Any = SimpleNamespace(
        get_network=lambda: SimpleNamespace(connections={p: [object()] for p in conns}),
        get_peerstore=lambda: SimpleNamespace(addrs=lambda p: conns[p]))
    written: list[bytes] = []
    closed: list[bool] = []

    async def write(data: bytes) -> None:
        written.append(data)

    async def close() -> None:
        closed.append(True)

    stream: Any = SimpleNamespace(muxed_conn=SimpleNamespace(peer_id=ID.from_base58(PEERS["asker"])),
                                  write=write, close=close)
    failures: list[str] = []
    await make_peer_exchange_handler(host, PEERS["limits"]["max_peers"], on_failure=failures.append)(stream)
    assert b"".join(written).hex() == PEERS["server_answer_hex"] and closed == [True] and failures == []


@pytest.mark.parametrize("vec", PEERS["responses"], ids=lambda v: v["name"])
def test_peer_exchange_client_reads_each_answer(vec: dict[str, Any]) -> None:
    found = parse_peer_exchange(bytes.fromhex(vec["hex"]), PEERS["limits"]["max_peers"])
    assert {p.to_base58(): [str(a) for a in addrs] for p, addrs in found.items()} == vec["expect"]["peers"]


def test_generator_reproduces_the_stream_vectors() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_stream_vectors.py"), "--check"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
