"""Fixtures for the security tests: a scratch directory on tmpfs when there is one.

The daemons fsync their sqlite WAL and blobs; on this shared machine's disk that makes one 3-node,
2-round run take ~12 s instead of ~2 s. Durability is not what these tests are about.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

TMPFS = Path("/dev/shm")


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    if TMPFS.is_dir():
        try:
            path = Path(tempfile.mkdtemp(dir=TMPFS, prefix="fednode-security-"))
        except OSError:
            yield tmp_path
            return
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path
