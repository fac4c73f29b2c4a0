"""Async blob transfer over `/fednode/blob/1.0.0`: the public entry points.

`serve_blobs` (serve.py) answers requests from a BlobStore; `fetch_blob` (fetch.py) pulls a
blob from one or more holders into a BlobStore, verified and resumable. Framing is in
protocol.py, the optional direct-TCP fast lane in lane.py; the wire format is specified in
protocols/blob-transfer-v1.md.
"""

from fednode.blobs.fetch import FetchLimits, FetchResult, fetch_blob
from fednode.blobs.protocol import PROTOCOL_ID
from fednode.blobs.serve import BlobServer, ServeLimits, ServeStatistics, serve_blobs

__all__ = [
    "PROTOCOL_ID",
    "BlobServer",
    "FetchLimits",
    "FetchResult",
    "ServeLimits",
    "ServeStatistics",
    "fetch_blob",
    "serve_blobs",
]
