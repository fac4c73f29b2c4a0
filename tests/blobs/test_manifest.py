from __future__ import annotations

import contextlib
import hashlib
import io
import itertools

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednode.blobs.manifest import (
    MIN_CHUNK_SIZE,
    BlobManifest,
    ManifestBuilder,
    ManifestLimits,
    decode_manifest,
    manifest_of_bytes,
    manifest_of_file,
)
from fednode.errors import DecodeError, LimitExceeded


def test_manifest_of_bytes_hashes_whole_and_chunks() -> None:
    data = bytes(range(256)) * 100  # 25600 bytes
    m = manifest_of_bytes(data, chunk_size=MIN_CHUNK_SIZE)
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    assert m.num_chunks == 7  # 6 full chunks of 4096 + 1024
    assert m.chunk_range(6) == (6 * 4096, 1024)
    assert m.chunk_hashes[6] == hashlib.sha256(data[6 * 4096 :]).digest()
    assert m.chunk_matches(0, data[:4096]) and not m.chunk_matches(0, data[1:4097])
    assert decode_manifest(m.encode()) == m
    assert manifest_of_file(io.BytesIO(data), MIN_CHUNK_SIZE) == m


def test_empty_blob_has_no_chunks() -> None:
    m = manifest_of_bytes(b"")
    assert m.num_chunks == 0 and m.size == 0
    assert decode_manifest(m.encode()) == m


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=20000), st.lists(st.integers(0, 20000), max_size=5))
def test_builder_is_split_invariant(data: bytes, cuts: list[int]) -> None:
    b = ManifestBuilder(MIN_CHUNK_SIZE)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for lo, hi in itertools.pairwise(points):
        b.update(data[lo:hi])
    assert b.finish() == manifest_of_bytes(data, MIN_CHUNK_SIZE)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decode_of_random_bytes_raises_only_typed_errors(data: bytes) -> None:
    with contextlib.suppress(DecodeError, LimitExceeded):
        decode_manifest(data)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(-(2**63), 2**64 - 1), st.binary(max_size=70), st.text(max_size=5), st.none()),
        max_size=6,
    )
)
def test_decode_of_random_arrays_raises_only_typed_errors(items: list[object]) -> None:
    with contextlib.suppress(DecodeError, LimitExceeded):
        decode_manifest(msgpack.packb(items, use_bin_type=True))


def test_non_canonical_encoding_is_rejected() -> None:
    m = manifest_of_bytes(b"x" * 5000, MIN_CHUNK_SIZE)
    version, digest, size, chunk_size, hashes = msgpack.unpackb(m.encode())
    # same values, but the size as a 64-bit uint instead of the shortest form
    body = msgpack.packb([version, digest], use_bin_type=True)[1:]  # drop array header
    tampered = b"\x95" + body + b"\xcf" + size.to_bytes(8, "big") + msgpack.packb(chunk_size) + msgpack.packb(
        hashes, use_bin_type=True
    )
    with pytest.raises(DecodeError, match="canonical"):
        decode_manifest(tampered)


def test_limits_are_enforced() -> None:
    m = manifest_of_bytes(b"y" * 50000, MIN_CHUNK_SIZE)
    with pytest.raises(LimitExceeded, match="max_blob_bytes"):
        decode_manifest(m.encode(), ManifestLimits(max_blob_bytes=40000))
    with pytest.raises(LimitExceeded):
        decode_manifest(m.encode(), ManifestLimits(max_chunks=5))
    with pytest.raises(LimitExceeded, match="max_chunks"):
        m.check_limits(ManifestLimits(max_chunks=5))
    with pytest.raises(DecodeError):
        BlobManifest(m.sha256, m.size, m.chunk_size, m.chunk_hashes[:-1])
