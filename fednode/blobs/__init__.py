"""Content-addressed blobs: chunk manifests (pure), a verified disk store, and the
`/fednode/blob/1.0.0` fetch/serve protocol (protocols/blob-transfer-v1.md)."""

from fednode.blobs.manifest import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_BLOB_BYTES, BlobManifest, ManifestLimits
from fednode.blobs.store import BlobStore
from fednode.blobs.transfer import (
    PROTOCOL_ID,
    BlobServer,
    FetchLimits,
    FetchResult,
    ServeLimits,
    fetch_blob,
    serve_blobs,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_BLOB_BYTES",
    "PROTOCOL_ID",
    "BlobManifest",
    "BlobServer",
    "BlobStore",
    "FetchLimits",
    "FetchResult",
    "ManifestLimits",
    "ServeLimits",
    "fetch_blob",
    "serve_blobs",
]
