"""Content-addressed blob store on disk: atomic writes, verify-on-read, resumable partials.

Layout under `root` (all on one filesystem, so renames are atomic):
    <sha256>                 complete blobs, named by the sha256 hex of their bytes
    .tmp-*                   writes in progress (removed on open; never read)
    manifests/<sha256>       cached canonical manifests of complete blobs (an optimisation only)
    partial/<sha256>/        a download in progress: manifest, data (sparse, full size), bitmap
    quarantine/<sha256>.<ns> files that failed verification, kept for inspection

Crash safety: a complete blob appears only by rename of an fsynced temp file (then the directory
is fsynced). A partial's bitmap claims a chunk only after the data file was fsynced with it, and
the bitmap itself is replaced atomically; the whole blob is hashed again before it is promoted.
All methods block: call them from `trio.to_thread.run_sync` in async code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from fednode.blobs.manifest import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MANIFEST_LIMITS,
    BlobManifest,
    ManifestBuilder,
    ManifestLimits,
    check_hex_digest,
    decode_manifest,
)
from fednode.errors import BlobIntegrityError, BlobMissing, DecodeError, FednodeError, LimitExceeded

DEFAULT_READ_BLOCK = 1 << 20
# fsync data + persist the bitmap at least this often: a crash re-fetches at most this much
DEFAULT_PARTIAL_FLUSH_BYTES = 32 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(6)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class BlobWriter:
    """Streams bytes into a temp file while hashing them; `commit()` renames it into place."""

    def __init__(self, store: BlobStore, max_bytes: int, chunk_size: int) -> None:
        self._store = store
        self._max = max_bytes
        self._tmp = store.root / f".tmp-{secrets.token_hex(8)}"
        self._file: BinaryIO | None = open(self._tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        self._builder = ManifestBuilder(chunk_size)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._file is None:
            raise FednodeError("write to a closed BlobWriter")
        if self._builder.size + len(data) > self._max:
            self.abort()
            raise LimitExceeded(f"blob larger than max_blob_bytes {self._max}")
        self._builder.update(data)
        self._file.write(data)

    def commit(self, expected_sha256: str | None = None) -> str:
        if self._file is None:
            raise FednodeError("commit of a closed BlobWriter")
        manifest = self._builder.finish()
        if expected_sha256 is not None and manifest.sha256 != expected_sha256:
            self.abort()
            raise BlobIntegrityError(f"written bytes hash to {manifest.sha256}, expected {expected_sha256}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self._store.path(manifest.sha256))
        _fsync_dir(self._store.root)
        self._store._cache_manifest(manifest)
        return manifest.sha256

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._file is not None:
            self.abort()


class VerifyingReader:
    """A read-only file over one blob that hashes what is read; at EOF a mismatch quarantines the
    file and raises BlobIntegrityError, so a caller that reads to the end never gets bad bytes silently."""

    def __init__(self, store: BlobStore, sha256: str) -> None:
        self._store = store
        self.sha256 = sha256
        self._file: BinaryIO = open(store.path(sha256), "rb")  # noqa: SIM115 - closed in close()
        self._hash = hashlib.sha256()

    def read(self, n: int = DEFAULT_READ_BLOCK) -> bytes:
        data = self._file.read(n)
        if data:
            self._hash.update(data)
        elif self._hash.hexdigest() != self.sha256:
            self._file.close()
            self._store.quarantine(self.sha256)
            raise BlobIntegrityError(f"blob {self.sha256} on disk does not match its address")
        return data

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class PartialBlob:
    """A download in progress. `write_chunk` verifies against the manifest before writing; the
    bitmap of verified chunks survives crashes (see module docstring)."""

    def __init__(self, store: BlobStore, manifest: BlobManifest, flush_bytes: int) -> None:
        self.store = store
        self.manifest = manifest
        self.dir = store.root / "partial" / manifest.sha256
        self._flush_bytes = flush_bytes
        self._unflushed = 0
        n = manifest.num_chunks
        bitmap_path = self.dir / "bitmap"
        existing = self.dir / "manifest"
        resumed = False
        if existing.exists():
            try:
                resumed = existing.read_bytes() == manifest.encode() and bitmap_path.exists()
            except OSError:
                resumed = False
            if not resumed:
                self._remove_dir()
        bits = bytearray((n + 7) // 8)
        if resumed:
            stored = bitmap_path.read_bytes()
            if len(stored) == len(bits):
                bits = bytearray(stored)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / "data", "wb") as f:
                f.truncate(manifest.size)  # sparse; the size was checked against limits already
            _atomic_write(bitmap_path, bytes(bits))
            _atomic_write(existing, manifest.encode())
        self._bits = bits
        self._flusher: threading.Thread | None = None
        self._whole = hashlib.sha256()
        self._hash_next = 0  # chunks [0, _hash_next) are in _whole
        self._data: BinaryIO = open(self.dir / "data", "r+b")  # noqa: SIM115 - closed in close()

    def has_chunk(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def missing(self) -> list[int]:
        return [i for i in range(self.manifest.num_chunks) if not self.has_chunk(i)]

    def verified_count(self) -> int:
        return self.manifest.num_chunks - len(self.missing())

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Raises BlobIntegrityError (nothing written) when data does not match the manifest."""
        if not self.manifest.chunk_matches(index, data):
            raise BlobIntegrityError(f"chunk {index} of {self.manifest.sha256} does not match its hash")
        offset, _ = self.manifest.chunk_range(index)
        os.pwrite(self._data.fileno(), data, offset)
        self._bits[index >> 3] |= 1 << (index & 7)
        self._unflushed += len(data)
        # hash the verified prefix as it grows, so complete() need not read the blob again
        while self._hash_next < self.manifest.num_chunks and self.has_chunk(self._hash_next):
            if self._hash_next == index:
                self._whole.update(data)
            else:
                off, length = self.manifest.chunk_range(self._hash_next)
                self._whole.update(os.pread(self._data.fileno(), length, off))
            self._hash_next += 1
        if self._unflushed >= self._flush_bytes and (self._flusher is None or not self._flusher.is_alive()):
            # fsync in the background (it can take a disk's worth of time) so writes go on; the
            # bitmap it records is a snapshot taken before the fsync, so it never claims a chunk
            # that is not yet durable
            self._unflushed = 0
            self._flusher = threading.Thread(target=self._checkpoint, args=(bytes(self._bits),), daemon=True)
            self._flusher.start()

    def _checkpoint(self, bits: bytes) -> None:
        try:
            os.fsync(self._data.fileno())
            _atomic_write(self.dir / "bitmap", bits)
        except (OSError, ValueError):  # closed or discarded meanwhile: the next flush retries
            self._unflushed = max(self._unflushed, 1)

    def _join_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None

    def flush(self) -> None:
        """Makes every chunk written so far durable, then records it in the bitmap."""
        self._join_flusher()
        if not self._unflushed:
            return
        self._unflushed = 0
        self._checkpoint(bytes(self._bits))

    def complete(self) -> str:
        """Hashes the whole data file and promotes it to a complete blob. A mismatch (a manifest
        whose chunk hashes do not add up to its address) discards the partial and raises."""
        if self.missing():
            raise FednodeError(f"partial {self.manifest.sha256} still misses chunks")
        self._join_flusher()
        self._data.flush()
        os.fsync(self._data.fileno())
        h = self._whole
        if self._hash_next < self.manifest.num_chunks:  # e.g. an empty blob, or nothing written here
            h = hashlib.sha256()
            self._data.seek(0)
            while block := self._data.read(DEFAULT_READ_BLOCK):
                h.update(block)
        self._data.close()
        if h.hexdigest() != self.manifest.sha256:
            self.discard()
            raise BlobIntegrityError(
                f"all chunks match the manifest but the blob hashes to {h.hexdigest()}, "
                f"not {self.manifest.sha256}: the manifest was forged"
            )
        os.replace(self.dir / "data", self.store.path(self.manifest.sha256))
        _fsync_dir(self.store.root)
        self.store._cache_manifest(self.manifest)
        self._remove_dir()
        return self.manifest.sha256

    def close(self) -> None:
        """Keeps the partial on disk for a later resume."""
        if not self._data.closed:
            self.flush()
            self._data.close()

    def discard(self) -> None:
        self._join_flusher()
        if not self._data.closed:
            self._data.close()
        self._remove_dir()

    def _remove_dir(self) -> None:
        if self.dir.exists():
            for child in self.dir.iterdir():
                child.unlink()
            self.dir.rmdir()


class BlobStore:
    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        limits: ManifestLimits = DEFAULT_MANIFEST_LIMITS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        partial_flush_bytes: int = DEFAULT_PARTIAL_FLUSH_BYTES,
    ) -> None:
        self.root = Path(root)
        self.limits = limits
        self.chunk_size = chunk_size
        self.partial_flush_bytes = partial_flush_bytes
        # called with the sha256 of every blob moved to quarantine (from whichever thread read it)
        self.on_quarantine: Callable[[str], None] | None = None
        for sub in ("", "manifests", "partial", "quarantine"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):
            stale.unlink()

    def path(self, sha256: str) -> Path:
        return self.root / check_hex_digest(sha256)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobMissing(sha256) from None

    def list_blobs(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file() and len(p.name) == 64)

    def delete(self, sha256: str) -> None:
        for p in (self.path(sha256), self.root / "manifests" / sha256):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        _fsync_dir(self.root)

    def writer(self, max_bytes: int | None = None) -> BlobWriter:
        return BlobWriter(self, self.limits.max_blob_bytes if max_bytes is None else max_bytes, self.chunk_size)

    def put_bytes(self, data: bytes) -> str:
        with self.writer() as w:
            w.write(data)
            return w.commit()

    def put_file(self, src: str | os.PathLike[str]) -> str:
        with open(src, "rb") as f, self.writer() as w:
            while block := f.read(DEFAULT_READ_BLOCK):
                w.write(block)
            return w.commit()

    def open(self, sha256: str) -> VerifyingReader:
        if not self.has(sha256):
            raise BlobMissing(sha256)
        return VerifyingReader(self, sha256)

    def read(self, sha256: str) -> bytes:
        """The whole blob, verified (BlobIntegrityError + quarantine on mismatch)."""
        parts = []
        with self.open(sha256) as r:
            while block := r.read():
                parts.append(block)
        return b"".join(parts)

    def iter_chunks(self, sha256: str) -> Iterator[bytes]:
        with self.open(sha256) as r:
            while block := r.read(self.chunk_size):
                yield block

    def manifest(self, sha256: str) -> BlobManifest:
        """The manifest of a complete blob: cached, or computed (and verified) by streaming it."""
        cached = self.root / "manifests" / sha256
        if not self.has(sha256):
            raise BlobMissing(sha256)
        with contextlib.suppress(FileNotFoundError, DecodeError, LimitExceeded):
            m = decode_manifest(cached.read_bytes(), self.limits)
            if m.sha256 == sha256 and m.size == self.size(sha256):
                return m
        builder = ManifestBuilder(self.chunk_size)
        for block in self.iter_chunks(sha256):  # raises BlobIntegrityError at the end on mismatch
            builder.update(block)
        m = builder.finish()
        self._cache_manifest(m)
        return m

    def read_chunk(self, manifest: BlobManifest, index: int) -> bytes:
        """One chunk of a complete blob, verified against the manifest (quarantines on mismatch)."""
        offset, length = manifest.chunk_range(index)
        with open(self.path(manifest.sha256), "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        if not manifest.chunk_matches(index, data):
            self.quarantine(manifest.sha256)
            raise BlobIntegrityError(f"chunk {index} of stored blob {manifest.sha256} is corrupt")
        return data

    def quarantine(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path(sha256), self.root / "quarantine" / f"{sha256}.{time.time_ns()}")
        with contextlib.suppress(FileNotFoundError):
            (self.root / "manifests" / sha256).unlink()
        if self.on_quarantine is not None:
            self.on_quarantine(sha256)

    def partial_manifest(self, sha256: str) -> BlobManifest | None:
        """The manifest of an interrupted download of sha256, if one is on disk."""
        with contextlib.suppress(FileNotFoundError, DecodeError, LimitExceeded):
            m = decode_manifest((self.root / "partial" / sha256 / "manifest").read_bytes(), self.limits)
            if m.sha256 == sha256:
                return m
        return None

    def open_partial(self, manifest: BlobManifest) -> PartialBlob:
        """Resumes the partial of this exact manifest, or starts a new one (discarding any other).
        Limits are checked before anything is allocated."""
        manifest.check_limits(self.limits)
        return PartialBlob(self, manifest, self.partial_flush_bytes)

    def _cache_manifest(self, manifest: BlobManifest) -> None:
        if manifest.chunk_size == self.chunk_size:
            with contextlib.suppress(OSError):
                _atomic_write(self.root / "manifests" / manifest.sha256, manifest.encode())
