"""An adversarial peer for tests: it speaks fednode's protocol with bad intent.

It attaches to the same `MemoryNetwork` as honest daemons with a bare transport (no daemon, no
validator of its own), publishes raw bytes on the community topic and opens or serves raw
`/fednode/blob/1.0.0` streams. Everything it sends is built here, byte by byte where the attack
is about bytes (forged signatures, non-canonical encodings, wrong types, oversize), and with the
real codec where the attack is about meaning (a valid signature on a poisoned delta).

    adversary = Adversary(network, identity, community_id="test", clock=clock, data_dir=tmp / "adv")
    async with adversary.attached():
        await adversary.publish_raw(adversary.forge(heartbeat_naming_someone_else))
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import torch
import trio

from fednode.aggregation.delta import dump_delta
from fednode.blobs.manifest import BlobManifest, manifest_of_bytes
from fednode.blobs.protocol import (
    CHUNK,
    DONE,
    ERR_NOT_FOUND,
    GET_CHUNKS,
    GET_MANIFEST,
    MANIFEST,
    PROTOCOL_ID,
    StreamChannel,
    error_header,
)
from fednode.blobs.serve import BlobServer, serve_blobs
from fednode.blobs.store import BlobStore
from fednode.errors import FednodeError
from fednode.identity import Identity
from fednode.node.trainers import FAKE_LAYOUT
from fednode.transport.base import Stream
from fednode.transport.memory import MemoryLimits, MemoryNetwork, MemoryTransport, open_memory_transport
from fednode.wire import codec
from fednode.wire.messages import Heartbeat, Message, RoundManifest, SubmissionAnnounce

DEFAULT_ADVERSARY_MAX_MESSAGE = 1 << 20  # the adversary's own transport lets it publish oversize messages
DEFAULT_MAX_CAPTURED = 4096  # honest messages the adversary keeps for replays


# -- poisoned deltas (the FakeTrainer layout, bent) ----------------------------------------------
def good_delta(scale: float = 0.1, seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=gen) for k, s in FAKE_LAYOUT.items()}


def bad_delta(kind: str) -> bytes:
    """Safetensors bytes (or not) that a coordinator must refuse: see BAD_DELTA_KINDS."""
    tensors = good_delta()
    first = sorted(tensors)[0]
    if kind == "wrong_shape":
        tensors[first] = torch.zeros(tensors[first].shape[0] + 1, tensors[first].shape[1])
    elif kind == "nan":
        tensors[first][0, 0] = float("nan")
    elif kind == "huge_norm":
        tensors = {k: v * 1e9 for k, v in tensors.items()}
    elif kind == "extra_key":
        tensors["base_model.model.backdoor.weight"] = torch.ones(2, 2)
    elif kind == "not_safetensors":
        return b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + secrets.token_bytes(64)
    else:
        raise ValueError(kind)
    return dump_delta(tensors)


BAD_DELTA_KINDS = ("wrong_shape", "nan", "huge_norm", "extra_key", "not_safetensors")


# -- malformed control messages ------------------------------------------------------------------
def non_canonical(message: Message) -> bytes:
    """A validly signed message in a second encoding of the same map (keys in reverse order)."""
    canonical = msgpack.unpackb(codec.encode(message), raw=False)
    reordered = {k: canonical[k] for k in reversed(list(canonical))}
    return bytes(msgpack.packb(reordered, use_bin_type=True, use_single_float=False))


def with_field(message: Message, **fields: Any) -> bytes:
    """The message's canonical map with fields replaced by values of any type (e.g. a str term)."""
    raw = msgpack.unpackb(codec.encode(message), raw=False)
    raw.update(fields)
    return bytes(msgpack.packb({k: raw[k] for k in sorted(raw)}, use_bin_type=True, use_single_float=False))


@dataclasses.dataclass
class Lie:
    """Serve `payload` when asked for `announced_sha`, under `manifest` (genuine or forged)."""

    announced_sha: str
    manifest: BlobManifest
    payload: bytes


class Adversary:
    def __init__(self, network: MemoryNetwork, identity: Identity, *, community_id: str,
                 clock: Callable[[], float], data_dir: Path,
                 max_message_size: int = DEFAULT_ADVERSARY_MAX_MESSAGE) -> None:
        self.network = network
        self.identity = identity
        self.node_id = identity.node_id
        self.community_id = community_id
        self.topic = codec.topic_for(community_id)
        self.clock = clock
        self.store = BlobStore(data_dir / "blobs")
        self.limits = MemoryLimits(max_message_size=max_message_size)
        self.transport: MemoryTransport | None = None
        self.blob_server: BlobServer | None = None
        self.captured: list[bytes] = []  # honest messages as they came by (bounded)
        self.manifests: dict[int, RoundManifest] = {}  # round number -> first manifest seen
        self.submissions: list[SubmissionAnnounce] = []
        self.new_manifest = trio.Event()
        self.lies: dict[str, Lie] = {}
        self.published = 0
        self._seq = 0
        self._nursery: trio.Nursery | None = None

    # -- lifecycle --------------------------------------------------------------------------
    @asynccontextmanager
    async def attached(self) -> AsyncIterator[Adversary]:
        async with open_memory_transport(self.network, self.identity, limits=self.limits) as transport, \
                trio.open_nursery() as nursery:
            self.transport, self._nursery = transport, nursery
            self.blob_server = await nursery.start(functools.partial(serve_blobs, transport, self.store,
                                                                     lane_bind_host=None))
            subscription = await transport.subscribe(self.topic)
            nursery.start_soon(self._capture, subscription)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    async def _capture(self, subscription: Any) -> None:
        async for gossip in subscription:
            if gossip.received_from == self.node_id:
                continue
            if len(self.captured) < DEFAULT_MAX_CAPTURED:
                self.captured.append(gossip.data)
            try:
                message = codec.decode(gossip.data, max_bytes=len(gossip.data))
            except FednodeError:
                continue
            if isinstance(message, RoundManifest) and message.round_number not in self.manifests:
                self.manifests[message.round_number] = message
                self.new_manifest.set()
                self.new_manifest = trio.Event()
            elif isinstance(message, SubmissionAnnounce):
                self.submissions.append(message)

    async def wait_manifest(self, round_number: int) -> RoundManifest:
        while round_number not in self.manifests:
            await self.new_manifest.wait()
        return self.manifests[round_number]

    # -- gossip out -------------------------------------------------------------------------
    async def publish_raw(self, data: bytes) -> None:
        assert self.transport is not None
        await self.transport.publish(self.topic, data)
        self.published += 1

    def signed(self, message: Message) -> bytes:
        """Our own message, properly signed: valid on the wire (membership aside)."""
        return codec.encode(codec.sign(message, self.identity))

    def forge(self, message: Message) -> bytes:
        """`message` names another author but carries *our* signature over its signing bytes."""
        unsigned = dataclasses.replace(message, **{message.SIG_FIELD: b""})  # type: ignore[type-var]
        sig = self.identity.sign(codec.signing_bytes(unsigned))
        return codec.encode(dataclasses.replace(unsigned, **{message.SIG_FIELD: sig}))  # type: ignore[type-var]

    def heartbeat(self, *, sent_at: float | None = None, federated: bool = False,
                  node_id: str | None = None) -> Heartbeat:
        self._seq += 1
        return Heartbeat(community_id=self.community_id, node_id=node_id or self.node_id, term=0, seq=self._seq,
                         sent_at=self.clock() if sent_at is None else sent_at, federated_learning=federated)

    async def heartbeat_forever(self, *, federated: bool, interval: float = 1.0) -> None:
        while True:
            await self.publish_raw(self.signed(self.heartbeat(federated=federated)))
            await trio.sleep(interval)

    async def flood_heartbeats(self, count: int) -> None:
        """`count` distinct, validly signed heartbeats, back to back."""
        for _ in range(count):
            await self.publish_raw(self.signed(self.heartbeat()))

    def submission(self, manifest: RoundManifest, *, delta_sha256: str, delta_size: int,
                   num_samples: int = 1000) -> SubmissionAnnounce:
        return SubmissionAnnounce(round_id=manifest.round_id, participant_node_id=self.node_id,
                                  num_samples=num_samples, submitted_at=self.clock(),
                                  community_id=self.community_id, delta_sha256=delta_sha256, delta_size=delta_size)

    async def submit_blob(self, manifest: RoundManifest, blob: bytes) -> str:
        """Store `blob` (served by our honest-looking blob server) and announce it as our update."""
        sha = self.store.put_bytes(blob)
        await self.publish_raw(self.signed(self.submission(manifest, delta_sha256=sha, delta_size=len(blob))))
        return sha

    # -- lying blob server ------------------------------------------------------------------
    def serve_lies(self) -> None:
        """Replace our blob server with one that answers from `self.lies` only."""
        assert self.transport is not None
        self.transport.serve(PROTOCOL_ID, self._lying_handler)

    def lie_about(self, *, announced: bytes, served: bytes, forged_manifest: bool) -> Lie:
        """Announce sha256(announced); serve `served` (same length) instead. With forged_manifest
        the manifest's chunk hashes match the served bytes (only the whole-blob hash can tell);
        without, it is the genuine manifest of `announced` (every chunk fails verification)."""
        assert len(announced) == len(served)
        sha = hashlib.sha256(announced).hexdigest()
        chunk = 4096
        manifest = manifest_of_bytes(served if forged_manifest else announced, chunk)
        manifest = dataclasses.replace(manifest, sha256=sha)
        lie = Lie(sha, manifest, served)
        self.lies[sha] = lie
        return lie

    async def _lying_handler(self, stream: Stream) -> None:
        channel = StreamChannel(stream)
        with trio.move_on_after(60):
            while (frame := await channel.receive_frame(0)) is not None:
                header, _ = frame
                lie = self.lies.get(str(header.get("sha256")))
                if lie is None:
                    await channel.send_frame(error_header(ERR_NOT_FOUND, "no"))
                elif header["t"] == GET_MANIFEST:
                    await channel.send_frame({"t": MANIFEST}, lie.manifest.encode())
                elif header["t"] == GET_CHUNKS:
                    for i in header.get("idx", []):
                        start, end = lie.manifest.chunk_range(i)
                        await channel.send_frame({"t": CHUNK, "i": i}, lie.payload[start:end])
                    await channel.send_frame({"t": DONE})

    # -- stalled streams --------------------------------------------------------------------
    async def stall_blob_streams(self, target: str, count: int) -> list[Stream]:
        """Open `count` blob streams to `target` and stall them three ways: silent, half a frame
        prefix, or one request whose answer is never read. Returns the streams (still open)."""
        assert self.transport is not None
        streams: list[Stream] = []
        for i in range(count):
            stream = await self.transport.open_stream(target, PROTOCOL_ID)
            streams.append(stream)
            mode = i % 3
            if mode == 1:
                await stream.send_all(b"\x00\x00")  # two of the four length-prefix bytes, then nothing
            elif mode == 2:
                await StreamChannel(stream).send_frame({"t": GET_MANIFEST, "sha256": "0" * 64})
        return streams
