"""Chunk manifests of content-addressed blobs: pure, no I/O beyond bytes and file objects.

A blob is addressed by the sha256 of its bytes. Its manifest names that digest, the size, the
chunk size and the sha256 of every chunk, so a fetcher can verify each chunk as it arrives and
fetch different chunks from different holders. The canonical encoding is a msgpack array
(see protocols/blob-transfer-v1.md, "Manifest"); decoding accepts only that exact encoding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import msgpack

from fednode.errors import DecodeError, LimitExceeded, LocalProtocolError

MANIFEST_VERSION = 1
HASH_BYTES = 32
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB
MIN_CHUNK_SIZE = 1 << 12  # 4 KiB: smaller chunks make manifests bigger than they save
MAX_CHUNK_SIZE = 1 << 22  # 4 MiB: bounds the receiver's per-chunk buffer
DEFAULT_MAX_BLOB_BYTES = 1 << 30  # 1 GiB
DEFAULT_MAX_CHUNKS = 1 << 14  # 16384 chunks -> manifest <= 512 KiB of hashes


@dataclass(frozen=True, slots=True)
class ManifestLimits:
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES
    max_chunks: int = DEFAULT_MAX_CHUNKS

    @property
    def max_encoded_bytes(self) -> int:
        # array header + version + 3 uints + bin header + hashes; generous fixed overhead
        return 64 + HASH_BYTES * (self.max_chunks + 1)


DEFAULT_MANIFEST_LIMITS = ManifestLimits()


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


def _is_hex_digest(value: str) -> bool:
    return len(value) == 2 * HASH_BYTES and all(c in "0123456789abcdef" for c in value)


def check_hex_digest(value: str) -> str:
    """Returns value if it is a lowercase sha256 hex digest, else raises DecodeError."""
    if not isinstance(value, str) or not _is_hex_digest(value):
        raise DecodeError(f"not a lowercase sha256 hex digest: {value!r:.80}")
    return value


@dataclass(frozen=True, slots=True)
class BlobManifest:
    """sha256: hex digest of the whole blob (its address); chunk_hashes: raw 32-byte digests."""

    sha256: str
    size: int
    chunk_size: int
    chunk_hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not _is_hex_digest(self.sha256):
            raise DecodeError(f"manifest sha256 is not a lowercase hex digest: {self.sha256!r:.80}")
        if not isinstance(self.size, int) or self.size < 0:
            raise DecodeError(f"manifest size must be a non-negative int, got {self.size!r}")
        if not isinstance(self.chunk_size, int) or not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise DecodeError(
                f"manifest chunk_size {self.chunk_size!r} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
            )
        if len(self.chunk_hashes) != chunk_count(self.size, self.chunk_size):
            raise DecodeError(
                f"manifest has {len(self.chunk_hashes)} chunk hashes, size {self.size} and chunk size "
                f"{self.chunk_size} need {chunk_count(self.size, self.chunk_size)}"
            )
        for h in self.chunk_hashes:
            if not isinstance(h, bytes) or len(h) != HASH_BYTES:
                raise DecodeError("manifest chunk hash is not 32 bytes")

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_hashes)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index`."""
        if not 0 <= index < self.num_chunks:
            raise LocalProtocolError(f"chunk index {index} out of range 0..{self.num_chunks - 1}")
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def chunk_matches(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        _, length = self.chunk_range(index)
        return len(data) == length and hashlib.sha256(data).digest() == self.chunk_hashes[index]

    def check_limits(self, limits: ManifestLimits = DEFAULT_MANIFEST_LIMITS) -> None:
        if self.size > limits.max_blob_bytes:
            raise LimitExceeded(f"blob size {self.size} > max_blob_bytes {limits.max_blob_bytes}")
        if self.num_chunks > limits.max_chunks:
            raise LimitExceeded(f"blob has {self.num_chunks} chunks > max_chunks {limits.max_chunks}")

    def encode(self) -> bytes:
        """Canonical bytes: msgpack [version, sha256(32 raw), size, chunk_size, concatenated hashes]."""
        packed: bytes = msgpack.packb(
            [MANIFEST_VERSION, bytes.fromhex(self.sha256), self.size, self.chunk_size,
             b"".join(self.chunk_hashes)],
            use_bin_type=True,
        )
        return packed

    def digest(self) -> str:
        """sha256 hex of the canonical encoding: holders that agree on a manifest agree on this."""
        return hashlib.sha256(self.encode()).hexdigest()


def decode_manifest(data: bytes, limits: ManifestLimits = DEFAULT_MANIFEST_LIMITS) -> BlobManifest:
    """Strict decode: raises DecodeError (malformed / non-canonical) or LimitExceeded, nothing else."""
    if len(data) > limits.max_encoded_bytes:
        raise LimitExceeded(f"manifest of {len(data)} bytes > {limits.max_encoded_bytes}")
    try:
        obj = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True,
            max_bin_len=limits.max_encoded_bytes, max_str_len=0, max_array_len=5, max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"manifest is not valid msgpack: {exc}") from None
    if not isinstance(obj, list) or len(obj) != 5:
        raise DecodeError("manifest must be a 5-element msgpack array")
    version, digest, size, chunk_size, hashes = obj
    if version != MANIFEST_VERSION or type(version) is not int:
        raise DecodeError(f"unsupported manifest version {version!r:.40}")
    if not isinstance(digest, bytes) or len(digest) != HASH_BYTES:
        raise DecodeError("manifest digest must be 32 raw bytes")
    if type(size) is not int or type(chunk_size) is not int:
        raise DecodeError("manifest size and chunk_size must be integers")
    if not isinstance(hashes, bytes) or len(hashes) % HASH_BYTES:
        raise DecodeError("manifest chunk hashes must be a multiple of 32 raw bytes")
    if size > limits.max_blob_bytes:
        raise LimitExceeded(f"blob size {size} > max_blob_bytes {limits.max_blob_bytes}")
    manifest = BlobManifest(
        sha256=digest.hex(), size=size, chunk_size=chunk_size,
        chunk_hashes=tuple(hashes[i : i + HASH_BYTES] for i in range(0, len(hashes), HASH_BYTES)),
    )
    manifest.check_limits(limits)
    if manifest.encode() != data:
        raise DecodeError("manifest encoding is not canonical")
    return manifest


class ManifestBuilder:
    """Builds a manifest incrementally from a stream of bytes of any split (hashes while fed)."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise LocalProtocolError(f"chunk_size {chunk_size} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
        self.chunk_size = chunk_size
        self._whole = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._in_chunk = 0
        self._size = 0
        self._hashes: list[bytes] = []

    @property
    def size(self) -> int:
        return self._size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        self._whole.update(view)
        self._size += len(view)
        while len(view):
            take = min(len(view), self.chunk_size - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == self.chunk_size:
                self._hashes.append(self._chunk.digest())
                self._chunk = hashlib.sha256()
                self._in_chunk = 0

    def finish(self) -> BlobManifest:
        hashes = list(self._hashes)
        if self._in_chunk:
            hashes.append(self._chunk.digest())
        return BlobManifest(self._whole.hexdigest(), self._size, self.chunk_size, tuple(hashes))


def manifest_of_bytes(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BlobManifest:
    builder = ManifestBuilder(chunk_size)
    builder.update(data)
    return builder.finish()


def manifest_of_chunks(chunks: Iterable[bytes], chunk_size: int = DEFAULT_CHUNK_SIZE) -> BlobManifest:
    builder = ManifestBuilder(chunk_size)
    for piece in chunks:
        builder.update(piece)
    return builder.finish()


def manifest_of_file(f: BinaryIO, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BlobManifest:
    """Streams the file from its current position to EOF, one chunk in memory at a time."""
    builder = ManifestBuilder(chunk_size)
    while piece := f.read(chunk_size):
        builder.update(piece)
    return builder.finish()
