"""What one daemon must own alone: its data dir and its listen addresses.

Without this, a second `fednode run` on the same data dir started happily, deleted the first
one's control socket and wrote the same state.sqlite; and a second daemon on the same listen
port started too (py-libp2p binds with SO_REUSEPORT), so the kernel split incoming connections
between the two. Both are now refused at start-up, with an error naming the pid or the key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from fednode.errors import ConfigError, FednodeError

LOCK_FILE_NAME = "fednode.lock"


class DataDirLocked(FednodeError):
    """Another live process holds the data dir's lock."""


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[Path]:
    """Hold an exclusive lock on `data_dir` for the block (an flock on `data_dir/fednode.lock`,
    which records the holder's pid). The kernel drops the lock when the process dies, however
    it dies, so a stale lock file never blocks a restart. Raises DataDirLocked naming the pid."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise DataDirLocked(
                f"data dir {data_dir} is in use by another fednode daemon (pid {holder}, holding {path}); "
                f"stop it first, or give this node its own node.data_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


def _ip_tcp_endpoint(addr: str) -> tuple[int, str, int] | None:
    """(family, host, port) of a /ip4|ip6/<host>/tcp/<port> multiaddr, None for anything else."""
    parts = addr.strip("/").split("/")
    if len(parts) < 4 or parts[2] != "tcp" or parts[0] not in ("ip4", "ip6"):
        return None
    try:
        port = int(parts[3])
    except ValueError:
        return None
    return (socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6), parts[1], port


def check_listen_addrs_free(addrs: Sequence[str]) -> None:
    """Refuse a listen address another socket already listens on. A probe binds it the way a
    plain server would (SO_REUSEADDR, so a just-closed port in TIME_WAIT is fine, but no
    SO_REUSEPORT, so a live listener conflicts); libp2p itself would bind with SO_REUSEPORT
    and silently share the port. Port 0 (any free port) is not probed."""
    for addr in addrs:
        endpoint = _ip_tcp_endpoint(addr)
        if endpoint is None or endpoint[2] == 0:
            continue
        family, host, port = endpoint
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"key 'network.listen': {addr} is already in use (another fednode daemon or another "
                        f"program listens on {host} port {port}); choose a free port") from None
                raise ConfigError(f"key 'network.listen': cannot listen on {addr}: {exc.strerror}") from None
