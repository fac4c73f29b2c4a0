from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fednode.blobs.manifest import MIN_CHUNK_SIZE, ManifestLimits, manifest_of_bytes
from fednode.blobs.store import BlobStore
from fednode.errors import BlobIntegrityError, LimitExceeded

DATA = os.urandom(10 * MIN_CHUNK_SIZE + 123)
SHA = hashlib.sha256(DATA).hexdigest()


def _store(tmp_path: Path, **kw: object) -> BlobStore:
    return BlobStore(tmp_path / "blobs", chunk_size=MIN_CHUNK_SIZE, **kw)  # type: ignore[arg-type]


def test_put_read_has_size_delete(tmp_path: Path) -> None:
    s = _store(tmp_path)
    assert s.put_bytes(DATA) == SHA
    assert s.has(SHA) and s.size(SHA) == len(DATA) and s.read(SHA) == DATA
    assert s.list_blobs() == [SHA]
    assert s.manifest(SHA) == manifest_of_bytes(DATA, MIN_CHUNK_SIZE)
    src = tmp_path / "src"
    src.write_bytes(DATA)
    assert s.put_file(src) == SHA
    s.delete(SHA)
    assert not s.has(SHA)
    with pytest.raises(KeyError):
        s.read(SHA)


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    s = _store(tmp_path)
    with s.writer() as w:
        w.write(DATA[:1000])
        # not committed: nothing visible, the temp file is removed on exit
    assert s.list_blobs() == [] and not list(s.root.glob(".tmp-*"))
    with pytest.raises(BlobIntegrityError), s.writer() as w:
        w.write(DATA)
        w.commit(expected_sha256="0" * 64)
    assert s.list_blobs() == [] and not list(s.root.glob(".tmp-*"))
    with pytest.raises(LimitExceeded), s.writer(max_bytes=100) as w:
        w.write(DATA)
    assert not list(s.root.glob(".tmp-*"))
    # a crash mid-write leaves a temp file: the next open removes it and never serves it
    (s.root / ".tmp-crashed").write_bytes(b"partial")
    s2 = _store(tmp_path)
    assert not list(s2.root.glob(".tmp-*")) and s2.list_blobs() == []


def test_verify_on_read_quarantines_corrupt_blobs(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.put_bytes(DATA)
    m = s.manifest(SHA)
    bad = bytearray(DATA)
    bad[5000] ^= 1
    s.path(SHA).write_bytes(bytes(bad))
    assert s.read_chunk(m, 0) == DATA[:MIN_CHUNK_SIZE]  # chunk 0 is intact
    with pytest.raises(BlobIntegrityError):
        s.read_chunk(m, 1)
    assert not s.has(SHA)
    assert len(list((s.root / "quarantine").iterdir())) == 1
    s.path(SHA).write_bytes(bytes(bad))
    with pytest.raises(BlobIntegrityError):
        s.read(SHA)
    assert not s.has(SHA) and len(list((s.root / "quarantine").iterdir())) == 2


def test_partial_resumes_only_durable_verified_chunks(tmp_path: Path) -> None:
    s = _store(tmp_path, partial_flush_bytes=1 << 30)
    m = manifest_of_bytes(DATA, MIN_CHUNK_SIZE)
    p = s.open_partial(m)
    assert p.missing() == list(range(11))

    def chunk(i: int) -> bytes:
        return DATA[i * MIN_CHUNK_SIZE : (i + 1) * MIN_CHUNK_SIZE]

    with pytest.raises(BlobIntegrityError):
        p.write_chunk(2, chunk(3))
    for i in (0, 2, 10):
        p.write_chunk(i, chunk(i))
    p.flush()
    p.write_chunk(5, chunk(5))  # written but never flushed: a crash now must not claim it
    # "crash": the file handle goes away without close()/flush(); a new store resumes from disk
    p._data.close()
    s2 = _store(tmp_path)
    assert s2.partial_manifest(SHA) == m
    p2 = s2.open_partial(m)
    assert p2.missing() == [1, 3, 4, 5, 6, 7, 8, 9]
    for i in p2.missing():
        p2.write_chunk(i, chunk(i))
    assert p2.complete() == SHA
    assert s2.read(SHA) == DATA and s2.partial_manifest(SHA) is None


def test_forged_manifest_is_caught_at_completion(tmp_path: Path) -> None:
    s = _store(tmp_path)
    other = os.urandom(len(DATA))
    fake = manifest_of_bytes(other, MIN_CHUNK_SIZE)
    forged = type(fake)(SHA, fake.size, fake.chunk_size, fake.chunk_hashes)  # claims DATA's address
    p = s.open_partial(forged)
    for i in range(forged.num_chunks):
        off, n = forged.chunk_range(i)
        p.write_chunk(i, other[off : off + n])
    with pytest.raises(BlobIntegrityError, match="forged"):
        p.complete()
    assert not s.has(SHA) and s.partial_manifest(SHA) is None


def test_oversize_partial_is_refused_before_allocation(tmp_path: Path) -> None:
    s = _store(tmp_path, limits=ManifestLimits(max_blob_bytes=1000))
    with pytest.raises(LimitExceeded):
        s.open_partial(manifest_of_bytes(DATA, MIN_CHUNK_SIZE))
    assert list((s.root / "partial").iterdir()) == []
