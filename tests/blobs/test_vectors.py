"""protocols/vectors/blob-transfer-v1.json: our encoder produces the vectors and our decoder
reads them back (manifest, stream frames, lane frames)."""

from __future__ import annotations

import json
from pathlib import Path

from fednode.blobs.lane import DIALER, LISTENER, LaneChannel
from fednode.blobs.manifest import decode_manifest, manifest_of_bytes
from fednode.blobs.protocol import FrameReader, StreamChannel

VECTORS = json.loads((Path(__file__).parents[2] / "protocols/vectors/blob-transfer-v1.json").read_text())
BLOB = bytes(i % 251 for i in range(VECTORS["blob_size"]))


class _Pipe:
    """Stands in for a stream/socket: serves fixed bytes to receive_some."""

    remote_peer_id = "peer"

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        out, self.data = self.data[:max_bytes], self.data[max_bytes:]
        return out


def test_manifest_vector() -> None:
    m = manifest_of_bytes(BLOB, VECTORS["chunk_size"])
    assert m.sha256 == VECTORS["sha256"]
    assert [h.hex() for h in m.chunk_hashes] == VECTORS["chunk_hashes"]
    assert m.encode().hex() == VECTORS["manifest_hex"] and m.digest() == VECTORS["manifest_digest"]
    assert decode_manifest(bytes.fromhex(VECTORS["manifest_hex"])) == m


async def test_stream_frame_vectors() -> None:
    ch = StreamChannel(_Pipe())  # type: ignore[arg-type]
    sha = VECTORS["sha256"]
    f = VECTORS["frames"]
    assert ch.encode_frame({"t": "get_manifest", "sha256": sha}).hex() == f["get_manifest"]
    assert ch.encode_frame({"t": "get_chunks", "sha256": sha, "idx": [0, 2]}).hex() == f["get_chunks"]
    assert ch.encode_frame({"t": "chunk", "i": 2}, BLOB[8192:]).hex() == f["chunk_2"]
    reader = FrameReader(_Pipe(bytes.fromhex(f["chunk_2"] + f["done"])).receive_some, 1024)
    assert await reader.read_frame(4096) == ({"t": "chunk", "i": 2, "n": len(BLOB) - 8192}, BLOB[8192:])
    assert await reader.read_frame(0) == ({"t": "done"}, b"")
    assert await reader.read_frame(0) is None


async def test_lane_frame_vectors() -> None:
    v = VECTORS["lane"]
    key = bytes.fromhex(v["key"])
    sha = VECTORS["sha256"]
    dialer = LaneChannel(_Pipe(), key, DIALER, "p")  # type: ignore[arg-type]
    assert dialer.encode_frame({"t": "lane_hello"}).hex() == v["dialer_frame_0_lane_hello"]
    assert dialer.encode_frame({"t": "get_chunks", "sha256": sha, "idx": [2]}).hex() == v["dialer_frame_1_get_chunks"]
    listener_in = LaneChannel(  # the listener reads what the dialer sent
        _Pipe(bytes.fromhex(v["dialer_frame_0_lane_hello"] + v["dialer_frame_1_get_chunks"])),  # type: ignore[arg-type]
        key, LISTENER, "p",
    )
    assert (await listener_in.receive_frame(0)) == ({"t": "lane_hello"}, b"")
    assert (await listener_in.receive_frame(0)) == ({"t": "get_chunks", "sha256": sha, "idx": [2]}, b"")
    listener = LaneChannel(_Pipe(), key, LISTENER, "p")  # type: ignore[arg-type]
    assert listener.encode_frame({"t": "chunk", "i": 2}, BLOB[8192:]).hex() == v["listener_frame_0_chunk_2"]
    dialer_in = LaneChannel(_Pipe(bytes.fromhex(v["listener_frame_0_chunk_2"])), key, DIALER, "p")  # type: ignore[arg-type]
    frame = await dialer_in.receive_frame(4096)
    assert frame is not None and frame[0]["i"] == 2 and frame[1] == BLOB[8192:]
